"""Shared benchmark helpers: timing (JAX and torch), environment record, JSON output, tables.

Timing method (device README METHOD.md): warm up (compile) first, then run `iters` times, blocking
on each result, and report the median. Inputs are random, never zeros.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax


def time_jax(fn: Callable, *args, warmup: int = 2, iters: int = 10) -> float:
  """Median wall time in milliseconds of fn(*args), blocking on the outputs each run."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
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
  import jax.numpy as jnp

  got = jnp.asarray(got, jnp.float32)
  want = jnp.asarray(want, jnp.float32)
  if not bool(jnp.all(jnp.isfinite(got))):
    return float("inf")
  return float(jnp.linalg.norm(got - want) / jnp.maximum(jnp.linalg.norm(want), 1e-30))


def tflops(flops: float, ms: float) -> float:
  return flops / (ms * 1e-3) / 1e12


def environment() -> dict[str, Any]:
  dev = jax.devices()[0]
  return {
      "device": getattr(dev, "device_kind", str(dev)),
      "platform": dev.platform,
      "num_devices": jax.device_count(),
      "jax": jax.__version__,
      "python": platform.python_version(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


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


def write_json(out_dir: str, name: str, payload: dict[str, Any]) -> str:
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
