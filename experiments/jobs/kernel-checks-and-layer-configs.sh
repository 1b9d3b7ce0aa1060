#!/usr/bin/env bash
# GPU: every kernel backend against its reference, then whole layers at SonicMoE's configurations.
# Run from the repository root with OUT set (a folder); each part has its own time limit.
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 200 python3 -m experiments.check_kernels --out "$OUT/check-kernels.json" 2>&1 | tee "$OUT/check-kernels.log" | tail -40
timeout 120 python3 -m experiments.check_gmm_kernels 2>&1 | tee "$OUT/check-gmm.log" | tail -15
timeout 240 python3 -m experiments.bench_layer_configs --out "$OUT" --impls grouped,scatter 2>&1 | tee "$OUT/layer-configs.log" | tail -25
ls -la "$OUT"
