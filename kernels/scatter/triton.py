"""ScatterMoE `scatter2scatter` in Pallas, lowered through Triton (any CUDA GPU; interpret on CPU).

  out[dst[p]] = scale[p] * x[src[p]] @ W[g(p)]      for p in [0, M) in expert-sorted order

`src` (gather) and `dst` (scatter) are optional: None means row p itself (grouped layout). The
gather and the scatter happen inside the kernel, so a routed input in token order is never copied
into a (M, K) grouped buffer. Rows p at or past sum(group_sizes) write zeros at dst[p].

Programs walk (row tile, column tile) pairs from `kernels.common.tiling` (`for_owned_tile`, shared
with the grouped-matmul Triton kernel), in sorted order: each program owns the rows of one expert
in one tile of `block_m` sorted rows, loads their row indices, gathers the input rows with a
masked load per K step (float32 accumulation), and writes its rows to their scattered positions
with a masked store. A tile shared by two experts is visited by two programs
whose store masks are disjoint, and since src/dst come from a permutation no two programs ever write
the same output row: there is no read-modify-write anywhere.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels.common import tiling
from kernels.common.triton_dot import dot_f32


@dataclasses.dataclass(frozen=True)
class TritonScatterConfig:
  """Tile sizes and Triton launch parameters (powers of two >= 16 for the dot dims)."""
  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  group_m: int = 8     # row tiles per swizzle band (L2 reuse of weight column tiles)
  num_warps: int = 8
  num_stages: int = 3

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      v = getattr(self, name)
      if v < 16 or v & (v - 1):
        raise ValueError(f"config.{name} must be a power of two >= 16, got {v}")
    for name in ("group_m", "num_warps", "num_stages"):
      if getattr(self, name) < 1:
        raise ValueError(f"config.{name} must be >= 1, got {getattr(self, name)}")


def _kernel(*refs, m: int, k: int, n: int, num_groups: int, num_n: int, num_tiles: int,
            cfg: TritonScatterConfig, transpose_w: bool, has_src: bool, has_dst: bool,
            has_scale: bool):
  tile_group_ref, tile_block_ref, offsets_ref, num_active_ref, *rest = refs
  src_ref = rest.pop(0) if has_src else None
  dst_ref = rest.pop(0) if has_dst else None
  scale_ref = rest.pop(0) if has_scale else None
  x_ref, w_ref, *_, out_ref = rest   # (a poison buffer aliased to out_ref may sit between)
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k

  def visit(t: tiling.OwnedTile):
    g, row0, own, cols, col_ok = t.group, t.row0, t.own, t.cols, t.col_ok
    store_mask = own[:, None] & col_ok[None, :]
    if has_dst:
      # Rows we do not own get the out-of-range index m: masked on the GPU, and dropped by the
      # interpreter's scatter (a real row index there would collide with an owned row's write).
      # The interpreter takes gathers/scatters only with array indices on every axis.
      dst = plt.load(dst_ref.at[pl.ds(row0, bm)], mask=own, other=m)
      out_block = out_ref.at[dst[:, None], cols[None, :]]
    else:
      out_block = out_ref.at[pl.ds(row0, bm), pl.ds(t.ni * bn, bn)]

    @pl.when(g == num_groups)  # rows past the last group: zeros
    def _():
      plt.store(out_block, jnp.zeros((bm, bn), out_ref.dtype), mask=store_mask)

    @pl.when(g < num_groups)
    def _():
      if has_src:
        src = plt.load(src_ref.at[pl.ds(row0, bm)], mask=own, other=0)[:, None]
      load_rows = own[:, None]

      def body(ki, acc):
        kk = ki * bk + jnp.arange(bk, dtype=jnp.int32)
        k_ok = kk < k
        x_view = (x_ref.at[src, kk[None, :]] if has_src
                  else x_ref.at[pl.ds(row0, bm), pl.ds(ki * bk, bk)])
        a = plt.load(x_view, mask=load_rows & k_ok[None, :], other=0.0)
        if transpose_w:  # w[g] stored (N, K): contract both K axes.
          b = plt.load(w_ref.at[g, pl.ds(t.ni * bn, bn), pl.ds(ki * bk, bk)],
                       mask=col_ok[:, None] & k_ok[None, :], other=0.0)
          dims = (((1,), (1,)), ((), ()))
        else:
          b = plt.load(w_ref.at[g, pl.ds(ki * bk, bk), pl.ds(t.ni * bn, bn)],
                       mask=k_ok[:, None] & col_ok[None, :], other=0.0)
          dims = (((1,), (0,)), ((), ()))
        return acc + dot_f32(a, b, dims)

      acc = jax.lax.fori_loop(0, tiling.cdiv(k, bk), body, jnp.zeros((bm, bn), jnp.float32))
      if has_scale:
        scale = plt.load(scale_ref.at[pl.ds(row0, bm)], mask=own, other=0.0)
        acc = acc * scale.astype(jnp.float32)[:, None]
      plt.store(out_block, acc.astype(out_ref.dtype), mask=store_mask)

  # Swizzled 1-D grid: bands of group_m row tiles, column tiles inside a band, so the programs
  # that run together share weight column tiles in L2.
  tiling.for_owned_tile(tile_group_ref, tile_block_ref, offsets_ref, num_active_ref,
                        num_tiles=num_tiles, num_n=num_n, group_m=cfg.group_m, block_m=bm,
                        block_n=bn, n=n, body=visit)


def scatter2scatter(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    src: jax.Array | None,
    dst: jax.Array | None,
    scale: jax.Array | None,
    *,
    m: int,
    transpose_w: bool,
    out_dtype,
    config: TritonScatterConfig | None = None,
    interpret: bool = False,
    poison: jax.Array | None = None,
) -> jax.Array:
  """Gather-matmul-scatter over M expert-sorted rows; see the module docstring.

  Args:
    x: (Mx, K) input rows; row src[p] feeds sorted row p (or row p itself when src is None).
    w: (G, K, N) weights, or (G, N, K) with transpose_w.
    group_sizes: (G,) int32 sorted rows per expert.
    src, dst: (M,) int32 gather / scatter indices or None. dst must be a permutation of [0, M).
    scale: (M,) per-sorted-row multiplier of the output (router gates) or None.
    m: the number of sorted rows M (= rows of the output).
    poison: optional (M, N) array of out_dtype the output buffer starts as (aliased): checks pass
      NaNs to prove every row is written.
  Returns:
    (M, N) array of out_dtype.
  Inputs are validated by the public op (kernels.scatter.scatter_matmul).
  """
  cfg = config or TritonScatterConfig()
  k = x.shape[1]
  num_groups = w.shape[0]
  n = w.shape[1] if transpose_w else w.shape[2]
  meta = tiling.tile_metadata(group_sizes, m, cfg.block_m)
  num_tiles = tiling.num_row_tiles(m, num_groups, cfg.block_m)
  num_n = tiling.cdiv(n, cfg.block_n)
  kernel = functools.partial(
      _kernel, m=m, k=k, n=n, num_groups=num_groups, num_n=num_n, num_tiles=num_tiles, cfg=cfg,
      transpose_w=transpose_w, has_src=src is not None, has_dst=dst is not None,
      has_scale=scale is not None,
  )
  extra = [a for a in (src, dst, scale) if a is not None]
  operands = [meta.tile_group, meta.tile_block, meta.offsets, meta.num_active, *extra, x, w]
  aliases = {}
  if poison is not None:
    if poison.shape != (m, n) or poison.dtype != jnp.dtype(out_dtype):
      raise ValueError(f"poison must be ({m}, {n}) {jnp.dtype(out_dtype)}, got {poison.shape} "
                       f"{poison.dtype}")
    aliases = {len(operands): 0}
    operands.append(poison)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(num_tiles * num_n,),
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret,
      input_output_aliases=aliases,
      name="jaxmoe_scatter2scatter",
  )(*operands)
