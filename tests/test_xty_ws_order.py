"""The warp-specialized group_xty's tile order (MosaicWsXtyConfig.largest_first): groups visited
largest first or in index order give the reference's values, in interpret mode on 2 SMs (so each
SM walks several groups' tiles, in a different order for each flag), and both lower for an H100."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close

from kernels.gmm import mosaic_common, mosaic_xty_ws_kernel
from kernels.common.gpu_lowering import lower_for_gpu
from kernels.gmm.reference import group_xty_reference

# K=64, N=128: one (K tile, N tile) per group at this config, so the loop's steps are the groups.
SMALL = mosaic_xty_ws_kernel.MosaicWsXtyConfig(
    block_k=64, block_n=64, block_rows=64, max_concurrent_steps=2, grid_tile_width=1
)
K, N = 64, 128

# (M, sizes), sizes not sorted by size: skewed with empty groups (ties among them) and rows past
# the sum; and sum > M, where the order is by the raw sizes but the work by the clipped ones.
CASES = {
    "skewed_tail": (256, [10, 0, 120, 5, 0, 70, 30]),   # sum 235 < M: rows 235.. in no group
    "overflow": (200, [30, 150, 0, 60]),                # sum 240 > M: group 3 clipped to 20 rows
}


@pytest.fixture
def two_sms(monkeypatch):
  monkeypatch.setattr(mosaic_common, "num_sms", lambda: 2)


def _no_interpret_races() -> bool:
  """Whether the last interpreted Mosaic kernel ran without a race on shared memory."""
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

  return not gpu_callbacks.get_races().races_found


def test_default_is_largest_first():
  assert mosaic_xty_ws_kernel.MosaicWsXtyConfig().largest_first is True
  assert mosaic_xty_ws_kernel.default_config(2048, 1024).largest_first is True


@pytest.mark.parametrize("largest_first", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_group_xty_order_interpret(rng, two_sms, case, largest_first):
  m, sizes = CASES[case]
  x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
  dy = jnp.asarray(rng.standard_normal((m, N)), jnp.bfloat16)
  gs = jnp.asarray(sizes, jnp.int32)
  cfg = dataclasses.replace(SMALL, largest_first=largest_first)
  out = mosaic_xty_ws_kernel.group_xty(x, dy, gs, out_dtype=jnp.float32, config=cfg, interpret=True)
  assert _no_interpret_races()
  chex.assert_shape(out, (len(sizes), K, N))
  out = np.asarray(out)
  assert np.all(np.isfinite(out)), "unwritten (poisoned) or non-finite output"
  want = np.asarray(group_xty_reference(x.astype(jnp.float32), dy.astype(jnp.float32), gs))
  # Products of bf16 values accumulated in float32 and not rounded: float32-level error, per
  # group, so a group's tile written into another group's slot cannot hide.
  offsets = np.minimum(np.concatenate([[0], np.cumsum(sizes)]), m)
  for g in range(len(sizes)):
    if offsets[g + 1] == offsets[g]:
      np.testing.assert_array_equal(out[g], 0.0, err_msg=f"empty group {g}")
    else:
      assert_close(out[g], want[g], jnp.float32, factor=10.0, name=f"group {g}")


@pytest.mark.parametrize("largest_first", [True, False])
def test_group_xty_order_lowers_for_h100(largest_first):
  """The default config at the OLMoE weight-gradient shape (K=2048, N=1024, G=64) compiles the
  Mosaic GPU kernel for an H100; the group order is sorted on device only when asked."""
  m, k, n, g = 4096, 2048, 1024, 64
  cfg = dataclasses.replace(mosaic_xty_ws_kernel.default_config(k, n), largest_first=largest_first)
  fn = lambda x, dy, s: mosaic_xty_ws_kernel.group_xty(x, dy, s, out_dtype=x.dtype, config=cfg)
  sds = jax.ShapeDtypeStruct
  text = lower_for_gpu(fn, sds((m, k), jnp.bfloat16), sds((m, n), jnp.bfloat16),
                       sds((g,), jnp.int32))
  assert "mosaic_gpu" in text
  assert ("stablehlo.sort" in text) == largest_first
