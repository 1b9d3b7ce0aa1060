"""Test setup: 8 fake CPU devices (set before jax is imported), a `gpu` marker, comparison helpers."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Reference products in float32 must be exact float32, not TF32/bf16 passes.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  # Tests marked `slow` (tens of seconds each on a 2-core CPU) run first: pytest-xdist hands out
  # tests in collection order, and a long test started last keeps one worker busy while the
  # others have finished. The sort is stable, so every worker collects the same order.
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


def rel_err(got, want) -> float:
  """||got - want|| / ||want|| in float64; inf if got has a NaN/inf."""
  got = np.asarray(got, dtype=np.float64)
  want = np.asarray(want, dtype=np.float64)
  if not np.all(np.isfinite(got)):
    return float("inf")
  denom = np.linalg.norm(want)
  return float(np.linalg.norm(got - want) / (denom if denom > 0 else 1.0))


# Relative-error budgets by operand dtype (float32 accumulation everywhere).
TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 3e-3}


def assert_close(got, want, dtype, *, factor: float = 1.0, name: str = "") -> None:
  err = rel_err(got, want)
  tol = TOL[np.dtype(dtype).name] * factor
  assert err <= tol, f"{name} relative error {err:.3g} > {tol:.3g}"


@pytest.fixture
def rng():
  return np.random.default_rng(0)
