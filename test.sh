#!/usr/bin/env bash
# The test command: bootstraps .venv on first use, then runs the CPU test suite
# (Pallas kernels in interpret mode, 8 fake CPU devices for mesh tests). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest -q "$@"
