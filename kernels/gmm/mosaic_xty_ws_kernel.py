"""Warp-specialized per-group x^T dy in Pallas Mosaic GPU (Hopper): the fast weight-gradient path.

group_xty:  x (M, K), dy (M, N), group_sizes (G,) -> (G, K, N)
            out[g] = x[rows of g]^T dy[rows of g]; zeros for empty groups; rows at or past
            sum(group_sizes) belong to no group (boundaries clipped to M like the reference).

Work split: one CTA per SM loops over (group, K tile, N tile), as `kernels.gmm.mosaic_kernel.group_xty`
does; the pipeline walks the group's rows in blocks of `block_rows`. The loop hands out the
tiles round-robin (the SM's i-th tile is tile i * num_sms + sm), groups outermost, and a tile's
work is proportional to its group's row-block count; with skewed group sizes, visiting the groups
in index order leaves some SMs much more work than others. With `largest_first` (the default) the
wrapper sorts the groups by decreasing size on device (stable argsort of -group_sizes) and the
kernel visits them in that order (loop group index gi -> group order[gi]): the static round-robin
of a largest-first order, whose makespan is close to the average SM's work. Only the order of the
tiles changes: each output tile is still computed and written whole by one CTA, so the values are
the same.

Each CTA runs three warpgroups: one issues the TMA loads, two compute. The CTA output tile is
block_k x 2 * block_n: both compute warpgroups read the same (block_rows, block_k) x tile,
transposed as the wgmma's A operand straight from shared memory, and each multiplies it with its
own block_n columns of the (block_rows, 2 * block_n) dy tile. So every x byte brought in feeds
twice the wgmma work of the single-warpgroup kernel, and the loads run ahead of the math without
taking its registers.

Group boundaries: the first and last row block of a group can hold rows of its neighbours (or
of the tail past sum(group_sizes)). Each compute warpgroup zeroes those rows in its own half of
the dy tile before its wgmma; x stays untouched, so the two warpgroups never write the same
shared memory and need no barrier between them. Rows past M are zero-filled by the TMA. Each
(group, K tile, N tile) output tile is owned by exactly one CTA and written whole (no masked
stores needed: there is no shared output tile to race on). An empty group runs a pipeline of
zero steps, so its warpgroups store the untouched zero accumulator.

The accumulator leaves through a small double-buffered staging buffer in (64, 64) chunks, which
keeps shared memory for a 4-deep pipeline (see `smem_bytes`).

Shape limits (see `supports`): 16-bit operands (wgmma reads a transposed shared-memory operand
only for 16-bit types), K % block_k == 0, N % (2 * block_n) == 0; M is free.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.common import tiling
from kernels.gmm import mosaic_common as common

# Output chunk staged in shared memory per compute warpgroup and TMA store: at most (64, 64).
_EPI_ROWS = 64
_EPI_COLS = 64


@dataclasses.dataclass(frozen=True)
class MosaicWsXtyConfig:
  block_k: int = 128         # rows of the output tile (x columns), shared by both compute wgs
  block_n: int = 128         # output columns per compute warpgroup; the CTA tile is 2 * block_n wide
  block_rows: int = 64       # rows of x / dy reduced per pipeline step
  # 4 stages of (64x128 + 64x256) bf16 tiles plus the (2, 2, 64, 64) bf16 output staging use
  # 224 KiB of the H100's 227 KiB of shared memory; a float32 output needs 3 stages.
  max_concurrent_steps: int = 4
  grid_tile_width: int = 8   # planar-snake band width, in CTA column tiles
  memory_registers: int = 40
  # Visit the groups largest first (see the module docstring): the SMs take the tiles
  # round-robin, so in group order a skewed size distribution leaves some SMs with far more
  # rows to reduce than others (simulated makespan ~1.16x the average SM's work at Dirichlet(0.5)
  # over 64 groups, ~1.05x largest first). Costs one argsort of G sizes on device. Measured on
  # the H100 at the OLMoE-like shape, Dirichlet sizes: 0.789 -> 0.686 ms.
  largest_first: bool = True


def _epi_shape(cfg: MosaicWsXtyConfig) -> tuple[int, int, int]:
  """(rows, cols, slots) of each compute warpgroup's output staging buffer.

  Two slots let the store of one chunk overlap the conversion of the next. Slot = chunk index
  mod 2 restarts at every tile, so two slots are only safe with an even chunk count per tile
  (else a tile's first chunk would overwrite the slot of the previous tile's last, still
  in-flight store); an odd count gets one slot and waits for each store."""
  rows, cols = min(_EPI_ROWS, cfg.block_k), min(_EPI_COLS, cfg.block_n)
  chunks = (cfg.block_k // rows) * (cfg.block_n // cols)
  return rows, cols, 2 if chunks % 2 == 0 else 1


def smem_bytes(config: MosaicWsXtyConfig, in_dtype: Any, out_dtype: Any) -> int:
  """Shared memory of the pipeline stages plus the output staging buffer."""
  cfg = config
  stage = cfg.block_rows * (cfg.block_k + 2 * cfg.block_n) * jnp.dtype(in_dtype).itemsize
  epi_rows, epi_cols, epi_slots = _epi_shape(cfg)
  out = 2 * epi_slots * epi_rows * epi_cols * jnp.dtype(out_dtype).itemsize
  return cfg.max_concurrent_steps * stage + out


def check(k: int, n: int, cfg: MosaicWsXtyConfig, in_dtype: Any, out_dtype: Any) -> str | None:
  """Why `cfg` cannot run this call, or None when it can."""
  if jnp.dtype(in_dtype).itemsize != 2:
    return (f"16-bit operands (wgmma reads transposed x only for 16-bit types), got "
            f"{jnp.dtype(in_dtype).name}")
  # The accumulator is in the WGMMA layout (64-row blocks) and so is the boundary row mask.
  if cfg.block_k % 64 or cfg.block_rows % 64:
    return f"block_k and block_rows multiples of 64, got {cfg.block_k}, {cfg.block_rows}"
  if cfg.block_n % _epi_shape(cfg)[1] or cfg.block_n % 8:
    return f"block_n a multiple of {_EPI_COLS} (or below it, of 8), got {cfg.block_n}"
  if k % cfg.block_k or n % (2 * cfg.block_n):
    return f"K % {cfg.block_k} == 0 and N % {2 * cfg.block_n} == 0, got K={k}, N={n}"
  used = smem_bytes(cfg, in_dtype, out_dtype)
  if used > common.SMEM_BUDGET:
    return (f"at most {common.SMEM_BUDGET} bytes of shared memory, got {used} bytes for "
            f"{jnp.dtype(in_dtype).name} inputs and {jnp.dtype(out_dtype).name} output")
  return None


def supports(k: int, n: int, config: MosaicWsXtyConfig | None = None, in_dtype: Any = jnp.bfloat16,
             out_dtype: Any = jnp.bfloat16) -> bool:
  """Whether `config` (default: `default_config`'s choice) runs this call: 16-bit operands, tiles
  dividing K and N, and stages plus output staging within the H100's shared memory."""
  cfg = config or default_config(k, n, in_dtype, out_dtype)
  return cfg is not None and check(k, n, cfg, in_dtype, out_dtype) is None


def default_config(k: int, n: int, in_dtype: Any = jnp.bfloat16,
                   out_dtype: Any = jnp.bfloat16) -> MosaicWsXtyConfig | None:
  """The default tile with the deepest pipeline that fits (4 stages for a bf16 output, 3 for a
  float32 one), or None when no depth of at least 2 fits this call."""
  for steps in (4, 3, 2):
    cfg = MosaicWsXtyConfig(max_concurrent_steps=steps)
    if check(k, n, cfg, in_dtype, out_dtype) is None:
      return cfg
  return None


def group_xty(
    x: jax.Array,
    dy: jax.Array,
    group_sizes: jax.Array,
    *,
    out_dtype: Any,
    config: MosaicWsXtyConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Per-group x^T dy; see the module docstring. Inputs are validated by the public op."""
  m, k = x.shape
  n = dy.shape[1]
  cfg = config or default_config(k, n, x.dtype, out_dtype) or MosaicWsXtyConfig()
  why = check(k, n, cfg, x.dtype, out_dtype)
  if why is not None:
    raise ValueError(f"mosaic ws group_xty (config {cfg}) needs {why}")
  bk, bn, br = cfg.block_k, cfg.block_n, cfg.block_rows
  cta_n = 2 * bn
  epi_rows, epi_cols, epi_slots = _epi_shape(cfg)
  num_groups = group_sizes.shape[0]
  offsets, first_block, num_blocks = tiling.group_row_blocks(group_sizes, m, br)
  grid_k, grid_n = k // bk, n // cta_n
  tile_width = math.gcd(cfg.grid_tile_width, grid_n)
  x_transforms = common.smem_transforms(bk, x.dtype)
  dy_transforms = common.smem_transforms(cta_n, dy.dtype)
  out_transforms = common.smem_transforms(epi_cols, out_dtype)

  def make_pipeline(step, compute_context, num_steps, first):
    # Block indices count block_rows-row blocks from the array's first row: the group's row
    # blocks are first, first + 1, ..., first + num_steps - 1.
    return plgpu.emit_pipeline_warp_specialized(
        step,
        grid=(num_steps,),
        memory_registers=cfg.memory_registers,
        in_specs=[
            plgpu.BlockSpec((br, bk), lambda bi: (first + bi, 0), transforms=x_transforms,
                            memory_space=plgpu.SMEM),
            plgpu.BlockSpec((br, cta_n), lambda bi: (first + bi, 0), transforms=dy_transforms,
                            memory_space=plgpu.SMEM),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=compute_context,
    )

  # With largest_first, one more gmem operand: the group visited at loop group index gi.
  orders = ([jnp.argsort(-group_sizes, stable=True).astype(jnp.int32)]
            if cfg.largest_first else [])

  def body(offsets_gmem, first_block_gmem, num_blocks_gmem, *refs):
    *order_ref, x_gmem, dy_gmem, out_gmem = refs
    wg = lax.axis_index("wg")
    ignore = lambda *_, **__: None
    # Allocated once for all tiles (a static grid of max_concurrent_steps keeps every slot);
    # the per-tile pipelines below have the same specs and so the same buffers and barriers.
    allocations = make_pipeline(ignore, ignore, cfg.max_concurrent_steps, 0).get_allocations(
        x_gmem.at[:, pl.ds(0, bk)], dy_gmem.at[:, pl.ds(0, cta_n)])

    @functools.partial(
        pl.run_scoped,
        allocations=allocations,
        o_smem=plgpu.SMEM((2, epi_slots, epi_rows, epi_cols), out_gmem.dtype,
                          transforms=out_transforms),
        collective_axes="wg",
    )
    def _scope(allocations, o_smem):
      @plgpu.nd_loop((num_groups, grid_k * grid_n), collective_axes="sm")
      def _tile_loop(loop_info: plgpu.NDLoopInfo):
        gi = loop_info.index[0]
        g = order_ref[0][gi] if order_ref else gi   # the group this tile belongs to
        ki, ni = plgpu.planar_snake(loop_info.index[1], (grid_k, grid_n), 1, tile_width)
        start, end = offsets_gmem[g], offsets_gmem[g + 1]
        first = first_block_gmem[g]
        blocks = num_blocks_gmem[g]   # 0 for an empty group: no step, zero accumulator
        col0 = ni * cta_n + wg * bn   # this compute warpgroup's output columns

        def compute_context(eval_pipeline):
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((bk, bn), jnp.float32))
          def _acc_scope(acc_ref):
            eval_pipeline(acc_ref)
            acc = acc_ref[...].astype(out_gmem.dtype)
            chunk = 0
            for r in range(bk // epi_rows):
              for c in range(bn // epi_cols):
                slot = chunk % epi_slots
                # The store that last read this slot (this tile's or the previous one's)
                # must be done reading it; the other slot's store may still be in flight.
                plgpu.wait_smem_to_gmem(epi_slots - 1, wait_read_only=True)
                o_smem[wg, slot] = acc[r * epi_rows:(r + 1) * epi_rows,
                                       c * epi_cols:(c + 1) * epi_cols]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    o_smem.at[wg, slot],
                    out_gmem.at[g, pl.ds(ki * bk + r * epi_rows, epi_rows),
                                pl.ds(col0 + c * epi_cols, epi_cols)],
                )
                chunk += 1

        def step(idx, x_smem, dy_smem, acc_ref):
          (bi,) = idx
          dy_half = dy_smem.at[:, pl.ds(wg * bn, bn)]
          row0 = (first + bi) * br

          # Zero the rows of neighbouring groups (or of the tail) in the group's first and
          # last row block; only this warpgroup's half of dy, never the shared x tile.
          @pl.when(((bi == 0) & (start != row0)) | ((bi == blocks - 1) & (end != row0 + br)))
          def _():
            rows = row0 + plgpu.layout_cast(
                lax.broadcasted_iota(jnp.int32, (br, bn), 0), plgpu.Layout.WGMMA)
            keep = (rows >= start) & (rows < end)
            # A select, not a multiply by 0/1: a NaN in a neighbour's row must not leak.
            vals = dy_half[...]
            dy_half[...] = jnp.where(keep, vals, jnp.zeros_like(vals))
            plgpu.commit_smem()

          plgpu.wgmma(acc_ref, x_smem.transpose((1, 0)), dy_half)
          # The slot is released when the step returns: the wgmma must be done reading it.
          plgpu.wgmma_wait(0)
          return acc_ref

        make_pipeline(step, compute_context, blocks, first)(
            x_gmem.at[:, pl.ds(ki * bk, bk)], dy_gmem.at[:, pl.ds(ni * cta_n, cta_n)],
            allocations=allocations,
        )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      grid=(common.num_sms(),),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup
      ),
      interpret=common.interpret_params(interpret),
  )
  return kernel(offsets, first_block, num_blocks, *orders, x, dy)
