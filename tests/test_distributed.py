"""Two processes of JAX's multi-controller runtime (jax.distributed) on CPU, 4 devices each: the
expert-parallel MoE layer over the global 8-device mesh equals the single-device layer in both
processes, including a layout whose expert all-to-all crosses the processes (tests/distributed_worker.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_processes(num_processes: int, layouts: list[str]) -> list[tuple[int, str]]:
  port = _free_port()
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)   # the worker sets its own device count (4)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(num_processes),
                             f"127.0.0.1:{port}", *layouts],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(num_processes)]
  results = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=TIMEOUT_S)
      results.append((p.returncode, out))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return results


@pytest.mark.slow
def test_two_processes_match_single_device():
  results = _run_processes(2, ["2,2,2", "1,4,2"])
  if any(rc != 0 for rc, _ in results) and any("Address already in use" in out
                                                for _, out in results):
    results = _run_processes(2, ["2,2,2", "1,4,2"])   # the free port was taken meanwhile: retry
  for i, (rc, out) in enumerate(results):
    tail = "\n".join(out.splitlines()[-30:])
    assert rc == 0, f"process {i} exited {rc}:\n{tail}"
    ok_lines = [l for l in out.splitlines() if l.startswith("OK process")]
    assert len(ok_lines) == 2, tail
    assert "'expert': 4" in ok_lines[1] and "across processes: True" in ok_lines[1], ok_lines[1]
