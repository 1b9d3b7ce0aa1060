"""Grouped matmul kernels in Pallas, lowered through Triton (any CUDA GPU; interpret mode on CPU).

gmm:        lhs (M, K) x rhs (G, K, N) [or (G, N, K) transposed] -> (M, N)
group_xty:  x (M, K), dy (M, N) -> (G, K, N),  out[g] = x[g rows]^T dy[g rows]

gmm walks (row tile, column tile) pairs from `kernels.tiling`: one program per pair computes
lhs[tile rows] @ rhs[group] over the full K with float32 accumulation and writes only the rows
of its group (a masked store), so a tile shared by two groups is written by two programs that
never touch each other's rows. The 1-D grid is swizzled in bands of `group_m` row tiles so the
programs running together share lhs row tiles and weight column tiles in L2.

group_xty gives each (group, K tile, N tile) one program that loops over the group's rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels import tiling
from kernels.triton_dot import dot_f32


@dataclasses.dataclass(frozen=True)
class TritonGmmConfig:
  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  group_m: int = 8
  num_warps: int = 8
  num_stages: int = 4


@dataclasses.dataclass(frozen=True)
class TritonXtyConfig:
  block_m: int = 64   # rows reduced per step
  block_k: int = 128
  block_n: int = 128
  num_warps: int = 8
  num_stages: int = 3


def _gmm_kernel(
    tile_group_ref, tile_block_ref, offsets_ref, num_active_ref, lhs_ref, rhs_ref, out_ref,
    *, m: int, k: int, n: int, num_groups: int, num_n: int, num_tiles: int,
    cfg: TritonGmmConfig, transpose_rhs: bool,
):
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  # Swizzle the 1-D grid: bands of group_m row tiles, column tiles inside a band.
  pid = pl.program_id(0)
  band_size = cfg.group_m * num_n
  first_tile = (pid // band_size) * cfg.group_m
  band_rows = jnp.minimum(num_tiles - first_tile, cfg.group_m)
  tile = first_tile + (pid % band_size) % band_rows
  ni = (pid % band_size) // band_rows

  @pl.when(tile < num_active_ref[0])
  def _():
    g = tile_group_ref[tile]
    row0 = tile_block_ref[tile] * bm
    rows = row0 + jnp.arange(bm, dtype=jnp.int32)
    own_rows = (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1])
    cols = ni * bn + jnp.arange(bn, dtype=jnp.int32)
    store_mask = own_rows[:, None] & (cols < n)[None, :]
    out_block = out_ref.at[pl.ds(row0, bm), pl.ds(ni * bn, bn)]

    @pl.when(g == num_groups)  # the tail past the last group: zeros
    def _():
      plt.store(out_block, jnp.zeros((bm, bn), out_ref.dtype), mask=store_mask)

    @pl.when(g < num_groups)
    def _():
      in_rows = (rows < m)[:, None]

      def body(ki, acc):
        kk = ki * bk + jnp.arange(bk, dtype=jnp.int32)
        k_ok = kk < k
        a = plt.load(
            lhs_ref.at[pl.ds(row0, bm), pl.ds(ki * bk, bk)],
            mask=in_rows & k_ok[None, :], other=0.0,
        )
        if transpose_rhs:  # rhs[g] is (N, K): contract the K axes of both.
          b = plt.load(
              rhs_ref.at[g, pl.ds(ni * bn, bn), pl.ds(ki * bk, bk)],
              mask=(cols < n)[:, None] & k_ok[None, :], other=0.0,
          )
          dims = (((1,), (1,)), ((), ()))
        else:
          b = plt.load(
              rhs_ref.at[g, pl.ds(ki * bk, bk), pl.ds(ni * bn, bn)],
              mask=k_ok[:, None] & (cols < n)[None, :], other=0.0,
          )
          dims = (((1,), (0,)), ((), ()))
        return acc + dot_f32(a, b, dims)

      acc = jax.lax.fori_loop(0, tiling.cdiv(k, bk), body, jnp.zeros((bm, bn), jnp.float32))
      plt.store(out_block, acc.astype(out_ref.dtype), mask=store_mask)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool,
    out_dtype,
    config: TritonGmmConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Grouped matmul; see the module docstring. Inputs are validated by the public op."""
  cfg = config or TritonGmmConfig()
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  meta = tiling.tile_metadata(group_sizes, m, cfg.block_m)
  num_tiles = tiling.num_row_tiles(m, num_groups, cfg.block_m)
  num_n = tiling.cdiv(n, cfg.block_n)
  kernel = functools.partial(
      _gmm_kernel, m=m, k=k, n=n, num_groups=num_groups, num_n=num_n, num_tiles=num_tiles,
      cfg=cfg, transpose_rhs=transpose_rhs,
  )
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(num_tiles * num_n,),
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret,
      name="jaxmoe_gmm",
  )(meta.tile_group, meta.tile_block, meta.offsets, meta.num_active, lhs, rhs)


def _xty_kernel(offsets_ref, x_ref, dy_ref, out_ref, *, k: int, n: int, cfg: TritonXtyConfig):
  bm, bk, bn = cfg.block_m, cfg.block_k, cfg.block_n
  g, ki, ni = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = offsets_ref[g], offsets_ref[g + 1]
  kk = ki * bk + jnp.arange(bk, dtype=jnp.int32)
  nn = ni * bn + jnp.arange(bn, dtype=jnp.int32)

  def body(step, acc):
    row0 = start + step * bm
    rows_ok = (row0 + jnp.arange(bm, dtype=jnp.int32) < end)[:, None]
    x = plt.load(
        x_ref.at[pl.ds(row0, bm), pl.ds(ki * bk, bk)], mask=rows_ok & (kk < k)[None, :], other=0.0
    )
    dy = plt.load(
        dy_ref.at[pl.ds(row0, bm), pl.ds(ni * bn, bn)], mask=rows_ok & (nn < n)[None, :], other=0.0
    )
    return acc + dot_f32(x, dy, (((0,), (0,)), ((), ())))

  num_steps = (end - start + bm - 1) // bm
  acc = jax.lax.fori_loop(0, num_steps, body, jnp.zeros((bk, bn), jnp.float32))
  plt.store(
      out_ref.at[g, pl.ds(ki * bk, bk), pl.ds(ni * bn, bn)], acc.astype(out_ref.dtype),
      mask=(kk < k)[:, None] & (nn < n)[None, :],
  )


def group_xty(
    x: jax.Array,
    dy: jax.Array,
    group_sizes: jax.Array,
    *,
    out_dtype,
    config: TritonXtyConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Per-group x^T dy; see the module docstring. Empty groups get zeros."""
  cfg = config or TritonXtyConfig()
  m, k = x.shape
  n = dy.shape[1]
  num_groups = group_sizes.shape[0]
  offsets = tiling.tile_metadata(group_sizes, m, cfg.block_m).offsets
  kernel = functools.partial(_xty_kernel, k=k, n=n, cfg=cfg)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      grid=(num_groups, tiling.cdiv(k, cfg.block_k), tiling.cdiv(n, cfg.block_n)),
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret,
      name="jaxmoe_group_xty",
  )(offsets, x, dy)
