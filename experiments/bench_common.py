"""Shared benchmark helpers: timing (JAX and torch), environment record, JSON output, tables.

Timing method (device README METHOD.md): warm up (compile) first, then take `iters` samples and
report the median; a JAX sample runs short calls back to back (see `time_jax`), torch samples are
CUDA-event times. Inputs are random, never zeros.
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
