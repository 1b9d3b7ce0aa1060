#!/usr/bin/env bash
# GPU: the expert GLU's check one shape at a time, each under its own time limit, so that a case
# that does not finish stops only its own shape. Products path first, then the fused kernels, on
# "pallas". On a fresh H200 a shape takes 70-90 s, most of it compiling (the edge shape: 88 s),
# so the default limit is 200 s a shape: pass two or three shapes per 10-minute call.
# Run from the repository root with OUT set (a folder):
#   LIMIT=200 bash experiments/jobs/glu-checks-per-shape.sh edge fine_k8
set -uo pipefail
export PYTHONUNBUFFERED=1
limit=${LIMIT:-200}
shapes=("$@")
(( ${#shapes[@]} )) || shapes=(fine_k8 edge)
for shape in "${shapes[@]}"; do
  timeout "$limit" python3 -m experiments.check_kernels --ops scatter_glu --dtypes bfloat16 \
      --backends pallas --shapes "$shape" --out "$OUT/check-scatter-glu-$shape.json" \
      > "$OUT/check-scatter-glu-$shape.log" 2>&1
  echo "$shape: exit $? ($(grep -c ' ok ' "$OUT/check-scatter-glu-$shape.log") ok rows)"
  grep -E "FAIL" "$OUT/check-scatter-glu-$shape.log" | head -3
  tail -1 "$OUT/check-scatter-glu-$shape.log"
done
