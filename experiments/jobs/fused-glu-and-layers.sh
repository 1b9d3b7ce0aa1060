#!/usr/bin/env bash
# GPU: the fused GLU kernels (scatter_glu(fused=True)) against the reference, then timed against
# the products path, then whole layers at the Figure 14 configurations not yet on record.
# Run from the repository root with OUT set (a folder); each part has its own time limit, so the
# whole fits one 10-minute call on an H200.
set -uo pipefail
export PYTHONUNBUFFERED=1
timeout 240 python3 -m experiments.check_kernels --ops scatter_glu --dtypes bfloat16 \
    --out "$OUT/check-scatter-glu-bf16.json" > "$OUT/check-scatter-glu-bf16.log" 2>&1
echo "check_kernels scatter_glu bf16: exit $?"; tail -15 "$OUT/check-scatter-glu-bf16.log"
timeout 200 python3 -m experiments.bench_scatter --only glu --glu-shapes T40960-d768-f256-E128-k8 \
    --out "$OUT" > "$OUT/bench-glu.log" 2>&1
echo "bench_scatter --only glu: exit $?"; tail -20 "$OUT/bench-glu.log"
timeout 120 python3 -m experiments.bench_layer_configs --out "$OUT" --impls scatter --no-torch \
    --configs T32768-d4096-n512-E256-k16,T32768-d4096-n1024-E128-k8 > "$OUT/layers-120b.log" 2>&1
echo "bench_layer_configs 120B: exit $?"; tail -6 "$OUT/layers-120b.log"
