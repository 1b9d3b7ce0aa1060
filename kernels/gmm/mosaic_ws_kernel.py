"""Warp-specialized grouped matmul in Pallas Mosaic GPU (Hopper): the fast forward/data-grad path.

gmm:  lhs (M, K) x rhs (G, K, N) [or (G, N, K) transposed] -> (M, N)

Same tiling and semantics as `kernels.gmm.mosaic_kernel.gmm` (row tiles from `kernels.common.tiling`, masked
row stores written as TMA stores of 2^i rows, zeros for the tail past sum(group_sizes)), but each
CTA runs three warpgroups: one issues the TMA loads, two compute. A CTA tile is block_m rows x
2 * block_n columns; both compute warpgroups read the same lhs tile from shared memory and each
owns block_n columns, so every lhs byte brought in feeds twice the wgmma work of the
single-warpgroup kernel and the loads run ahead of the math without stealing its registers.

Each CTA (one per SM) first walks the tiles of the real groups, then the tail tiles (rows past
the last group, sum(group_sizes) <= row < M), which store zeros without running the K pipeline:
an expert-parallel receive buffer padded to 1.25x its expected rows has ~20% of them, and
running the K loop there would cost that share of the whole matmul.

Two options shorten the time between one tile's last wgmma and the next tile's first:
- `chain`: the per-tile pipelines run as one pipeline of pipelines (`pipeline_state` START,
  STEADY..., STOP): the load warpgroup fetches the next tile's first K steps while the compute
  warpgroups still work on (and store) this one, instead of waiting for them to finish. It needs
  (K / block_k) % max_concurrent_steps == 0 (the slots must line up from one tile to the next).
- `epi_cols`: the accumulator leaves through shared memory in (block_m, epi_cols) chunks, one
  staging slot per compute warpgroup; the smaller staging buffer leaves room for a 4th pipeline
  stage at the 128 x 256 CTA tile (see `smem_bytes`).
Both are off by default. On the H100 the 4th stage gains 3-7% at the K=2048 benchmark shapes and
loses 10-25% at the Mixtral-like one; the chain adds nothing measurable on top. The tuned table (kernels/gmm/tuned_configs.json) picks per shape.

`epilogue` (kernels.gmm.epilogue) applies an MLP's activation, or its derivative, to the
accumulator before the store. Its extra tiles pass through the same staging slot as the output:
a second output's chunk is written to it after the first's store has read it, and the
derivative's pre-activation chunk is TMA-loaded into it before the result overwrites it, so the
shared memory (and every config's fit) is unchanged.
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

from kernels.common import tiling
from kernels.gmm import epilogue as epilogue_lib
from kernels.gmm import mosaic_common as common
from kernels.gmm.epilogue import Epilogue


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
  # Output staging chunk width per compute warpgroup (None: all block_n columns at once).
  epi_cols: int | None = None
  # Chain the per-tile pipelines (see the module docstring); used only where the steps line up.
  chain: bool = False


def smem_bytes(config: MosaicWsGmmConfig, in_dtype, out_dtype) -> int:
  """Shared memory of the pipeline stages plus the output staging buffer."""
  cfg = config
  stage = (cfg.block_m * cfg.block_k + cfg.block_k * 2 * cfg.block_n) * jnp.dtype(in_dtype).itemsize
  out = 2 * cfg.block_m * _epi_cols(cfg) * jnp.dtype(out_dtype).itemsize
  return cfg.max_concurrent_steps * stage + out


def _epi_cols(cfg: MosaicWsGmmConfig) -> int:
  return cfg.block_n if cfg.epi_cols is None else cfg.epi_cols


def chains(k: int, config: MosaicWsGmmConfig) -> bool:
  """Whether this call runs its per-tile pipelines chained (`config.chain` and the K steps line
  up with the pipeline slots)."""
  return config.chain and (k // config.block_k) % config.max_concurrent_steps == 0


def check(k: int, n: int, config: MosaicWsGmmConfig, in_dtype, out_dtype) -> str | None:
  """Why `config` cannot run this call, or None: the tiles must divide K and N and fit in shared
  memory (a float32 output doubles the staging buffer: 128 KiB, which with 3 stages exceeds the
  H100's 227 KiB, seen on the GPU)."""
  cfg = config
  epi = _epi_cols(cfg)
  if k % cfg.block_k or n % (2 * cfg.block_n):
    return f"K % {cfg.block_k} == 0 and N % {2 * cfg.block_n} == 0, got K={k}, N={n}"
  # The masked stores start TMA copies at any row of the staging chunk, and a TMA copy's shared
  # memory address must be 128-byte aligned: rows of 64 bytes (32 bf16 columns) crashed with a
  # misaligned address on the H200.
  row_bytes = epi * jnp.dtype(out_dtype).itemsize
  if not (epi > 0 and cfg.block_n % epi == 0 and row_bytes % 128 == 0):
    return (f"epi_cols dividing block_n={cfg.block_n} with rows of a multiple of 128 bytes, got "
            f"{cfg.epi_cols} ({row_bytes} bytes of {jnp.dtype(out_dtype).name})")
  used = smem_bytes(cfg, in_dtype, out_dtype)
  if used > common.SMEM_BUDGET:
    return (f"at most {common.SMEM_BUDGET} bytes of shared memory, got {used} bytes for "
            f"{jnp.dtype(in_dtype).name} inputs and {jnp.dtype(out_dtype).name} output")
  return None


def supports(k: int, n: int, config: MosaicWsGmmConfig | None = None, in_dtype=jnp.bfloat16,
             out_dtype=jnp.bfloat16) -> bool:
  """Whether `config` (default: the default config) runs this call (`check` says why not)."""
  return check(k, n, config or MosaicWsGmmConfig(), in_dtype, out_dtype) is None


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool,
    out_dtype,
    config: MosaicWsGmmConfig | None = None,
    epilogue: Epilogue | None = None,
    residual: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Grouped matmul; see the module docstring. Inputs are validated by the public op.

  epilogue: None (out = the product), or an Epilogue: "activation" returns (h, act(h)),
  "activation_grad" takes the pre-activation `residual` (M, N) and returns its gradient,
  "activation_grad_value" that gradient and act(residual)."""
  cfg = config or MosaicWsGmmConfig()
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  cta_n = 2 * bn
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if not supports(k, n, cfg, lhs.dtype, out_dtype):
    raise ValueError(
        f"mosaic ws gmm needs K % {bk} == 0, N % {cta_n} == 0, epi_cols dividing block_n={bn} "
        f"(rows of a multiple of 128 bytes) and at most {common.SMEM_BUDGET} bytes of shared memory, got K={k}, N={n}, "
        f"epi_cols={cfg.epi_cols}, {smem_bytes(cfg, lhs.dtype, out_dtype)} bytes for "
        f"{jnp.dtype(lhs.dtype).name} inputs and {jnp.dtype(out_dtype).name} output")
  if (residual is not None) != (epilogue is not None and epilogue.takes_residual):
    raise ValueError(f"residual: given exactly when the epilogue takes one, got epilogue={epilogue} "
                     f"and residual={None if residual is None else residual.shape}")
  if residual is not None and residual.shape != (m, epilogue.residual_width(n)):
    raise ValueError(f"residual: must have shape {(m, epilogue.residual_width(n))}, got "
                     f"{residual.shape}")
  if epilogue is not None and epilogue.is_glu and not (
      bn == 2 * epilogue_lib.GLU_UNIT and _epi_cols(cfg) == epilogue_lib.GLU_UNIT):
    raise ValueError(f"config: a GLU epilogue needs block_n={2 * epilogue_lib.GLU_UNIT} (one gate "
                     f"and one up unit per warpgroup) and epi_cols={epilogue_lib.GLU_UNIT}, got "
                     f"block_n={bn}, epi_cols={cfg.epi_cols}")
  widths = (n,) if epilogue is None else epilogue.output_widths(n)
  meta = tiling.tile_metadata(group_sizes, m, bm)
  grid_n = n // cta_n
  tile_width = math.gcd(cfg.grid_tile_width, grid_n)
  epi = _epi_cols(cfg)
  chained = chains(k, cfg)
  lhs_transforms = common.smem_transforms(bk, lhs.dtype)
  if transpose_rhs:
    rhs_block, rhs_index, rhs_transforms = (cta_n, bk), (lambda ki: (0, ki)), common.smem_transforms(bk, rhs.dtype)
  else:
    rhs_block, rhs_index, rhs_transforms = (bk, cta_n), (lambda ki: (ki, 0)), common.smem_transforms(cta_n, rhs.dtype)

  def make_pipeline(mma_body, compute_context, pipeline_state=None):
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
        pipeline_state=pipeline_state,
    )

  def body(tile_group_gmem, tile_block_gmem, offsets_gmem, num_active_gmem, num_real_gmem,
           lhs_gmem, rhs_gmem, *refs):
    res_gmem = refs[0] if residual is not None else None
    outs_gmem = refs[1:] if residual is not None else refs
    out_gmem = outs_gmem[0]
    wg = lax.axis_index("wg")
    ignore = lambda *_, **__: None
    rhs_cols = (lambda ref: ref.at[pl.ds(0, cta_n), :]) if transpose_rhs else (
        lambda ref: ref.at[:, pl.ds(0, cta_n)])

    scratch = dict(
        allocations=make_pipeline(ignore, ignore).get_allocations(
            lhs_gmem.at[pl.ds(0, bm), :], rhs_cols(rhs_gmem.at[0])),
        o_smem=plgpu.SMEM((2, bm, epi), out_gmem.dtype))
    if res_gmem is not None:
      # One per compute warpgroup: the residual chunk's TMA load into its staging slot.
      scratch["res_barrier"] = plgpu.Barrier(num_barriers=2)

    @functools.partial(pl.run_scoped, **scratch, collective_axes="wg")
    def _scope(allocations, o_smem, res_barrier=None):
      num_real = num_real_gmem[0]
      num_active = num_active_gmem[0]

      def store_tile(mi, ni, chunk_values):
        """Writes this warpgroup's rows [row_start, row_end) of tile (mi, ni), block_n columns
        of the product, chunk by chunk through its o_smem slot: chunk_values(c, load_residual)
        gives chunk c's stores, epi columns each, as (values, output index, column) in the
        order _epilogue_targets lists them (load_residual(col) reads epi columns of the
        residual from `col`, through the slot, before anything is written there)."""
        g = tile_group_gmem[mi]
        block_start = tile_block_gmem[mi] * bm
        row_start = jnp.maximum(offsets_gmem[g], block_start)
        row_end = jnp.minimum(offsets_gmem[g + 1], block_start + bm)
        count = row_end - row_start
        for c in range(bn // epi):
          # The previous chunk's (or tile's) stores must have read o_smem before it is reused.
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)

          def load_residual(col):   # (before any store of this chunk: the slot is free)
            plgpu.copy_gmem_to_smem(res_gmem.at[pl.ds(block_start, bm), pl.ds(col, epi)],
                                    o_smem.at[wg], res_barrier.at[wg])
            plgpu.barrier_wait(res_barrier.at[wg])
            value = o_smem[wg]
            plgpu.commit_smem()   # every thread has read the slot before it is overwritten
            return value

          for j, (values, out, col) in enumerate(chunk_values(c, load_residual)):
            if j:
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            o_smem[wg] = values
            plgpu.commit_smem()
            common.store_rows(o_smem.at[wg], outs_gmem[out].at[:, pl.ds(col, epi)],
                              first=row_start - block_start, count=count, dst_offset=block_start,
                              max_rows=min(bm, m))

      # Tiles of the real groups: the K pipeline per tile, chained across tiles when enabled.
      @plgpu.nd_loop((num_real * grid_n,), collective_axes="sm")
      def _tile_loop(loop_info: plgpu.NDLoopInfo):
        mi, ni = plgpu.planar_snake(loop_info.index[0], (num_real, grid_n), 1, tile_width)
        g = tile_group_gmem[mi]
        block_start = tile_block_gmem[mi] * bm

        def compute_context(eval_pipeline):
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((bm, bn), jnp.float32))
          def _acc_scope(acc_ref):
            eval_pipeline(acc_ref)
            acc = acc_ref[...].astype(out_gmem.dtype)

            def chunk_values(c, load_residual):
              col0 = ni * cta_n + wg * bn + c * epi
              values = _epilogue_values(epilogue, acc, c, epi, col0, load_residual)
              return [(v, out, col) for v, (out, col) in
                      zip(values, _epilogue_targets(epilogue, c, epi, col0))]

            store_tile(mi, ni, chunk_values)

        def mma_body(_, a_smem, b_smem, acc_ref):
          if transpose_rhs:
            b = b_smem.at[pl.ds(wg * bn, bn), :].transpose((1, 0))
          else:
            b = b_smem.at[:, pl.ds(wg * bn, bn)]
          plgpu.wgmma(acc_ref, a_smem, b)
          plgpu.wgmma_wait(0)
          return acc_ref

        weights = rhs_gmem.at[g]
        weights = (weights.at[pl.ds(ni * cta_n, cta_n), :] if transpose_rhs
                   else weights.at[:, pl.ds(ni * cta_n, cta_n)])
        operands = (lhs_gmem.at[pl.ds(block_start, bm), :], weights)
        if not chained:
          make_pipeline(mma_body, compute_context)(*operands, allocations=allocations)
          return
        # A pipeline of pipelines: START on this SM's first tile, STOP on its last. An SM with
        # a single tile runs the plain (self-contained) pipeline.
        j, steps = loop_info.local_index, loop_info.num_local_steps

        @pl.when(steps == 1)
        def _():
          make_pipeline(mma_body, compute_context)(*operands, allocations=allocations)

        @pl.when(steps > 1)
        def _():
          state = jnp.where(j == 0, int(plgpu.PipelinePipeline.START),
                            jnp.where(j == steps - 1, int(plgpu.PipelinePipeline.STOP),
                                      int(plgpu.PipelinePipeline.STEADY)))
          make_pipeline(mma_body, compute_context, state)(*operands, allocations=allocations)

      # Tail tiles (rows past the last group): zeros, no K loop.
      @plgpu.nd_loop(((num_active - num_real) * grid_n,), collective_axes="sm")
      def _tail_loop(loop_info: plgpu.NDLoopInfo):
        lin = loop_info.index[0]
        mi, ni = num_real + lin // grid_n, lin % grid_n

        @pl.when(wg < 2)
        def _():
          zeros = jnp.zeros((bm, epi), out_gmem.dtype)
          store_tile(mi, ni, lambda c, _: [
              (zeros, out, col) for out, col in _epilogue_targets(
                  epilogue, c, epi, ni * cta_n + wg * bn + c * epi)])

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  out_types = tuple(jax.ShapeDtypeStruct((m, w), out_dtype) for w in widths)
  kernel = plgpu.kernel(
      body,
      out_type=out_types[0] if len(out_types) == 1 else out_types,
      grid=(common.num_sms(),),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
          # The activation's exp and division as the GPU's fast approximations (a few ulp of
          # float32): with the exact library calls the epilogue's temporaries spilled from
          # registers (the fused up projection took 2.2x the plain product on the H200). The
          # kernel forms have no tanh, whose approximation is too coarse (kernels.activations).
          approx_math=epilogue is not None,
      ),
      interpret=common.interpret_params(interpret),
  )
  extra = () if residual is None else (residual,)
  return kernel(meta.tile_group, meta.tile_block, meta.offsets, meta.num_active, meta.num_real,
                lhs, rhs, *extra)


def _epilogue_targets(epilogue: Epilogue | None, c: int, epi: int,
                      col0) -> list[tuple[int, jax.Array]]:
  """(output index, first column) of each store of chunk c, which covers the product's columns
  [col0, col0 + epi)."""
  if epilogue is None or epilogue.kind == "activation_grad":
    return [(0, col0)]
  if epilogue.kind in ("activation", "activation_grad_value"):
    return [(0, col0), (1, col0)]
  unit = epilogue_lib.GLU_UNIT
  if epilogue.kind == "glu":   # chunk 0 the gate unit, chunk 1 the up unit and then a
    return [(0, col0)] if c == 0 else [(0, col0), (1, (col0 // (2 * unit)) * unit)]
  # glu_grad: the chunk is unit col0 // unit of da; its gate and up sit at twice that.
  return [(0, 2 * col0), (0, 2 * col0 + unit)]


def _epilogue_values(epilogue: Epilogue | None, acc, c: int, epi: int, col0,
                     load_residual) -> list[jax.Array]:
  """The values of chunk c's stores (_epilogue_targets), from the tile `acc` (in the output
  dtype) and, for the gradients, the residual's chunks."""
  out = acc[:, c * epi:(c + 1) * epi]
  if epilogue is None:
    return [out]
  act = epilogue.activation
  if epilogue.kind == "activation":
    return [out, epilogue_lib.activation_tile(act, out)]
  if epilogue.kind == "activation_grad":
    return [epilogue_lib.activation_grad_tile(act, load_residual(col0), out)]
  if epilogue.kind == "activation_grad_value":
    h = load_residual(col0)
    return [epilogue_lib.activation_grad_tile(act, h, out), epilogue_lib.activation_tile(act, h)]
  if epilogue.kind == "glu":
    return [out] if c == 0 else [out, epilogue_lib.glu_tile(act, acc[:, :epi], out)]
  gate, up = load_residual(2 * col0), load_residual(2 * col0 + epilogue_lib.GLU_UNIT)
  return list(epilogue_lib.glu_grad_tile(act, gate, up, out))
