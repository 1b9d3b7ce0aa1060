"""grouped_matmul / group_xty against the references: XLA, Triton and Mosaic GPU (interpret mode),
gradients through the custom_vjp, jit/checkpoint/vmap, GPU lowering on CPU, argument checks."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close

import kernels
from kernels.gmm import mosaic_common, mosaic_kernel, mosaic_ws_kernel, mosaic_xty_ws_kernel
from kernels.gmm import triton as gmm_triton
from kernels.common.gpu_lowering import lower_for_gpu
from kernels.gmm.reference import gmm_reference, group_xty_reference

TRITON_GMM = gmm_triton.TritonGmmConfig(
    block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=2
)
TRITON_XTY = gmm_triton.TritonXtyConfig(block_m=16, block_k=16, block_n=16, num_warps=4, num_stages=2)
MOSAIC_GMM = mosaic_kernel.MosaicGmmConfig(
    block_m=64, block_n=64, block_k=64, max_concurrent_steps=2, grid_tile_width=1
)
MOSAIC_WS = mosaic_ws_kernel.MosaicWsGmmConfig(
    block_m=64, block_n=64, block_k=64, max_concurrent_steps=2, grid_tile_width=1
)
MOSAIC_XTY = mosaic_kernel.MosaicXtyConfig(
    block_k=64, block_n=64, block_rows=64, max_concurrent_steps=2, grid_tile_width=1
)
MOSAIC_WS_XTY = mosaic_xty_ws_kernel.MosaicWsXtyConfig(
    block_k=64, block_n=64, block_rows=64, max_concurrent_steps=2, grid_tile_width=1
)

# (M, sizes): zeros, one group taking all rows, M not a tile multiple, sum < M, sum > M.
CASES = {
    "empty_groups": (40, [10, 0, 25, 5]),
    "one_group_all": (37, [0, 37, 0, 0]),
    "ragged_tail": (45, [7, 0, 20, 3]),    # sum 30 < M: rows 30..44 must be zero
    "overflow": (33, [20, 10, 9, 4]),      # sum 43 > M: boundaries clipped to M
    "all_empty": (17, [0, 0, 0, 0]),
}


def _inputs(rng, m, k, n, sizes, dtype, transpose_rhs=False):
  lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
  shape = (len(sizes), n, k) if transpose_rhs else (len(sizes), k, n)
  rhs = jnp.asarray(rng.standard_normal(shape) / np.sqrt(k), dtype)
  return lhs, rhs, jnp.asarray(sizes, jnp.int32)


def _check_gmm(out, lhs, rhs, gs, sizes, dtype, transpose_rhs=False, factor=1.0):
  m = lhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  chex.assert_shape(out, (m, n))
  chex.assert_type(out, dtype)
  out = np.asarray(out.astype(jnp.float32))
  assert np.all(np.isfinite(out)), "unwritten (poisoned) or non-finite output rows"
  want = gmm_reference(
      lhs.astype(jnp.float32), rhs.astype(jnp.float32), gs, transpose_rhs=transpose_rhs
  )
  assert_close(out, want, dtype, factor=factor, name="gmm")
  used = min(sum(sizes), m)
  np.testing.assert_array_equal(out[used:], 0.0)


def _check_xty(out, x, dy, gs, sizes, dtype, factor=1.0):
  chex.assert_shape(out, (len(sizes), x.shape[1], dy.shape[1]))
  chex.assert_type(out, dtype)
  out = np.asarray(out.astype(jnp.float32))
  assert np.all(np.isfinite(out)), "unwritten (poisoned) or non-finite output"
  want = group_xty_reference(x.astype(jnp.float32), dy.astype(jnp.float32), gs)
  assert_close(out, want, dtype, factor=factor, name="group_xty")
  offsets = np.minimum(np.concatenate([[0], np.cumsum(sizes)]), x.shape[0])
  for g in range(len(sizes)):
    if offsets[g + 1] == offsets[g]:
      np.testing.assert_array_equal(out[g], 0.0)


# ---------------------------------------------------------------------------------------------
# Forward.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_xla(rng, case, dtype):
  m, sizes = CASES[case]
  lhs, rhs, gs = _inputs(rng, m, 24, 20, sizes, dtype)
  out = kernels.grouped_matmul(lhs, rhs, gs, backend="xla")
  _check_gmm(out, lhs, rhs, gs, sizes, dtype)


@pytest.mark.parametrize("transpose_rhs", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_triton_small_tiles(rng, case, dtype, transpose_rhs):
  # K=24, N=20 are not multiples of the 16-wide tiles either.
  m, sizes = CASES[case]
  lhs, rhs, gs = _inputs(rng, m, 24, 20, sizes, dtype, transpose_rhs)
  out = gmm_triton.gmm(
      lhs, rhs, gs, transpose_rhs=transpose_rhs, out_dtype=dtype, config=TRITON_GMM, interpret=True
  )
  _check_gmm(out, lhs, rhs, gs, sizes, dtype, transpose_rhs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_triton_public_op(rng, dtype):
  sizes = [30, 0, 50, 10]
  lhs, rhs, gs = _inputs(rng, 100, 32, 24, sizes, dtype)
  out = kernels.grouped_matmul(lhs, rhs, gs, backend="triton_interpret")
  _check_gmm(out, lhs, rhs, gs, sizes, dtype)


def test_out_dtype(rng):
  sizes = [5, 0, 9]
  lhs, rhs, gs = _inputs(rng, 16, 8, 8, sizes, jnp.bfloat16)
  for backend in ("xla", "triton_interpret"):
    out = kernels.grouped_matmul(lhs, rhs, gs, backend=backend, out_dtype=jnp.float32)
    _check_gmm(out, lhs, rhs, gs, sizes, jnp.float32, factor=1e3)  # bf16 operands, f32 output


# ---------------------------------------------------------------------------------------------
# Gradients through the custom_vjp.


@pytest.mark.parametrize("transpose_rhs", [False, True])
@pytest.mark.parametrize("backend", ["xla", "triton_interpret"])
def test_gradients(rng, backend, transpose_rhs):
  sizes = [9, 0, 14, 3]
  m, k, n = 30, 12, 10
  lhs, rhs, gs = _inputs(rng, m, k, n, sizes, jnp.float32, transpose_rhs)
  ct = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)

  def loss(f, a, b):
    return jnp.sum(f(a, b, gs, transpose_rhs=transpose_rhs) * ct)

  op = functools.partial(kernels.grouped_matmul, backend=backend)
  out = op(lhs, rhs, gs, transpose_rhs=transpose_rhs)
  _check_gmm(out, lhs, rhs, gs, sizes, jnp.float32, transpose_rhs)
  got = jax.grad(functools.partial(loss, op), argnums=(0, 1))(lhs, rhs)
  want = jax.grad(functools.partial(loss, gmm_reference), argnums=(0, 1))(lhs, rhs)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  assert_close(got[0], want[0], jnp.float32, name="d(lhs)")
  assert_close(got[1], want[1], jnp.float32, name="d(rhs)")
  # Rows past sum(sizes) do not touch the output: zero gradient. Empty group 1: zero weight grad.
  np.testing.assert_array_equal(np.asarray(got[0])[sum(sizes):], 0.0)
  np.testing.assert_array_equal(np.asarray(got[1])[1], 0.0)


def test_gradients_bf16_triton(rng):
  sizes = [9, 0, 14, 3]
  lhs, rhs, gs = _inputs(rng, 30, 16, 16, sizes, jnp.bfloat16)
  ct = jnp.asarray(rng.standard_normal((30, 16)), jnp.bfloat16)

  def loss(f, a, b):
    return jnp.sum((f(a, b, gs) * ct).astype(jnp.float32))

  op = functools.partial(kernels.grouped_matmul, backend="triton_interpret")
  got = jax.grad(functools.partial(loss, op), argnums=(0, 1))(lhs, rhs)
  f32 = lambda a, b, g: gmm_reference(a.astype(jnp.float32), b.astype(jnp.float32), g)
  want = jax.grad(functools.partial(loss, f32), argnums=(0, 1))(lhs, rhs)
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
  assert_close(got[0], want[0], jnp.bfloat16, factor=2, name="d(lhs)")
  assert_close(got[1], want[1], jnp.bfloat16, factor=2, name="d(rhs)")


# ---------------------------------------------------------------------------------------------
# group_xty.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", ["empty_groups", "ragged_tail", "overflow", "all_empty"])
def test_group_xty_xla(rng, case, dtype):
  m, sizes = CASES[case]
  x = jnp.asarray(rng.standard_normal((m, 12)), dtype)
  dy = jnp.asarray(rng.standard_normal((m, 10)), dtype)
  gs = jnp.asarray(sizes, jnp.int32)
  _check_xty(kernels.group_xty(x, dy, gs, backend="xla"), x, dy, gs, sizes, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", ["empty_groups", "ragged_tail", "overflow", "all_empty"])
def test_group_xty_triton_small_tiles(rng, case, dtype):
  m, sizes = CASES[case]
  x = jnp.asarray(rng.standard_normal((m, 20)), dtype)
  dy = jnp.asarray(rng.standard_normal((m, 18)), dtype)
  gs = jnp.asarray(sizes, jnp.int32)
  out = gmm_triton.group_xty(x, dy, gs, out_dtype=dtype, config=TRITON_XTY, interpret=True)
  _check_xty(out, x, dy, gs, sizes, dtype)


def test_group_xty_triton_public_op(rng):
  sizes = [30, 0, 50, 10]
  x = jnp.asarray(rng.standard_normal((100, 16)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((100, 8)), jnp.float32)
  gs = jnp.asarray(sizes, jnp.int32)
  out = kernels.group_xty(x, dy, gs, backend="triton_interpret")
  _check_xty(out, x, dy, gs, sizes, jnp.float32)


# ---------------------------------------------------------------------------------------------
# Mosaic GPU kernels in interpret mode (slow: a few seconds per call).

MOSAIC_SIZES = [30, 0, 50, 10]  # sum 90 < M=100: tail rows must be zero


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_mosaic_gmm_interpret(rng, transpose_rhs):
  lhs, rhs, gs = _inputs(rng, 100, 128, 128, MOSAIC_SIZES, jnp.bfloat16, transpose_rhs)
  out = mosaic_kernel.gmm(
      lhs, rhs, gs, transpose_rhs=transpose_rhs, out_dtype=jnp.bfloat16, config=MOSAIC_GMM,
      interpret=True,
  )
  _check_gmm(out, lhs, rhs, gs, MOSAIC_SIZES, jnp.bfloat16, transpose_rhs)


@pytest.mark.parametrize("m", [100, 300])  # 300: a tail of 210 rows, several whole zero tiles
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_mosaic_ws_gmm_interpret(rng, transpose_rhs, m):
  lhs, rhs, gs = _inputs(rng, m, 128, 256, MOSAIC_SIZES, jnp.bfloat16, transpose_rhs)
  out = mosaic_ws_kernel.gmm(
      lhs, rhs, gs, transpose_rhs=transpose_rhs, out_dtype=jnp.bfloat16, config=MOSAIC_WS,
      interpret=True,
  )
  _check_gmm(out, lhs, rhs, gs, MOSAIC_SIZES, jnp.bfloat16, transpose_rhs)


# (m, sizes): several tiles per SM (and a 2-tile tail), and one tile per SM (the plain pipeline).
_CHAIN_CASES = {"many": (300, [30, 0, 50, 10, 120]), "single": (64, [60])}


@pytest.mark.parametrize("case", list(_CHAIN_CASES))
@pytest.mark.parametrize("chain,epi_cols", [(True, None), (True, 64), (False, 64)])
def test_mosaic_ws_gmm_chained_interpret(rng, monkeypatch, case, chain, epi_cols):
  """Chained per-tile pipelines (pipeline_state START/STEADY/STOP) and the chunked epilogue
  (two 64-column chunks of a 128-column block) on 2 SMs, so each SM walks several tiles (or, for
  "single", exactly one)."""
  monkeypatch.setattr(mosaic_common, "num_sms", lambda: 2)
  m, sizes = _CHAIN_CASES[case]
  cfg = dataclasses.replace(MOSAIC_WS, chain=chain, epi_cols=epi_cols,
                            block_n=64 if epi_cols is None else 128)
  assert mosaic_ws_kernel.chains(256, cfg) == chain  # 4 K steps, 2 slots: they line up
  lhs, rhs, gs = _inputs(rng, m, 256, 256, sizes, jnp.bfloat16)
  out = mosaic_ws_kernel.gmm(lhs, rhs, gs, transpose_rhs=False, out_dtype=jnp.bfloat16, config=cfg,
                          interpret=True)
  _check_gmm(out, lhs, rhs, gs, sizes, jnp.bfloat16)


def test_mosaic_ws_epilogue_chunks_shrink_shared_memory():
  """64-column staging chunks leave room for a 4th stage at the 128 x 256 CTA tile."""
  cfg = mosaic_ws_kernel.MosaicWsGmmConfig(max_concurrent_steps=4)
  assert not mosaic_ws_kernel.supports(4096, 14336, cfg)
  assert mosaic_ws_kernel.supports(4096, 14336, dataclasses.replace(cfg, epi_cols=64))
  assert not mosaic_ws_kernel.supports(4096, 14336, dataclasses.replace(cfg, epi_cols=48))
  # 32 bf16 columns are 64-byte rows: a TMA store from such a row is misaligned.
  assert not mosaic_ws_kernel.supports(4096, 14336, dataclasses.replace(cfg, epi_cols=32))
  # ... while 32 float32 columns are 128-byte rows (and fit: 4 stages + 32 KiB of staging).
  assert mosaic_ws_kernel.supports(4096, 14336, dataclasses.replace(cfg, epi_cols=32),
                                   out_dtype=jnp.float32)
  assert not mosaic_ws_kernel.chains(4096, mosaic_ws_kernel.MosaicWsGmmConfig(chain=True))  # 64 % 3
  assert mosaic_ws_kernel.chains(4096, dataclasses.replace(cfg, chain=True))


def test_mosaic_ws_shared_memory_budget():
  """A float32 output doubles the ws kernel's staging buffer past the H100's 227 KiB of shared
  memory (seen on the GPU: 278576 > 232448 bytes); the op must then pick the simple kernel."""
  cfg = mosaic_ws_kernel.MosaicWsGmmConfig()
  assert mosaic_ws_kernel.supports(4096, 14336, cfg, jnp.bfloat16, jnp.bfloat16)
  assert not mosaic_ws_kernel.supports(4096, 14336, cfg, jnp.bfloat16, jnp.float32)
  assert mosaic_ws_kernel.smem_bytes(cfg, jnp.bfloat16, jnp.float32) == 278528
  with pytest.raises(ValueError, match="shared memory"):
    mosaic_ws_kernel.gmm(jnp.zeros((8, 4096), jnp.bfloat16), jnp.zeros((1, 4096, 512), jnp.bfloat16),
                      jnp.array([8], jnp.int32), transpose_rhs=False, out_dtype=jnp.float32)


def test_mosaic_float32_output_interpret(rng):
  """bf16 operands with a float32 output (the expert-parallel path asks for it) through the op."""
  lhs, rhs, gs = _inputs(rng, 100, 128, 256, MOSAIC_SIZES, jnp.bfloat16, False)
  out = kernels.grouped_matmul(lhs, rhs, gs, backend="mosaic_interpret", out_dtype=jnp.float32)
  chex.assert_type(out, jnp.float32)
  want = gmm_reference(lhs.astype(jnp.float32), rhs.astype(jnp.float32), gs)
  # Products of bf16 values accumulated in float32 and not rounded to bf16: float32-level error.
  assert_close(out, want, jnp.float32, factor=10.0, name="gmm float32 out")
  np.testing.assert_array_equal(np.asarray(out)[sum(MOSAIC_SIZES):], 0.0)


def test_mosaic_group_xty_interpret(rng):
  x = jnp.asarray(rng.standard_normal((100, 128)), jnp.bfloat16)
  dy = jnp.asarray(rng.standard_normal((100, 128)), jnp.bfloat16)
  gs = jnp.asarray(MOSAIC_SIZES, jnp.int32)
  out = mosaic_kernel.group_xty(
      x, dy, gs, out_dtype=jnp.bfloat16, config=MOSAIC_XTY, interpret=True
  )
  _check_xty(out, x, dy, gs, MOSAIC_SIZES, jnp.bfloat16)


def test_mosaic_group_xty_neighbour_rows_masked(rng):
  """The single-warpgroup Mosaic group_xty: x rows of neighbouring groups and of the tail share
  row blocks with a group and must add nothing, even when they hold NaN or inf (a select, not a
  multiply by 0: NaN * 0 is NaN). This kernel masks x; dy stays finite here."""
  m, sizes = 200, [30, 0, 70, 0, 45]   # rows 145..199 belong to no group
  x = np.asarray(rng.standard_normal((m, 128)), np.float32)
  dy = np.asarray(rng.standard_normal((m, 128)), np.float32)
  x[150:] = np.nan                     # the tail, in group 4's last row block
  x[100:145, :5] = np.inf              # group 4's own rows, in group 2's last row block
  x_, dy_ = jnp.asarray(x, jnp.bfloat16), jnp.asarray(dy, jnp.bfloat16)
  gs = jnp.asarray(sizes, jnp.int32)
  out = np.asarray(mosaic_kernel.group_xty(
      x_, dy_, gs, out_dtype=jnp.float32, config=MOSAIC_XTY, interpret=True))
  # The reference multiplies every row: give it finite values where the kernel must not look.
  # Group 4's first 5 output rows (x columns 0..4) are inf by construction and left out.
  x[150:] = 0.0
  x[100:145, :5] = 0.0
  want = np.asarray(group_xty_reference(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32),
                                        dy_.astype(jnp.float32), gs))
  for g in (0, 2):   # group 2's last row block holds group 4's inf rows
    assert np.all(np.isfinite(out[g])), f"group {g}: a neighbour's inf leaked"
    assert_close(out[g], want[g], jnp.float32, factor=10.0, name=f"group {g}")
  np.testing.assert_array_equal(out[[1, 3]], 0.0)
  # Group 4's last row block holds the tail's NaN rows.
  assert np.all(np.isfinite(out[4][5:])), "group 4: the tail's NaN leaked"
  assert_close(out[4][5:], want[4][5:], jnp.float32, factor=10.0, name="group 4")


@pytest.fixture
def two_sms(monkeypatch):
  """Run the warp-specialized group_xty on 2 SMs: each then loops over several output tiles, so
  its pipeline buffers, barriers and output staging are reused across tiles as on the GPU (with
  132 SMs a small problem gives each SM one tile at most), and far fewer idle interpreter
  threads make it fast."""
  monkeypatch.setattr(mosaic_common, "num_sms", lambda: 2)


def _no_interpret_races() -> bool:
  """Whether the last interpreted Mosaic kernel ran without a race on shared memory (the
  interpreter only prints races; this reads its flag)."""
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

  return not gpu_callbacks.get_races().races_found


# (M, sizes) with K=128, N=256 and 64-row blocks: boundaries inside row blocks (30, 100, 145),
# empty groups, rows past the sum, one group taking all rows (M not a block multiple, so the
# last block reads past M), block-aligned boundaries, sum > M, and no rows at all.
WS_XTY_CASES = {
    "ragged_empty_tail": (200, [30, 0, 70, 0, 45]),
    "one_group_all": (200, [0, 200, 0]),
    "aligned": (256, [64, 128, 0, 64]),
    "overflow": (150, [100, 20, 80]),
    "all_empty": (100, [0, 0, 0]),
}


@pytest.mark.parametrize("case", list(WS_XTY_CASES))
def test_mosaic_ws_group_xty_interpret(rng, two_sms, case):
  m, sizes = WS_XTY_CASES[case]
  x = jnp.asarray(rng.standard_normal((m, 128)), jnp.bfloat16)
  dy = jnp.asarray(rng.standard_normal((m, 256)), jnp.bfloat16)
  gs = jnp.asarray(sizes, jnp.int32)
  out = mosaic_xty_ws_kernel.group_xty(
      x, dy, gs, out_dtype=jnp.bfloat16, config=MOSAIC_WS_XTY, interpret=True
  )
  assert _no_interpret_races()
  _check_xty(out, x, dy, gs, sizes, jnp.bfloat16)


def test_mosaic_ws_group_xty_neighbour_rows_masked(rng, two_sms):
  """Rows of neighbouring groups and of the tail share row blocks with a group: they must add
  nothing, even when they hold NaN or inf (a select, not a multiply by 0)."""
  m, sizes = 200, [30, 0, 70, 0, 45]   # rows 145..199 belong to no group
  x = np.asarray(rng.standard_normal((m, 128)), np.float32)
  dy = np.asarray(rng.standard_normal((m, 256)), np.float32)
  dy[150:] = np.nan
  dy[100:145, :5] = np.inf             # group 4's own rows are finite elsewhere
  x_, dy_ = jnp.asarray(x, jnp.bfloat16), jnp.asarray(dy, jnp.bfloat16)
  gs = jnp.asarray(sizes, jnp.int32)
  out = mosaic_xty_ws_kernel.group_xty(
      x_, dy_, gs, out_dtype=jnp.float32, config=MOSAIC_WS_XTY, interpret=True
  )
  out = np.asarray(out)
  # The reference multiplies every row, so give it finite values where the kernel must not look;
  # group 4's first 5 columns are inf by construction and left out of the comparison.
  dy[150:] = 0.0
  dy[100:145, :5] = 0.0
  want = np.asarray(group_xty_reference(x_.astype(jnp.float32),
                                        jnp.asarray(dy, jnp.bfloat16).astype(jnp.float32), gs))
  for g in (0, 2):   # group 2's last row block holds group 4's inf rows
    assert_close(out[g], want[g], jnp.float32, factor=10.0, name=f"group {g}")
  np.testing.assert_array_equal(out[[1, 3]], 0.0)
  # Group 4's last row block holds the tail's NaN rows.
  assert_close(out[4][:, 5:], want[4][:, 5:], jnp.float32, factor=10.0, name="group 4")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_mosaic_ws_group_xty_public_op(rng, two_sms, dtype):
  """Through `kernels.group_xty`: the Mosaic backend picks the ws kernel at its default tile
  (128 x 256) for K=128, N=256; float32 output takes 3 pipeline stages to fit shared memory."""
  sizes = [90, 0, 77]                  # sum 167 < M=180
  x = jnp.asarray(rng.standard_normal((180, 128)), dtype)
  dy = jnp.asarray(rng.standard_normal((180, 256)), dtype)
  gs = jnp.asarray(sizes, jnp.int32)
  assert mosaic_xty_ws_kernel.supports(128, 256, in_dtype=dtype, out_dtype=jnp.float32)
  out = kernels.group_xty(x, dy, gs, backend="mosaic_interpret", out_dtype=jnp.float32)
  assert _no_interpret_races()
  # Products of 16-bit values accumulated in float32 and not rounded: float32-level error.
  _check_xty(out, x, dy, gs, sizes, jnp.float32, factor=10.0)


def test_mosaic_ws_group_xty_float32_operands_rejected():
  """wgmma reads a transposed shared-memory operand only for 16-bit types: float32 x/dy are not
  supported by the ws kernel (the op's dispatch then keeps the single-warpgroup kernel)."""
  assert not mosaic_xty_ws_kernel.supports(128, 256, in_dtype=jnp.float32, out_dtype=jnp.float32)
  with pytest.raises(ValueError, match="16-bit operands"):
    mosaic_xty_ws_kernel.group_xty(jnp.zeros((8, 128), jnp.float32), jnp.zeros((8, 256), jnp.float32),
                                jnp.array([8], jnp.int32), out_dtype=jnp.float32)


def test_mosaic_ws_xty_shared_memory_budget():
  """Default: 4 stages of (64x128 + 64x256) bf16 plus (2, 2, 64, 64) bf16 output staging =
  229376 bytes, within the H100's 232448 (less a 1 KiB margin); a float32 output doubles the
  staging to 262144 and needs 3 stages. Tiles must divide K and the 256-wide CTA tile N."""
  cfg = mosaic_xty_ws_kernel.MosaicWsXtyConfig()
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert mosaic_xty_ws_kernel.smem_bytes(cfg, bf16, bf16) == 229376
  assert mosaic_xty_ws_kernel.smem_bytes(cfg, bf16, f32) == 262144
  assert mosaic_xty_ws_kernel.supports(4096, 14336, cfg, bf16, bf16)
  assert not mosaic_xty_ws_kernel.supports(4096, 14336, cfg, bf16, f32)
  assert mosaic_xty_ws_kernel.default_config(4096, 14336, bf16, bf16) == cfg
  assert mosaic_xty_ws_kernel.default_config(4096, 14336, bf16, f32).max_concurrent_steps == 3
  assert mosaic_xty_ws_kernel.supports(4096, 14336, in_dtype=bf16, out_dtype=f32)
  assert not mosaic_xty_ws_kernel.supports(4096, 384, in_dtype=bf16)   # N % 256 != 0
  assert not mosaic_xty_ws_kernel.supports(4000, 512, in_dtype=bf16)   # K % 128 != 0
  with pytest.raises(ValueError, match="262144 bytes"):
    mosaic_xty_ws_kernel.group_xty(jnp.zeros((8, 4096), bf16), jnp.zeros((8, 512), bf16),
                                jnp.array([8], jnp.int32), out_dtype=f32, config=cfg)


# ---------------------------------------------------------------------------------------------
# Composition with jit, checkpoint and vmap.


@pytest.mark.parametrize("backend", ["xla", "triton_interpret"])
def test_jit_and_checkpoint(rng, backend):
  sizes = [6, 0, 10]
  lhs, rhs, gs = _inputs(rng, 20, 8, 8, sizes, jnp.float32)

  def loss(a, b, g):
    h = kernels.grouped_matmul(a, b, g, backend=backend)
    return jnp.sum(jnp.sin(h))

  def ref_loss(a, b, g):
    return jnp.sum(jnp.sin(gmm_reference(a, b, g)))

  want = jax.grad(ref_loss, argnums=(0, 1))(lhs, rhs, gs)
  got_jit = jax.jit(jax.grad(loss, argnums=(0, 1)))(lhs, rhs, gs)
  got_ckpt = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(lhs, rhs, gs)
  for got in (got_jit, got_ckpt):
    assert_close(got[0], want[0], jnp.float32, name="d(lhs)")
    assert_close(got[1], want[1], jnp.float32, name="d(rhs)")
  out = jax.jit(functools.partial(kernels.grouped_matmul, backend=backend))(lhs, rhs, gs)
  _check_gmm(out, lhs, rhs, gs, sizes, jnp.float32)


@pytest.mark.parametrize("backend", [
    pytest.param("xla", marks=pytest.mark.xfail(
        raises=NotImplementedError, strict=True,
        reason="jax.lax.ragged_dot has no vmap rule for batched group_sizes (found by this test)")),
    "triton_interpret",
])
def test_vmap(rng, backend):
  batch_sizes = [[6, 0, 10], [0, 16, 0], [3, 3, 3]]
  m, k, n = 16, 8, 8
  lhs = jnp.asarray(rng.standard_normal((3, m, k)), jnp.float32)
  rhs = jnp.asarray(rng.standard_normal((3, k, n)), jnp.float32)
  gs = jnp.asarray(batch_sizes, jnp.int32)
  op = functools.partial(kernels.grouped_matmul, backend=backend)
  out = jax.vmap(op, in_axes=(0, None, 0))(lhs, rhs, gs)
  chex.assert_shape(out, (3, m, n))
  for b, sizes in enumerate(batch_sizes):
    _check_gmm(out[b], lhs[b], rhs, gs[b], sizes, jnp.float32)
  # Gradients of the batched op.
  ct = jnp.asarray(rng.standard_normal((3, m, n)), jnp.float32)
  loss = lambda f: (lambda a, w: jnp.sum(jax.vmap(f, in_axes=(0, None, 0))(a, w, gs) * ct))
  got = jax.grad(loss(op), argnums=(0, 1))(lhs, rhs)
  want = jax.grad(loss(gmm_reference), argnums=(0, 1))(lhs, rhs)
  assert_close(got[0], want[0], jnp.float32, name="d(lhs)")
  assert_close(got[1], want[1], jnp.float32, name="d(rhs)")


# ---------------------------------------------------------------------------------------------
# Lowering for an H100 from CPU.

M, K, N, G = 4096, 512, 1024, 8
_BF16 = jnp.bfloat16


def _sds(*shape, dtype=_BF16):
  return jax.ShapeDtypeStruct(shape, dtype)


_CHAINED_WS = mosaic_ws_kernel.MosaicWsGmmConfig(max_concurrent_steps=4, epi_cols=64, chain=True)


@pytest.mark.parametrize("transpose_rhs", [False, True])
@pytest.mark.parametrize("kernel", ["triton", "mosaic", "mosaic_ws", "mosaic_ws_chained"])
def test_gmm_lowers_for_gpu(kernel, transpose_rhs):
  impl = {"triton": gmm_triton.gmm, "mosaic": mosaic_kernel.gmm, "mosaic_ws": mosaic_ws_kernel.gmm,
          "mosaic_ws_chained": functools.partial(mosaic_ws_kernel.gmm, config=_CHAINED_WS)}
  fn = functools.partial(impl[kernel], transpose_rhs=transpose_rhs, out_dtype=_BF16)
  rhs = _sds(G, N, K) if transpose_rhs else _sds(G, K, N)
  text = lower_for_gpu(fn, _sds(M, K), rhs, _sds(G, dtype=jnp.int32))
  assert isinstance(text, str) and text


@pytest.mark.parametrize("kernel", ["triton", "mosaic", "mosaic_ws"])
def test_group_xty_lowers_for_gpu(kernel):
  impl = {"triton": gmm_triton.group_xty, "mosaic": mosaic_kernel.group_xty,
          "mosaic_ws": mosaic_xty_ws_kernel.group_xty}[kernel]
  fn = functools.partial(impl, out_dtype=_BF16)
  text = lower_for_gpu(fn, _sds(M, K), _sds(M, N), _sds(G, dtype=jnp.int32))
  assert isinstance(text, str) and text


# ---------------------------------------------------------------------------------------------
# Argument validation.


def _ok():
  lhs = jnp.ones((8, 4), jnp.float32)
  rhs = jnp.ones((3, 4, 5), jnp.float32)
  gs = jnp.array([2, 3, 3], jnp.int32)
  return lhs, rhs, gs


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda l, r, g: (l, jnp.ones((3, 6, 5), jnp.float32), g), "rhs"),           # K mismatch
        (lambda l, r, g: (l, r, jnp.array([2, 3], jnp.int32)), "group_sizes"),        # G mismatch
        (lambda l, r, g: (l, r, jnp.ones((3, 1), jnp.int32)), "group_sizes"),         # 2-D
        (lambda l, r, g: (l, r, g.astype(jnp.float32)), "group_sizes"),               # float
        (lambda l, r, g: (l, r, np.array([2, 3, 3], np.int64)), "group_sizes"),       # int64
        (lambda l, r, g: (l.astype(jnp.int32), r, g), "lhs"),                         # int lhs
        (lambda l, r, g: (l, r.astype(jnp.bfloat16), g), "lhs: float32, rhs: bfloat16"),
        (lambda l, r, g: (l[None], r, g), "lhs"),                                     # ndim
        (lambda l, r, g: (l, r[0], g), "rhs"),                                        # ndim
    ],
)
def test_grouped_matmul_validation(change, match):
  lhs, rhs, gs = change(*_ok())
  with pytest.raises(ValueError, match=match):
    kernels.grouped_matmul(lhs, rhs, gs, backend="xla")


def test_transpose_rhs_k_mismatch():
  lhs, rhs, gs = _ok()
  with pytest.raises(ValueError, match="rhs.*transpose_rhs=True"):
    kernels.grouped_matmul(lhs, rhs, gs, transpose_rhs=True, backend="xla")


def test_unknown_backend():
  with pytest.raises(ValueError, match="backend"):
    kernels.grouped_matmul(*_ok(), backend="cuda")
  with pytest.raises(ValueError, match="backend"):
    kernels.group_xty(jnp.ones((4, 2)), jnp.ones((4, 3)), jnp.array([4], jnp.int32), backend="tpu")


@pytest.mark.parametrize(
    "x, dy, gs, match",
    [
        (jnp.ones((4, 2)), jnp.ones((5, 3)), jnp.array([4], jnp.int32), "dy"),
        (jnp.ones((4, 2), jnp.int32), jnp.ones((4, 3)), jnp.array([4], jnp.int32), "x"),
        (jnp.ones((4, 2)), jnp.ones((4, 3), jnp.bfloat16), jnp.array([4], jnp.int32), "x: float32"),
        (jnp.ones((4, 2)), jnp.ones((4, 3)), jnp.array([4.0]), "group_sizes"),
        (jnp.ones((4, 2)), jnp.ones((4,)), jnp.array([4], jnp.int32), "dy"),
    ],
)
def test_group_xty_validation(x, dy, gs, match):
  with pytest.raises(ValueError, match=match):
    kernels.group_xty(x, dy, gs, backend="xla")
