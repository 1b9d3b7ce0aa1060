#!/usr/bin/env bash
# GPU, one 10-minute call on an H200: the router's top-k kernel against lax.top_k; the scatter
# expert GLU's products path against the fused GLU kernels; whole layers
# at the Figure 14 configurations (scatter at all twelve, fine-grained first, the JSON written
# after each; grouped against scatter at two coarse ones); the GLU checks of both paths on the default backend.
# Run from the repository root with OUT set (a folder).
set -uo pipefail
export PYTHONUNBUFFERED=1
timeout 75 python3 -m experiments.bench_topk --out "$OUT" > "$OUT/topk.log" 2>&1
echo "bench_topk: exit $?"; tail -12 "$OUT/topk.log"
timeout 75 python3 -m experiments.bench_scatter --only glu --glu-shapes T40960-d768-f256-E128-k8 \
    --out "$OUT" > "$OUT/bench-glu.log" 2>&1
echo "bench_scatter --only glu: exit $?"; tail -4 "$OUT/bench-glu.log"
timeout 180 python3 -m experiments.bench_layer_configs --out "$OUT/scatter" --impls scatter --no-torch \
    --configs T40960-d768-n256-E128-k8,T24576-d1536-n256-E128-k8,T32768-d4096-n256-E256-k16,T32768-d4096-n512-E256-k16,T40960-d768-n512-E64-k4,T24576-d1536-n512-E64-k4,T32768-d4096-n512-E128-k8,T32768-d4096-n1024-E128-k8,T40960-d768-n1024-E32-k2,T24576-d1536-n1024-E32-k2,T32768-d4096-n1024-E64-k4,T32768-d4096-n2048-E64-k4 \
    > "$OUT/layers-scatter.log" 2>&1
echo "bench_layer_configs scatter: exit $?"; tail -14 "$OUT/layers-scatter.log"
timeout 110 python3 -m experiments.bench_layer_configs --out "$OUT/grouped" --impls scatter,grouped --no-torch \
    --configs T40960-d768-n1024-E32-k2,T32768-d4096-n2048-E64-k4 > "$OUT/layers-grouped.log" 2>&1
echo "bench_layer_configs grouped: exit $?"; tail -4 "$OUT/layers-grouped.log"
timeout 80 python3 -m experiments.check_kernels --ops scatter_glu --dtypes bfloat16 --backends pallas \
    --out "$OUT/check-scatter-glu-bf16.json" > "$OUT/check-scatter-glu-bf16.log" 2>&1
echo "check_kernels scatter_glu bf16: exit $?"; grep -c " ok " "$OUT/check-scatter-glu-bf16.log"; grep -E "FAIL|rows," "$OUT/check-scatter-glu-bf16.log" | tail -5
