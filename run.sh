#!/usr/bin/env bash
# The main job: bootstraps .venv on first use, then trains the tiny MoE transformer (8 experts,
# top-2, grouped-matmul dMoE) on the embedded corpus (the Python standard library's source,
# byte-level) for a few minutes on CPU, writing metrics, TensorBoard logs, checkpoints and a plot
# under runs/tiny. Running it again resumes from the last checkpoint (a finished run just reports).
# Extra arguments go to `jaxmoe train` (e.g. --steps 1000, --ffn dense, --out runs/other).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
out="runs/tiny"
for ((i = 1; i <= $#; i++)); do
  if [ "${!i}" = "--out" ]; then j=$((i + 1)); out="${!j}"; fi
done
"$root/.venv/bin/jaxmoe" train --preset tiny --out "$out" "$@"
"$root/.venv/bin/jaxmoe" plot "$out"
echo "sample: $root/.venv/bin/jaxmoe sample $out --prompt 'def '"
