#!/usr/bin/env bash
# GPU: the expert GLU's check one shape at a time, each under its own time limit, so that a case
# that does not finish (the fused kernels at the "edge" shape gave no result within 80-300 s on an
# H200) stops only its own shape. Products path first, then the fused kernels, on "pallas".
# Run from the repository root with OUT set (a folder); about 6 minutes at most.
set -uo pipefail
export PYTHONUNBUFFERED=1
for shape in fine_k8 fine_k16 ragged one_expert_all edge; do
  timeout 70 python3 -m experiments.check_kernels --ops scatter_glu --dtypes bfloat16 \
      --backends pallas --shapes "$shape" --out "$OUT/check-scatter-glu-$shape.json" \
      > "$OUT/check-scatter-glu-$shape.log" 2>&1
  echo "$shape: exit $? ($(grep -c ' ok ' "$OUT/check-scatter-glu-$shape.log") ok rows)"
  grep -E "FAIL" "$OUT/check-scatter-glu-$shape.log" | head -3
  tail -1 "$OUT/check-scatter-glu-$shape.log"
done
