"""Shared benchmark helpers: timing (JAX and torch), the run record, result paths, JSON, tables.

Timing method: warm up (compile) first, then take `iters` samples and report the median; a JAX
sample runs short calls back to back (see `time_jax`), torch samples are CUDA-event times. Inputs
are random, never zeros.

Results are named by device, date and what they measure: `write_result(out, "gmm", payload)`
writes `out/h100/2026-11-23-gmm.json` (`result_path`), and `environment()` records in the JSON
the command line, the commit, the device and the versions (experiments/results/INDEX.md).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.trace_summary import summarize_trace


def time_jax(fn: Callable, *args, warmup: int = 2, iters: int = 10,
             min_sample_ms: float = 20.0) -> float:
  """Median time in milliseconds of one fn(*args) call on the device.

  Each of the `iters` samples issues the call `reps` times back to back and blocks once at the
  end, dividing by reps; reps is picked after the warm-up so that a sample lasts at least
  min_sample_ms. JAX dispatches asynchronously, so the device queue stays full and the samples
  measure device time without the host's per-call synchronization gap (which at the 0.4-0.7 ms
  kernels here moved single-call timings by 10-15% between runs). Calls of min_sample_ms or
  more run once per sample, as a blocking per-call timing would.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first_ms = (time.perf_counter() - t0) * 1e3
  reps = max(1, min(1000, int(min_sample_ms / max(first_ms, 1e-3))))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    for _ in range(reps):  # one device stream runs them in order: the last one done = all
      out = fn(*args)       # (and dropping each result frees it: memory stays at one call's)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) * 1e3 / reps)
    del out
  return statistics.median(times)


def time_torch(fn: Callable, *, warmup: int = 3, iters: int = 20) -> float:
  """Median CUDA-event time in milliseconds of fn()."""
  import torch

  for _ in range(warmup):
    fn()
  torch.cuda.synchronize()
  times = []
  for _ in range(iters):
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    times.append(start.elapsed_time(end))
  return statistics.median(times)


def rel_err(got, want) -> float:
  """||got - want|| / ||want||, computed in float32 on the device (no host copy of large arrays);
  inf when got has a NaN or inf, so an unwritten (poisoned) output can never pass."""
  got = jnp.asarray(got, jnp.float32)
  want = jnp.asarray(want, jnp.float32)
  if not bool(jnp.all(jnp.isfinite(got))):
    return float("inf")
  return float(jnp.linalg.norm(got - want) / jnp.maximum(jnp.linalg.norm(want), 1e-30))


def tflops(flops: float, ms: float) -> float:
  return flops / (ms * 1e-3) / 1e12


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "experiments", "results")


def command_line() -> str:
  """The command that is running, as typed from the repository root (`python -m experiments.X
  ARGS` when run as a module)."""
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  head = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
  return shlex.join(head + sys.argv[1:])


def git_commit() -> dict[str, Any]:
  """HEAD's commit and whether tracked files differ from it; None values outside a git checkout."""
  def git(*args: str) -> str | None:
    try:
      return subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True,
                            check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return None

  # A copy of the tree on another machine may carry a stale .git: the launcher can name the commit.
  if os.environ.get("JAXMOE_COMMIT"):
    return {"commit": os.environ["JAXMOE_COMMIT"], "uncommitted_changes": None}
  commit = git("rev-parse", "HEAD")
  status = git("status", "--porcelain", "--untracked-files=no") if commit else None
  return {"commit": commit, "uncommitted_changes": None if status is None else bool(status)}


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def environment() -> dict[str, Any]:
  """The run record every result JSON carries as "env": device, versions, date, command, commit."""
  dev = jax.devices()[0]
  return {
      "device": getattr(dev, "device_kind", str(dev)),
      "platform": dev.platform,
      "num_devices": jax.device_count(),
      "jax": jax.__version__,
      "jaxlib": _version("jaxlib"),
      "python": platform.python_version(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": command_line(),
      **git_commit(),
  }


def device_slug(env: dict[str, Any]) -> str:
  """Folder name of a device: "NVIDIA H100 80GB HBM3" -> "h100"; "x<N>" when N devices ran it
  ("h200x2"); "cpu" on CPU."""
  kind = re.sub(r"^nvidia\s+", "", str(env["device"]).strip().lower())
  slug = re.sub(r"[^a-z0-9]", "", kind.split()[0] if kind.split() else "") or str(env["platform"])
  n = int(env.get("num_devices", 1))
  return f"{slug}x{n}" if n > 1 else slug


def result_path(out_dir: str, what: str, env: dict[str, Any], ext: str = "json") -> str:
  """`out_dir/<device>/<date>-<what>.<ext>`, the date (UTC) taken from env (fixed at the run's
  start, so a run that rewrites its JSON as it goes keeps one file)."""
  if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", what):
    raise ValueError(f"what: lowercase letters, digits, '.', '_' and '-' only, got {what!r}")
  return os.path.join(out_dir, device_slug(env), f"{env['date'][:10]}-{what}.{ext}")


def write_result(out_dir: str, what: str, payload: dict[str, Any]) -> str:
  """Writes payload (which holds the run record as payload["env"]) to result_path; returns it."""
  path = result_path(out_dir, what, payload["env"])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=float)
  return path


def peak_bytes() -> int | None:
  """Peak device bytes in use so far (GPU only; None where the backend does not say)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def compiled_bytes(fn: Callable, *args) -> int | None:
  """Bytes XLA plans for one call of jit(fn): arguments + outputs + temporaries."""
  analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
  if analysis is None:
    return None
  return int(
      analysis.argument_size_in_bytes + analysis.output_size_in_bytes
      + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes
  )


def tree_bytes(tree) -> int:
  """Bytes of the arrays (or shape-dtype structs) of a pytree."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def layer_costs(forward: Callable, loss: Callable, params, x, iters: int):
  """What one layer costs, given as forward(params, x) -> y and loss(params, x) -> scalar.

  Returns (row, y, fwd, fwdbwd): row holds "finite" (y has no NaN/inf), "fwd_ms" and
  "fwdbwd_ms" (time_jax of the forward and of jax.value_and_grad(loss) over params and x: under
  jax.grad alone XLA would drop the unused forward value), "residual_bytes" (what the backward
  keeps: the VJP's residuals less the parameters and the input, from jax.eval_shape),
  "temp_bytes" and "fwd_temp_bytes" (XLA's planned temporaries of the forward+backward and of
  the forward alone); fwd and fwdbwd are the compiled executables that were timed.
  """
  fwd = jax.jit(forward).lower(params, x).compile()
  fwdbwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
  y = fwd(params, x)
  row = {"finite": bool(jnp.all(jnp.isfinite(y)))}
  row["fwd_ms"] = time_jax(fwd, params, x, iters=iters)
  row["fwdbwd_ms"] = time_jax(fwdbwd, params, x, iters=iters)
  vjp_fn = jax.eval_shape(lambda p, x: jax.vjp(forward, p, x)[1], params, x)
  row["residual_bytes"] = max(0, tree_bytes(vjp_fn) - tree_bytes(params) - tree_bytes(x))
  for key, compiled in (("temp_bytes", fwdbwd), ("fwd_temp_bytes", fwd)):
    analysis = compiled.memory_analysis()
    row[key] = None if analysis is None else int(analysis.temp_size_in_bytes)
  return row, y, fwd, fwdbwd


def write_json(out_dir: str, name: str, payload: dict[str, Any]) -> str:
  """Writes payload to out_dir/name (a fixed name; results use `write_result`)."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=float)
  return path


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
  """A plain fixed-width table of the given columns."""
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)

  cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
            for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
  lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


def kernel_profile(fn, *args, top: int = 12) -> dict:
  """GPU kernel time of one call of fn, by kernel (jax.profiler trace, summed by
  experiments.trace_summary): where a layer's or an op's time goes."""
  import tempfile

  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      jax.block_until_ready(fn(*args))
    summary = summarize_trace(trace_dir, top)
  summary.pop("trace", None)
  summary.pop("threads", None)
  return summary


def print_profiles(row: dict[str, Any]) -> None:
  """Each kernel_profile in row ("profile_fwd", "profile_fwdbwd"): its kernels' microseconds and
  calls."""
  for key in ("profile_fwd", "profile_fwdbwd"):
    prof = row.get(key)
    if prof and "top" in prof:
      print(f"     {key}: busy {prof['busy_us']:.0f} us of {prof['span_us']:.0f} us span")
      for k in prof["top"]:
        print(f"       {k['us']:9.1f} us  x{k['count']:<3d} {k['name'][:100]}")
