#!/usr/bin/env bash
# The test command: bootstraps .venv on first use, then runs the CPU test suite
# (Pallas kernels in interpret mode, 8 fake CPU devices for mesh tests) on 2 pytest-xdist workers
# (JAXMOE_TEST_WORKERS=N for another count, 0 for none). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
# worksteal: a worker that runs out of tests takes queued ones from the other (the slow tests,
# marked in tests/, are queued first; see tests/conftest.py).
exec "$root/.venv/bin/python" -m pytest -q -n "${JAXMOE_TEST_WORKERS:-2}" --dist worksteal "$@"
