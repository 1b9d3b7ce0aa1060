"""The fused GLU expert kernels in Pallas, lowered through Triton (any CUDA GPU; interpret on CPU).

Over M expert-sorted rows p (expert e = g(p), token row src[p], flat choice dst[p]):

  up           x (T, d) gathered in the kernel, w_gate, w_up (E, d, f) ->
                 g[p] = x[src[p]] @ w_gate[e],  u[p] = x[src[p]] @ w_up[e],  a[p] = act(g) * u
               one K loop feeding two float32 accumulators from the same gathered x tile; the
               epilogue rounds g and u to x's dtype and computes a from them in float32 exactly as
               `kernels.hidden.hidden_math` does. Writes a, and g and u when the backward needs
               them; (M, f) in sorted order.
  hidden_grad  dO (M, d) sorted rows of the output gradient, w_down (E, f, d), g, u, the rows'
               gates s[p] ->  dA'[p] = dO[p] @ w_down[e]^T in float32, and in the epilogue
                 dG, dU = the GLU's backward of dA = s * dA' (float32, `glu_math_grad`),
                 s * a (the down projection's weight-gradient operand), and
                 sum_j dA'[p, j] a[p, j] over the tile's columns (the gate gradient's partial sums,
                 (num column tiles, M) float32; their sum is d gates)
               so dA' and a never go through memory.
  data_grad    dG, dU (M, f), w_gate, w_up ->  dX[dst[p]] = dG[p] @ w_gate[e]^T + dU[p] @ w_up[e]^T
               one K loop over both weight refs (K = 2f), rows written in flat order, so the sum
               over each token's k copies is one reduce.

Every kernel walks (row tile, column tile) pairs from `kernels.common.tiling.for_owned_tile`: a
row tile shared by two experts is visited once per expert, each visit writing only its rows with
masked stores (no read-modify-write). Rows at or past sum(group_sizes) belong to the virtual tail
group and are written as zeros.

Configs: `FusedGluConfig` holds one `TritonScatterConfig` (tiles, swizzle band, warps, stages)
per kernel, and optionally the scatter kernel's for the down projection. The backend records
(`kernels.scatter.backends.GLU_BACKENDS`) take `default_config`, `check` and `search_space` from
here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels.activations import kernel_activation
from kernels.common import tiling
from kernels.common.triton_dot import dot_f32
from kernels.common.validation import SUPPORTED_DTYPES
from kernels.gmm.shapes import Dtypes, GroupedShape
from kernels.hidden import glu_math_grad, hidden_math
from kernels.scatter.triton import TritonScatterConfig

# Shared memory a Hopper thread block may use (227 KiB on the H100 and H200).
SHARED_MEMORY_BYTES = 227 * 1024
_NN = (((1,), (0,)), ((), ()))   # a (m, k) . b (k, n)
_NT = (((1,), (1,)), ((), ()))   # a (m, k) . b (n, k)


@dataclasses.dataclass(frozen=True)
class FusedGluConfig:
  """Tiles of the fused GLU path, one TritonScatterConfig per kernel.

  up:          the fused up-projection (block_n tiles f; two accumulators of block_m x block_n)
  hidden_grad: dA' = dO w_down^T with the GLU backward in its epilogue (block_n tiles f)
  data_grad:   dX = dG w_gate^T + dU w_up^T (block_n tiles d)
  down:        the scatter kernel of the down projection's products (scatter_matmul), or None
               for its default (products on the grouped-matmul kernels take their own tiles)
  """
  up: TritonScatterConfig = TritonScatterConfig()
  hidden_grad: TritonScatterConfig = TritonScatterConfig()
  data_grad: TritonScatterConfig = TritonScatterConfig()
  down: TritonScatterConfig | None = None

  def __post_init__(self):
    for name in ("up", "hidden_grad", "data_grad", "down"):
      v = getattr(self, name)
      if not isinstance(v, TritonScatterConfig) and not (name == "down" and v is None):
        allowed = "a TritonScatterConfig" + (" or None" if name == "down" else "")
        raise ValueError(f"config.{name} must be {allowed}, got {type(v).__name__}")

  @classmethod
  def of_tiles(cls, tiles: TritonScatterConfig) -> "FusedGluConfig":
    """Every kernel of the path (the down projection's too) with the same tiles."""
    return cls(up=tiles, hidden_grad=tiles, data_grad=tiles, down=tiles)


def _launch(cfg: TritonScatterConfig):
  return plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _poisoned(shapes: list[jax.ShapeDtypeStruct], first_operand: int):
  """NaN buffers the outputs start as (aliased), and the aliases: checks prove every row is
  written."""
  bufs = [jnp.full(s.shape, jnp.nan, s.dtype) for s in shapes]
  return bufs, {first_operand + i: i for i in range(len(shapes))}


# ---------------------------------------------------------------------------------------------
# up: gather x rows once per K step, two products, act(g) * u in the epilogue.


def _up_kernel(tile_group_ref, tile_block_ref, offsets_ref, num_active_ref, src_ref, x_ref,
               wg_ref, wu_ref, *refs, d: int, f: int, num_groups: int, num_n: int,
               num_tiles: int, cfg: TritonScatterConfig, act: Callable, num_outs: int):
  out_refs = refs[-num_outs:]     # a [, g, u]   (poison buffers aliased to them may precede)
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k

  def visit(t: tiling.OwnedTile):
    g, row0 = t.group, t.row0
    mask = t.own[:, None] & t.col_ok[None, :]
    blocks = [r.at[pl.ds(row0, bm), pl.ds(t.ni * bn, bn)] for r in out_refs]

    @pl.when(g == num_groups)  # rows past the last group: zeros
    def _():
      for block, ref in zip(blocks, out_refs):
        plt.store(block, jnp.zeros((bm, bn), ref.dtype), mask=mask)

    @pl.when(g < num_groups)
    def _():
      src = plt.load(src_ref.at[pl.ds(row0, bm)], mask=t.own, other=0)[:, None]
      w_mask_cols = t.col_ok[None, :]

      def body(ki, accs):
        acc_g, acc_u = accs
        kk = ki * bk + jnp.arange(bk, dtype=jnp.int32)
        k_ok = kk < d
        xt = plt.load(x_ref.at[src, kk[None, :]], mask=t.own[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & w_mask_cols
        cols = (g, pl.ds(ki * bk, bk), pl.ds(t.ni * bn, bn))
        wg = plt.load(wg_ref.at[cols], mask=w_mask, other=0.0)
        wu = plt.load(wu_ref.at[cols], mask=w_mask, other=0.0)
        return acc_g + dot_f32(xt, wg, _NN), acc_u + dot_f32(xt, wu, _NN)

      zeros = jnp.zeros((bm, bn), jnp.float32)
      acc_g, acc_u = jax.lax.fori_loop(0, tiling.cdiv(d, bk), body, (zeros, zeros))
      gate = acc_g.astype(out_refs[0].dtype)
      up = acc_u.astype(out_refs[0].dtype)
      plt.store(blocks[0], hidden_math(act, gate, up), mask=mask)
      if num_outs == 3:
        plt.store(blocks[1], gate, mask=mask)
        plt.store(blocks[2], up, mask=mask)

  tiling.for_owned_tile(tile_group_ref, tile_block_ref, offsets_ref, num_active_ref,
                        num_tiles=num_tiles, num_n=num_n, group_m=cfg.group_m, block_m=bm,
                        block_n=bn, n=f, body=visit)


def glu_up(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    group_sizes: jax.Array,
    src: jax.Array,
    *,
    activation: str,
    save_gate_up: bool,
    config: TritonScatterConfig | None = None,
    interpret: bool = False,
    poison: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
  """The fused up-projection; see the module docstring.

  Args:
    x: (T, d) token rows; sorted row p reads x[src[p]].
    w_gate, w_up: (E, d, f) of x's dtype.
    group_sizes: (E,) int32 sorted rows per expert.
    src: (M,) int32 token row of each sorted row.
    activation: a name of kernels.activations.ACTIVATIONS (compiled into the epilogue).
    save_gate_up: also return g and u (what the backward keeps).
    poison: the outputs start as NaN buffers (checks: every row must be written).
  Returns:
    a, or (a, g, u): (M, f) in x's dtype, sorted order; rows past sum(group_sizes) are zero.
  Inputs are validated by the public op (kernels.scatter.scatter_glu).
  """
  cfg = config or TritonScatterConfig()
  m, (num_groups, d, f) = src.shape[0], w_gate.shape
  meta = tiling.tile_metadata(group_sizes, m, cfg.block_m)
  num_tiles = tiling.num_row_tiles(m, num_groups, cfg.block_m)
  num_n = tiling.cdiv(f, cfg.block_n)
  num_outs = 3 if save_gate_up else 1
  out_shape = [jax.ShapeDtypeStruct((m, f), x.dtype)] * num_outs
  operands = [meta.tile_group, meta.tile_block, meta.offsets, meta.num_active, src, x, w_gate,
              w_up]
  aliases = {}
  if poison:
    bufs, aliases = _poisoned(out_shape, len(operands))
    operands += bufs
  kernel = functools.partial(_up_kernel, d=d, f=f, num_groups=num_groups, num_n=num_n,
                             num_tiles=num_tiles, cfg=cfg, act=kernel_activation(activation),
                             num_outs=num_outs)
  outs = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(num_tiles * num_n,), compiler_params=_launch(cfg),
      interpret=interpret, input_output_aliases=aliases, name="jaxmoe_glu_up",
  )(*operands)
  return tuple(outs) if save_gate_up else outs[0]


# ---------------------------------------------------------------------------------------------
# hidden_grad: dA' = dO w_down^T, the GLU backward and the gate gradient's sums in the epilogue.


def _hidden_grad_kernel(tile_group_ref, tile_block_ref, offsets_ref, num_active_ref, scale_ref,
                        do_ref, wd_ref, g_ref, u_ref, *refs, d: int, f: int, num_groups: int,
                        num_n: int, num_tiles: int, cfg: TritonScatterConfig, act: Callable):
  dg_ref, du_ref, ga_ref, part_ref = refs[-4:]
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  dtype = dg_ref.dtype

  def visit(t: tiling.OwnedTile):
    g, row0 = t.group, t.row0
    mask = t.own[:, None] & t.col_ok[None, :]
    tile = (pl.ds(row0, bm), pl.ds(t.ni * bn, bn))
    part_block = part_ref.at[t.ni, pl.ds(row0, bm)]

    @pl.when(g == num_groups)  # rows past the last group: zeros
    def _():
      for ref in (dg_ref, du_ref, ga_ref):
        plt.store(ref.at[tile], jnp.zeros((bm, bn), dtype), mask=mask)
      plt.store(part_block, jnp.zeros((bm,), jnp.float32), mask=t.own)

    @pl.when(g < num_groups)
    def _():
      def body(ki, acc):
        kk = ki * bk + jnp.arange(bk, dtype=jnp.int32)
        k_ok = kk < d
        do = plt.load(do_ref.at[pl.ds(row0, bm), pl.ds(ki * bk, bk)],
                      mask=t.own[:, None] & k_ok[None, :], other=0.0)
        w = plt.load(wd_ref.at[g, pl.ds(t.ni * bn, bn), pl.ds(ki * bk, bk)],
                     mask=t.col_ok[:, None] & k_ok[None, :], other=0.0)
        return acc + dot_f32(do, w, _NT)

      acc = jax.lax.fori_loop(0, tiling.cdiv(d, bk), body, jnp.zeros((bm, bn), jnp.float32))
      gate = plt.load(g_ref.at[tile], mask=mask, other=0.0)
      up = plt.load(u_ref.at[tile], mask=mask, other=0.0)
      scale = plt.load(scale_ref.at[pl.ds(row0, bm)], mask=t.own, other=0.0)[:, None]
      a32, dgate, dup = glu_math_grad(act, gate, up, scale * acc)
      a = a32.astype(dtype).astype(jnp.float32)   # the forward's a, as the down projection read it
      plt.store(dg_ref.at[tile], dgate.astype(dtype), mask=mask)
      plt.store(du_ref.at[tile], dup.astype(dtype), mask=mask)
      plt.store(ga_ref.at[tile], (scale * a).astype(dtype), mask=mask)
      plt.store(part_block, jnp.sum(acc * a, axis=1), mask=t.own)

  tiling.for_owned_tile(tile_group_ref, tile_block_ref, offsets_ref, num_active_ref,
                        num_tiles=num_tiles, num_n=num_n, group_m=cfg.group_m, block_m=bm,
                        block_n=bn, n=f, body=visit)


def glu_hidden_grad(
    do_rows: jax.Array,
    w_down: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    scale: jax.Array,
    group_sizes: jax.Array,
    *,
    activation: str,
    config: TritonScatterConfig | None = None,
    interpret: bool = False,
    poison: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The down projection's data gradient with the GLU backward in its epilogue.

  Args:
    do_rows: (M, d) output-gradient rows in sorted order (not scaled by the gates).
    w_down: (E, f, d) of do_rows' dtype.
    gate, up: (M, f) the forward's g and u (sorted order, do_rows' dtype).
    scale: (M,) float32 gate of each sorted row.
  Returns:
    (dG, dU, s * a) (M, f) in do_rows' dtype and the gate gradient's partial sums
    (cdiv(f, block_n), M) float32 (sum over axis 0: d gate of each sorted row); rows past
    sum(group_sizes) are zero.
  """
  cfg = config or TritonScatterConfig()
  m, d = do_rows.shape
  num_groups, f = w_down.shape[0], w_down.shape[1]
  meta = tiling.tile_metadata(group_sizes, m, cfg.block_m)
  num_tiles = tiling.num_row_tiles(m, num_groups, cfg.block_m)
  num_n = tiling.cdiv(f, cfg.block_n)
  out_shape = [jax.ShapeDtypeStruct((m, f), do_rows.dtype)] * 3 + [
      jax.ShapeDtypeStruct((num_n, m), jnp.float32)]
  operands = [meta.tile_group, meta.tile_block, meta.offsets, meta.num_active, scale, do_rows,
              w_down, gate, up]
  aliases = {}
  if poison:
    bufs, aliases = _poisoned(out_shape, len(operands))
    operands += bufs
  kernel = functools.partial(_hidden_grad_kernel, d=d, f=f, num_groups=num_groups, num_n=num_n,
                             num_tiles=num_tiles, cfg=cfg, act=kernel_activation(activation))
  return tuple(pl.pallas_call(
      kernel, out_shape=out_shape, grid=(num_tiles * num_n,), compiler_params=_launch(cfg),
      interpret=interpret, input_output_aliases=aliases, name="jaxmoe_glu_hidden_grad",
  )(*operands))


# ---------------------------------------------------------------------------------------------
# data_grad: dX = dG w_gate^T + dU w_up^T in one K loop, scattered to flat order.


def _data_grad_kernel(tile_group_ref, tile_block_ref, offsets_ref, num_active_ref, dst_ref,
                      dg_ref, du_ref, wg_ref, wu_ref, *refs, m: int, d: int, f: int,
                      num_groups: int, num_n: int, num_tiles: int, cfg: TritonScatterConfig):
  out_ref = refs[-1]
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k

  def visit(t: tiling.OwnedTile):
    g, row0 = t.group, t.row0
    mask = t.own[:, None] & t.col_ok[None, :]
    # Rows we do not own get the out-of-range index m: masked on the GPU, dropped by the
    # interpreter's scatter (as in the scatter kernel).
    dst = plt.load(dst_ref.at[pl.ds(row0, bm)], mask=t.own, other=m)
    out_block = out_ref.at[dst[:, None], t.cols[None, :]]

    @pl.when(g == num_groups)  # rows past the last group: zeros
    def _():
      plt.store(out_block, jnp.zeros((bm, bn), out_ref.dtype), mask=mask)

    @pl.when(g < num_groups)
    def _():
      def body(ki, acc):
        kk = ki * bk + jnp.arange(bk, dtype=jnp.int32)
        k_ok = kk < f
        rows = (pl.ds(row0, bm), pl.ds(ki * bk, bk))
        row_mask = t.own[:, None] & k_ok[None, :]
        dgt = plt.load(dg_ref.at[rows], mask=row_mask, other=0.0)
        dut = plt.load(du_ref.at[rows], mask=row_mask, other=0.0)
        w_tile = (g, pl.ds(t.ni * bn, bn), pl.ds(ki * bk, bk))
        w_mask = t.col_ok[:, None] & k_ok[None, :]
        wg = plt.load(wg_ref.at[w_tile], mask=w_mask, other=0.0)
        wu = plt.load(wu_ref.at[w_tile], mask=w_mask, other=0.0)
        return acc + dot_f32(dgt, wg, _NT) + dot_f32(dut, wu, _NT)

      acc = jax.lax.fori_loop(0, tiling.cdiv(f, bk), body, jnp.zeros((bm, bn), jnp.float32))
      plt.store(out_block, acc.astype(out_ref.dtype), mask=mask)

  tiling.for_owned_tile(tile_group_ref, tile_block_ref, offsets_ref, num_active_ref,
                        num_tiles=num_tiles, num_n=num_n, group_m=cfg.group_m, block_m=bm,
                        block_n=bn, n=d, body=visit)


def glu_data_grad(
    dgate: jax.Array,
    dup: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    group_sizes: jax.Array,
    dst: jax.Array,
    *,
    config: TritonScatterConfig | None = None,
    interpret: bool = False,
    poison: bool = False,
) -> jax.Array:
  """The up projections' data gradient in one kernel, rows in flat order.

  Args:
    dgate, dup: (M, f) sorted rows of dG and dU.
    w_gate, w_up: (E, d, f) of their dtype.
    dst: (M,) int32 flat row of each sorted row (a permutation of [0, M)).
  Returns:
    (M, d) in dgate's dtype, row dst[p] = dG[p] @ w_gate[e]^T + dU[p] @ w_up[e]^T; zero for rows
    past sum(group_sizes).
  """
  cfg = config or TritonScatterConfig()
  m, f = dgate.shape
  num_groups, d = w_gate.shape[0], w_gate.shape[1]
  meta = tiling.tile_metadata(group_sizes, m, cfg.block_m)
  num_tiles = tiling.num_row_tiles(m, num_groups, cfg.block_m)
  num_n = tiling.cdiv(d, cfg.block_n)
  out_shape = [jax.ShapeDtypeStruct((m, d), dgate.dtype)]
  operands = [meta.tile_group, meta.tile_block, meta.offsets, meta.num_active, dst, dgate, dup,
              w_gate, w_up]
  aliases = {}
  if poison:
    bufs, aliases = _poisoned(out_shape, len(operands))
    operands += bufs
  kernel = functools.partial(_data_grad_kernel, m=m, d=d, f=f, num_groups=num_groups,
                             num_n=num_n, num_tiles=num_tiles, cfg=cfg)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(num_tiles * num_n,), compiler_params=_launch(cfg),
      interpret=interpret, input_output_aliases=aliases, name="jaxmoe_glu_data_grad",
  )(*operands)[0]


# ---------------------------------------------------------------------------------------------
# What a backend record holds, its default config, check and search space.


class GluKernels(NamedTuple):
  """The fused path's kernels of one backend (glu_up, glu_hidden_grad, glu_data_grad, with
  interpret bound for the interpreted twin)."""
  up: Callable
  hidden_grad: Callable
  data_grad: Callable


KERNELS = GluKernels(glu_up, glu_hidden_grad, glu_data_grad)


def interpreted_kernels(kernels: GluKernels) -> GluKernels:
  return GluKernels(*(functools.partial(k, interpret=True) for k in kernels))


def shared_memory_bytes(config: FusedGluConfig, itemsize: int) -> dict[str, int]:
  """Estimated shared memory of each kernel: its pipelined operand tiles (num_stages copies of
  the row tiles and weight tiles one K step loads)."""
  def est(c: TritonScatterConfig, row_tiles: int, weight_tiles: int) -> int:
    return c.num_stages * (row_tiles * c.block_m + weight_tiles * c.block_n) * c.block_k * itemsize

  out = {"up": est(config.up, 1, 2), "hidden_grad": est(config.hidden_grad, 1, 1),
         "data_grad": est(config.data_grad, 2, 2)}
  if config.down is not None:
    out["down"] = est(config.down, 1, 1)
  return out


def check(shape: GroupedShape, dtypes: Dtypes, config: FusedGluConfig) -> str | None:
  """Why `config` cannot run the GLU of `shape` (M rows, K = d, N = f, G experts) in `dtypes`, or
  None. Edges are masked, so every shape fits; the limits are the operand dtype and shared
  memory."""
  if not isinstance(config, FusedGluConfig):
    return f"a FusedGluConfig, got {type(config).__name__}"
  if dtypes.operands not in SUPPORTED_DTYPES:
    return f"operands of float32, bfloat16 or float16, got {dtypes.operands}"
  for name, used in shared_memory_bytes(config, dtypes.operands.itemsize).items():
    if used > SHARED_MEMORY_BYTES:
      c = getattr(config, name)
      return (f"config.{name} {c.block_m}x{c.block_n}x{c.block_k} in {c.num_stages} stages to fit "
              f"the {SHARED_MEMORY_BYTES} bytes of shared memory (it takes about {used})")
  return None


def default_config(shape: GroupedShape, dtypes: Dtypes) -> FusedGluConfig:
  """128 x 128 tiles in 8 warps, K steps of 64 in 3 stages for 16-bit operands (the scatter
  kernel's default); data_grad loads four tiles a step, so its K steps are 32 (96 KiB of stages,
  like the others' 96-144). float32 operands take twice the bytes: K steps of 32 in 2 stages."""
  c = TritonScatterConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8,
                          num_stages=3)
  r = dataclasses.replace
  if dtypes.operands.itemsize == 2:
    return FusedGluConfig(up=c, hidden_grad=c, data_grad=r(c, block_k=32))
  c32 = r(c, block_k=32, num_stages=2)
  return FusedGluConfig(up=c32, hidden_grad=c32, data_grad=c32)


def search_space(shape: GroupedShape, dtypes: Dtypes, smoke: bool = False) -> list[FusedGluConfig]:
  """The default, then one kernel's tiles moved at a time (narrow and wide column tiles for the
  small expert widths of fine-grained MoEs, shorter row tiles, deeper pipelines), the ones that
  fit shared memory; smoke: two tiny configs cheap enough for the interpreter."""
  if smoke:
    tiny = TritonScatterConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4,
                               num_stages=2)
    small = TritonScatterConfig(block_m=32, block_n=32, block_k=16, group_m=2, num_warps=4,
                                num_stages=2)
    return [FusedGluConfig.of_tiles(small), FusedGluConfig.of_tiles(tiny)]
  base = default_config(shape, dtypes)
  r = dataclasses.replace
  variants = []
  for name in ("up", "hidden_grad", "data_grad"):
    c = getattr(base, name)
    for tiles in (r(c, block_m=64), r(c, block_n=64), r(c, block_m=64, block_n=256),
                  r(c, block_k=128, num_stages=2), r(c, num_stages=c.num_stages + 1),
                  r(c, num_warps=4)):
      variants.append(r(base, **{name: tiles}))
  return [base] + [v for v in dict.fromkeys(variants) if v != base and check(shape, dtypes, v) is None]
