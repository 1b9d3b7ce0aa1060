"""Equal Mosaic GPU kernels at different call sites lower to equal kernel hashes (one compile).

Lowered for an abstract H100 on CPU: the hash is what Mosaic GPU's compile cache is keyed by.
"""

import os
import re

import jax
import jax.numpy as jnp

from kernels.common import mosaic_kernel_cache
from kernels.common.gpu_lowering import lower_for_gpu
from kernels import grouped_matmul

M, K, N, E = 512, 128, 256, 4


def _two_layers(x, w1, w2, gs):
  # Layer 1 and layer 2 run the same two kernels (same shapes, same dtypes).
  for _ in range(2):
    x = grouped_matmul(grouped_matmul(x, w1, gs, backend="mosaic"), w2, gs, backend="mosaic")
  return x


def _kernel_hashes_and_text(m: int):
  # JAX caches lowerings per shape: each test takes its own row count.
  args = (jax.ShapeDtypeStruct((m, K), jnp.bfloat16), jax.ShapeDtypeStruct((E, K, N), jnp.bfloat16),
          jax.ShapeDtypeStruct((E, N, K), jnp.bfloat16), jax.ShapeDtypeStruct((E,), jnp.int32))
  text = lower_for_gpu(_two_layers, *args)
  calls = [line for line in text.splitlines() if "@mosaic_gpu" in line]
  hashes = [re.search(r'kernel_hash = "(.*?)", module', c).group(1) for c in calls]
  return hashes, "\n".join(calls)


def test_equal_kernels_get_one_hash(monkeypatch):
  for k in [k for k in os.environ if k.startswith("MOSAIC_GPU_DUMP")]:
    monkeypatch.delenv(k)
  assert mosaic_kernel_cache.install()
  hashes, text = _kernel_hashes_and_text(M)
  assert len(hashes) == 4
  assert hashes[0] == hashes[2] and hashes[1] == hashes[3], "layer 2 would compile again"
  assert hashes[0] != hashes[1]   # different shapes stay different kernels
  assert "dump_basename" not in text


def test_dump_requests_keep_distinct_names(monkeypatch):
  """With MOSAIC_GPU_DUMP_* set, each module keeps its own dump name (and so its own hash)."""
  monkeypatch.setenv("MOSAIC_GPU_DUMP_PTX", "1")
  assert mosaic_kernel_cache.install()
  hashes, text = _kernel_hashes_and_text(2 * M)
  assert len(set(hashes)) == 4
  assert "dump_basename" in text


def test_install_is_idempotent():
  from jax.experimental.mosaic.gpu import core
  assert mosaic_kernel_cache.install()
  wrapped = core._run_serde_pass
  assert mosaic_kernel_cache.install()
  assert core._run_serde_pass is wrapped
