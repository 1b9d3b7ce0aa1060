"""Warp-specialized grouped matmul in Pallas Mosaic GPU (Hopper): the fast forward/data-grad path.

gmm:  lhs (M, K) x rhs (G, K, N) [or (G, N, K) transposed] -> (M, N)

Same tiling and semantics as `kernels.gmm_mosaic.gmm` (row tiles from `kernels.tiling`, masked
row stores written as TMA stores of 2^i rows, zeros for the tail past sum(group_sizes)), but each
CTA runs three warpgroups: one issues the TMA loads, two compute. A CTA tile is block_m rows x
2 * block_n columns; both compute warpgroups read the same lhs tile from shared memory and each
owns block_n columns, so every lhs byte brought in feeds twice the wgmma work of the
single-warpgroup kernel and the loads run ahead of the math without stealing its registers.

Tail tiles (rows past the last group, sum(group_sizes) <= row < M) skip the pipeline: every
warpgroup sees the same tile group, so all three skip it together, and the two compute
warpgroups store zeros. The tail can be many tiles (an expert-parallel receive buffer padded to
1.25x its expected rows has ~20% of them): running the K loop there, as this kernel first did,
cost that share of the whole matmul on the H100.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import tiling
from kernels.gmm_mosaic import _interpret_params, _num_sms, _smem_transforms


@dataclasses.dataclass(frozen=True)
class MosaicWsGmmConfig:
  block_m: int = 128
  block_n: int = 128         # per compute warpgroup; the CTA tile is 2 * block_n wide
  block_k: int = 64
  # 3 stages of (128x64 + 64x256) bf16 tiles plus the (2, 128, 128) output staging buffer fill
  # 208 KiB of the H100's 227 KiB of shared memory; 4 stages do not fit.
  max_concurrent_steps: int = 3
  grid_tile_width: int = 8   # planar-snake band width, in CTA column tiles
  memory_registers: int = 40


# Shared memory a CTA may use on Hopper (227 KiB), less a margin for the pipeline's barriers.
_SMEM_BUDGET = 227 * 1024 - 1024


def smem_bytes(config: MosaicWsGmmConfig, in_dtype, out_dtype) -> int:
  """Shared memory of the pipeline stages plus the output staging buffer."""
  cfg = config
  stage = (cfg.block_m * cfg.block_k + cfg.block_k * 2 * cfg.block_n) * jnp.dtype(in_dtype).itemsize
  out = 2 * cfg.block_m * cfg.block_n * jnp.dtype(out_dtype).itemsize
  return cfg.max_concurrent_steps * stage + out


def supports(k: int, n: int, config: MosaicWsGmmConfig | None = None, in_dtype=jnp.bfloat16,
             out_dtype=jnp.bfloat16) -> bool:
  """Whether the tiles divide the shape and fit in shared memory: a float32 output doubles the
  staging buffer (128 KiB), which with 3 stages exceeds the H100's 227 KiB (seen on the GPU)."""
  cfg = config or MosaicWsGmmConfig()
  return (k % cfg.block_k == 0 and n % (2 * cfg.block_n) == 0
          and smem_bytes(cfg, in_dtype, out_dtype) <= _SMEM_BUDGET)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool,
    out_dtype,
    config: MosaicWsGmmConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Grouped matmul; see the module docstring. Inputs are validated by the public op."""
  cfg = config or MosaicWsGmmConfig()
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  cta_n = 2 * bn
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if not supports(k, n, cfg, lhs.dtype, out_dtype):
    raise ValueError(
        f"mosaic ws gmm needs K % {bk} == 0, N % {cta_n} == 0 and at most {_SMEM_BUDGET} bytes of "
        f"shared memory, got K={k}, N={n}, {smem_bytes(cfg, lhs.dtype, out_dtype)} bytes for "
        f"{jnp.dtype(lhs.dtype).name} inputs and {jnp.dtype(out_dtype).name} output")
  meta = tiling.tile_metadata(group_sizes, m, bm)
  num_tiles = tiling.num_row_tiles(m, num_groups, bm)
  grid_n = n // cta_n
  tile_width = math.gcd(cfg.grid_tile_width, grid_n)
  lhs_transforms = _smem_transforms(bk, lhs.dtype)
  if transpose_rhs:
    rhs_block, rhs_index, rhs_transforms = (cta_n, bk), (lambda ki: (0, ki)), _smem_transforms(bk, rhs.dtype)
  else:
    rhs_block, rhs_index, rhs_transforms = (bk, cta_n), (lambda ki: (ki, 0)), _smem_transforms(cta_n, rhs.dtype)

  def make_pipeline(mma_body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        mma_body,
        grid=(k // bk,),
        memory_registers=cfg.memory_registers,
        in_specs=[
            plgpu.BlockSpec((bm, bk), lambda ki: (0, ki), transforms=lhs_transforms,
                            memory_space=plgpu.SMEM),
            plgpu.BlockSpec(rhs_block, rhs_index, transforms=rhs_transforms,
                            memory_space=plgpu.SMEM),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=compute_context,
    )

  def body(tile_group_gmem, tile_block_gmem, offsets_gmem, num_active_gmem,
           lhs_gmem, rhs_gmem, out_gmem):
    wg = lax.axis_index("wg")
    ignore = lambda *_, **__: None
    rhs_cols = (lambda ref: ref.at[pl.ds(0, cta_n), :]) if transpose_rhs else (
        lambda ref: ref.at[:, pl.ds(0, cta_n)])

    @functools.partial(
        pl.run_scoped,
        allocations=make_pipeline(ignore, ignore).get_allocations(
            lhs_gmem.at[pl.ds(0, bm), :], rhs_cols(rhs_gmem.at[0])),
        o_smem=plgpu.SMEM((2, bm, bn), out_gmem.dtype),
        collective_axes="wg",
    )
    def _scope(allocations, o_smem):
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
          col0 = ni * cta_n + wg * bn

          def store_rows():
            """TMA-store this warpgroup's o_smem rows [row_start, row_end) of the tile."""
            count = row_end - row_start
            smem_row = row_start - block_start
            rows = 1 << int(math.log2(min(bm, m)))
            while rows >= 1:  # unrolled: one TMA store per set bit of `count`
              @pl.when((count & rows) != 0)
              def _():
                plgpu.copy_smem_to_gmem(
                    o_smem.at[wg, pl.ds(smem_row, rows)],
                    out_gmem.at[pl.ds(block_start + smem_row, rows), pl.ds(col0, bn)],
                )
              smem_row = smem_row + (count & rows)
              rows //= 2

          def compute_context(eval_pipeline):
            @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((bm, bn), jnp.float32))
            def _acc_scope(acc_ref):
              eval_pipeline(acc_ref)
              acc = acc_ref[...].astype(out_gmem.dtype)
              # The previous tile's stores must have read o_smem before it is reused.
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)

              o_smem[wg] = acc
              plgpu.commit_smem()
              store_rows()

          def mma_body(_, a_smem, b_smem, acc_ref):
            if transpose_rhs:
              b = b_smem.at[pl.ds(wg * bn, bn), :].transpose((1, 0))
            else:
              b = b_smem.at[:, pl.ds(wg * bn, bn)]
            plgpu.wgmma(acc_ref, a_smem, b)
            plgpu.wgmma_wait(0)
            return acc_ref

          @pl.when(g < num_groups)
          def _():
            weights = rhs_gmem.at[g]
            weights = (weights.at[pl.ds(ni * cta_n, cta_n), :] if transpose_rhs
                       else weights.at[:, pl.ds(ni * cta_n, cta_n)])
            make_pipeline(mma_body, compute_context)(
                lhs_gmem.at[pl.ds(block_start, bm), :], weights, allocations=allocations,
            )

          # Tiles of the tail past the last group (the padding of an expert-parallel receive
          # buffer, say) write zeros without running the K loop: they used to run it in full.
          @pl.when((g == num_groups) & (wg < 2))
          def _():
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            o_smem[wg] = jnp.zeros((bm, bn), out_gmem.dtype)
            plgpu.commit_smem()
            store_rows()

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(_num_sms(),),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup
      ),
      interpret=_interpret_params(interpret),
  )
  return kernel(meta.tile_group, meta.tile_block, meta.offsets, meta.num_active, lhs, rhs)
