"""Grouped matmul kernels in Pallas Mosaic GPU (Hopper: TMA loads, wgmma, persistent grid).

gmm:        lhs (M, K) x rhs (G, K, N) [or (G, N, K) transposed] -> (M, N)
group_xty:  x (M, K), dy (M, N) -> (G, K, N),  out[g] = x[g rows]^T dy[g rows]

gmm: one CTA per SM loops over (row tile, column tile) pairs of `kernels.common.tiling`. Each pair runs
a TMA + wgmma software pipeline over K into a register accumulator, then writes only its own
group's rows of the tile: the accumulator goes to shared memory and out with TMA stores of
2^i rows each (TMA boxes have static shapes, the row count is dynamic, so the count is written
as a sum of powers of two). Tiles of the virtual tail group (rows past sum(group_sizes)) skip
the pipeline and store zeros.

group_xty: one CTA per SM loops over (group, K tile, N tile). The pipeline walks the group's
rows in blocks of `block_rows`; the first and last block of a group can hold rows of its
neighbours (or of the tail past sum(group_sizes)), whose x rows are replaced by zeros in shared
memory before the wgmma (a select: a NaN or inf there adds nothing). dy is not masked, so the
rows outside the group must hold finite dy values.

Shape limits (see `supports`): K and N multiples of the block sizes; M is free.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.common import tiling
from kernels.gmm import mosaic_common as common


@dataclasses.dataclass(frozen=True)
class MosaicGmmConfig:
  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  max_concurrent_steps: int = 4
  grid_tile_width: int = 8   # planar-snake band width (in column tiles) for L2 reuse


@dataclasses.dataclass(frozen=True)
class MosaicXtyConfig:
  block_k: int = 128     # rows of the (K, N) output tile
  block_n: int = 128
  block_rows: int = 64   # rows of x / dy reduced per pipeline step
  max_concurrent_steps: int = 4
  grid_tile_width: int = 8


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool,
    out_dtype,
    config: MosaicGmmConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Grouped matmul; see the module docstring. Inputs are validated by the public op."""
  cfg = config or MosaicGmmConfig()
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if k % bk or n % bn:
    raise ValueError(f"mosaic gmm needs K % {bk} == 0 and N % {bn} == 0, got K={k}, N={n}")
  meta = tiling.tile_metadata(group_sizes, m, bm)
  num_tiles = tiling.num_row_tiles(m, num_groups, bm)
  grid_n = n // bn
  tile_width = math.gcd(cfg.grid_tile_width, grid_n)

  def body(tile_group_gmem, tile_block_gmem, offsets_gmem, num_active_gmem,
           lhs_gmem, rhs_gmem, out_gmem):
    num_active = num_active_gmem[0]

    @plgpu.nd_loop((num_tiles * grid_n,), collective_axes="sm")
    def _tile_loop(loop_info: plgpu.NDLoopInfo):
      mi, ni = plgpu.planar_snake(loop_info.index[0], (num_tiles, grid_n), 1, tile_width)

      @pl.when(mi < num_active)
      def _():
        g = tile_group_gmem[mi]
        block_start = tile_block_gmem[mi] * bm
        row_start = jnp.maximum(offsets_gmem[g], block_start)
        row_end = jnp.minimum(offsets_gmem[g + 1], block_start + bm)

        def acc_scope(acc_ref):
          @pl.when(g < num_groups)  # the tail group keeps the zero accumulator
          def _():
            if transpose_rhs:
              rhs_spec = plgpu.BlockSpec((bn, bk), lambda ki: (ni, ki), delay_release=1)
              mma = lambda _, a, b: plgpu.wgmma(acc_ref, a, b.transpose((1, 0)))
            else:
              rhs_spec = plgpu.BlockSpec((bk, bn), lambda ki: (ki, ni), delay_release=1)
              mma = lambda _, a, b: plgpu.wgmma(acc_ref, a, b)
            plgpu.emit_pipeline(
                mma,
                grid=(k // bk,),
                in_specs=[
                    plgpu.BlockSpec(
                        (bm, bk), lambda ki: (tile_block_gmem[mi], ki), delay_release=1
                    ),
                    rhs_spec,
                ],
                max_concurrent_steps=cfg.max_concurrent_steps,
            )(lhs_gmem, rhs_gmem.at[g])

          return acc_ref[...]

        acc = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn), jnp.float32))

        @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bm, bn), dtype=out_gmem.dtype))
        def _store(o_smem):
          o_smem[...] = acc.astype(o_smem.dtype)
          plgpu.commit_smem()
          common.store_rows(o_smem, out_gmem.at[:, pl.ds(ni * bn, bn)], first=row_start - block_start,
                     count=row_end - row_start, dst_offset=block_start, max_rows=min(bm, m))
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(common.num_sms(),),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup
      ),
      interpret=common.interpret_params(interpret),
  )
  return kernel(meta.tile_group, meta.tile_block, meta.offsets, meta.num_active, lhs, rhs)


def group_xty(
    x: jax.Array,
    dy: jax.Array,
    group_sizes: jax.Array,
    *,
    out_dtype,
    config: MosaicXtyConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Per-group x^T dy; see the module docstring. Empty groups get zeros."""
  cfg = config or MosaicXtyConfig()
  bk, bn, br = cfg.block_k, cfg.block_n, cfg.block_rows
  m, k = x.shape
  n = dy.shape[1]
  num_groups = group_sizes.shape[0]
  if k % bk or n % bn:
    raise ValueError(f"mosaic group_xty needs K % {bk} == 0 and N % {bn} == 0, got K={k}, N={n}")
  offsets, first_block, num_blocks = tiling.group_row_blocks(group_sizes, m, br)
  grid_k, grid_n = k // bk, n // bn
  tile_width = math.gcd(cfg.grid_tile_width, grid_n)

  x_transforms = common.smem_transforms(bk, x.dtype)
  dy_transforms = common.smem_transforms(bn, dy.dtype)
  out_transforms = common.smem_transforms(bn, out_dtype)

  def body(offsets_gmem, first_block_gmem, num_blocks_gmem, x_gmem, dy_gmem, out_gmem):
    @plgpu.nd_loop((num_groups, grid_k * grid_n), collective_axes="sm")
    def _tile_loop(loop_info: plgpu.NDLoopInfo):
      g = loop_info.index[0]
      ki, ni = plgpu.planar_snake(loop_info.index[1], (grid_k, grid_n), 1, tile_width)
      start, end = offsets_gmem[g], offsets_gmem[g + 1]
      blocks = num_blocks_gmem[g]
      # Row window starting at the group's first row block; the pipeline never reads past
      # the group's last block, so the nominal window length can overhang the array.
      window = pl.ds(pl.multiple_of(first_block_gmem[g] * br, br), m)

      def acc_scope(acc_ref):
        def step(idx, x_smem, dy_smem):
          (bi,) = idx
          row0 = (first_block_gmem[g] + bi) * br

          # Zero rows of neighbouring groups in the group's first and last block.
          @pl.when((bi == 0) | (bi == blocks - 1))
          def _():
            rows = row0 + plgpu.layout_cast(
                jax.lax.broadcasted_iota(jnp.int32, (br, bk), 0), plgpu.Layout.WGMMA
            )
            keep = (rows >= start) & (rows < end)
            # A select, not a multiply by 0/1: a NaN or inf in a neighbour's row must not leak
            # (NaN * 0 is NaN).
            vals = x_smem[...]
            x_smem[...] = jnp.where(keep, vals, jnp.zeros_like(vals))
            plgpu.commit_smem()

          plgpu.wgmma(acc_ref, x_smem.transpose((1, 0)), dy_smem)
          if cfg.max_concurrent_steps == 1:
            plgpu.wgmma_wait(0)

        delay = 1 if cfg.max_concurrent_steps > 1 else 0

        @pl.when(blocks > 0)
        def _():
          plgpu.emit_pipeline(
              step,
              grid=(blocks,),
              in_specs=[
                  plgpu.BlockSpec((br, bk), lambda bi: (bi, ki), delay_release=delay,
                                  transforms=x_transforms),
                  plgpu.BlockSpec((br, bn), lambda bi: (bi, ni), delay_release=delay,
                                  transforms=dy_transforms),
              ],
              max_concurrent_steps=cfg.max_concurrent_steps,
          )(x_gmem.at[window, :], dy_gmem.at[window, :])

        return acc_ref[...]

      acc = pl.run_scoped(acc_scope, plgpu.ACC((bk, bn), jnp.float32))

      @functools.partial(
          pl.run_scoped, o_smem=plgpu.SMEM((bk, bn), dtype=out_gmem.dtype, transforms=out_transforms)
      )
      def _store(o_smem):
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            o_smem, out_gmem.at[g, pl.ds(ki * bk, bk), pl.ds(ni * bn, bn)]
        )
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      grid=(common.num_sms(),),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup
      ),
      interpret=common.interpret_params(interpret),
  )
  return kernel(offsets, first_block, num_blocks, x, dy)
