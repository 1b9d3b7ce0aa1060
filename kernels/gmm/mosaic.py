"""The "mosaic" backend of the grouped-matmul ops: Mosaic GPU kernels (TMA + wgmma, Hopper).

Each op has two kernels, and the config's type picks one:
  grouped_matmul  MosaicWsGmmConfig -> mosaic_ws_kernel.gmm (warp-specialized, 2 x block_n wide)
                  MosaicGmmConfig   -> mosaic_kernel.gmm    (one compute warpgroup)
  group_xty       MosaicWsXtyConfig -> mosaic_xty_ws_kernel.group_xty
                  MosaicXtyConfig   -> mosaic_kernel.group_xty
Without a config (no tuned entry), the warp-specialized kernel runs where its CTA tile divides
the shape and its stages fit in shared memory for these dtypes, else the single-warpgroup one.

This module owns the backend's record (`GMM`, `XTY`): the default config for a shape, why a
config cannot run a shape (`check`), and the autotune search space.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels.common.registry import Backend
from kernels.gmm import mosaic_kernel, mosaic_ws_kernel, mosaic_xty_ws_kernel
from kernels.gmm.epilogue import GLU_UNIT, Epilogue
from kernels.gmm.mosaic_kernel import MosaicGmmConfig, MosaicXtyConfig
from kernels.gmm.mosaic_ws_kernel import MosaicWsGmmConfig
from kernels.gmm.mosaic_xty_ws_kernel import MosaicWsXtyConfig
from kernels.gmm.shapes import Dtypes, GroupedShape

GmmConfig = MosaicWsGmmConfig | MosaicGmmConfig
XtyConfig = MosaicWsXtyConfig | MosaicXtyConfig


def fits_default_tiles(m: int, k: int, n: int) -> bool:
  """Whether the single-warpgroup kernels' default tiles divide this shape (gmm: K, N; xty: K =
  x columns): the condition under which backend="pallas" picks this backend on Hopper."""
  gc, xc = MosaicGmmConfig(), MosaicXtyConfig()
  return k % gc.block_k == 0 and n % gc.block_n == 0 and k % xc.block_k == 0 and m >= 1


# ---------------------------------------------------------------------------------------------
# The ops: the config's type picks the kernel.


# The kernels' row operands are tiled 8 rows deep in global memory (the TMA tiling), so a row
# count that is not a multiple of 8 does not lower ("dimension 0 must have size smaller or a
# multiple of its tiling 8"). Such operands get zero rows appended: they lie past
# sum(group_sizes), where the kernels write zeros and read nothing.
ROW_MULTIPLE = 8


def _pad_rows(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  pad = -arrays[0].shape[0] % ROW_MULTIPLE
  if not pad:
    return arrays
  return tuple(jnp.pad(a, ((0, pad), (0, 0))) for a in arrays)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool, out_dtype,
        config: GmmConfig | None = None, epilogue: Epilogue | None = None,
        residual: jax.Array | None = None,
        interpret: bool = False) -> jax.Array | tuple[jax.Array, ...]:
  """Grouped matmul on the kernel `config` names (default: `gmm_default_config`'s choice).

  An `epilogue` (kernels.gmm.epilogue; `residual` is its (M, N) pre-activation input when it
  takes one) runs on the warp-specialized kernel only: with it, a config must be a
  MosaicWsGmmConfig, and None means that kernel's default."""
  m = lhs.shape[0]
  padded = _pad_rows(lhs) if residual is None else _pad_rows(lhs, residual)
  lhs, residual = padded[0], (padded[1] if residual is not None else None)
  if epilogue is not None:
    if config is not None and not isinstance(config, MosaicWsGmmConfig):
      raise ValueError(f"config: an epilogue runs on the warp-specialized kernel only, so the "
                       f"config must be a MosaicWsGmmConfig, got {type(config).__name__}")
    ws = True
  elif config is not None:
    ws = isinstance(config, MosaicWsGmmConfig)
  else:
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    ws = mosaic_ws_kernel.supports(lhs.shape[1], n, in_dtype=lhs.dtype, out_dtype=out_dtype)
  tuned = {} if config is None else {"config": config}
  if ws:
    out = mosaic_ws_kernel.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                               out_dtype=out_dtype, epilogue=epilogue, residual=residual,
                               interpret=interpret, **tuned)
  else:
    out = mosaic_kernel.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                            out_dtype=out_dtype, interpret=interpret, **tuned)
  if isinstance(out, tuple):
    return tuple(o if o.shape[0] == m else o[:m] for o in out)
  return out if out.shape[0] == m else out[:m]


def group_xty(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *, out_dtype,
              config: XtyConfig | None = None, interpret: bool = False) -> jax.Array:
  """Per-group x^T dy on the kernel `config` names (default: `xty_default_config`'s choice)."""
  x, dy = _pad_rows(x, dy)
  if config is not None:
    ws = isinstance(config, MosaicWsXtyConfig)
  else:
    ws = mosaic_xty_ws_kernel.supports(x.shape[1], dy.shape[1], in_dtype=x.dtype,
                                       out_dtype=out_dtype)
  impl = mosaic_xty_ws_kernel.group_xty if ws else mosaic_kernel.group_xty
  tuned = {} if config is None else {"config": config}
  return impl(x, dy, group_sizes, out_dtype=out_dtype, interpret=interpret, **tuned)


# ---------------------------------------------------------------------------------------------
# Defaults and checks.


def gmm_default_config(shape: GroupedShape, dtypes: Dtypes) -> GmmConfig:
  ws = MosaicWsGmmConfig()
  if mosaic_ws_kernel.supports(shape.k, shape.n, ws, dtypes.operands, dtypes.out):
    return ws
  return MosaicGmmConfig()


def xty_default_config(shape: GroupedShape, dtypes: Dtypes) -> XtyConfig:
  return (mosaic_xty_ws_kernel.default_config(shape.k, shape.n, dtypes.operands, dtypes.out)
          or MosaicXtyConfig())


def gmm_epilogue_config(shape: GroupedShape, dtypes: Dtypes, tuned: GmmConfig | None,
                        epilogue: Epilogue) -> MosaicWsGmmConfig | None:
  """The config of a product with an epilogue (the warp-specialized kernel runs them): the tuned
  one if it is for that kernel, else its default; None when that config cannot run the shape.
  The activation's epilogue runs on 64-column chunks: over a whole 128-column block its float32
  temporaries spilled registers (H200, Small's up projection: 1.08 ms against 0.83, the plain
  product 0.63); the derivative's, which also loads the pre-activation per chunk, does not spill
  and keeps the block (0.86 ms against 0.90 in chunks). The derivative with the activation's
  value computes both: 64-column chunks, as the activation's."""
  config = tuned if isinstance(tuned, MosaicWsGmmConfig) else MosaicWsGmmConfig()
  if epilogue.kind in ("activation", "activation_grad_value") and config.epi_cols is None:
    config = dataclasses.replace(config, epi_cols=64)
  if epilogue.is_glu:   # one gate and one up unit per warpgroup, a unit per chunk
    config = dataclasses.replace(config, block_n=2 * GLU_UNIT, epi_cols=GLU_UNIT)
  if mosaic_ws_kernel.check(shape.k, shape.n, config, dtypes.operands, dtypes.out) is not None:
    return None
  return config


def _check_simple(shape: GroupedShape, config: MosaicGmmConfig | MosaicXtyConfig) -> str | None:
  if shape.k % config.block_k or shape.n % config.block_n:
    return (f"K % {config.block_k} == 0 and N % {config.block_n} == 0, got K={shape.k}, "
            f"N={shape.n}")
  return None


def gmm_check(shape: GroupedShape, dtypes: Dtypes, config: GmmConfig) -> str | None:
  if isinstance(config, MosaicWsGmmConfig):
    return mosaic_ws_kernel.check(shape.k, shape.n, config, dtypes.operands, dtypes.out)
  return _check_simple(shape, config)


def xty_check(shape: GroupedShape, dtypes: Dtypes, config: XtyConfig) -> str | None:
  if isinstance(config, MosaicWsXtyConfig):
    return mosaic_xty_ws_kernel.check(shape.k, shape.n, config, dtypes.operands, dtypes.out)
  return _check_simple(shape, config)


# ---------------------------------------------------------------------------------------------
# Autotune search spaces: both kernels of each op, so one run compares them.


def gmm_search_space(shape: GroupedShape, dtypes: Dtypes, smoke: bool = False) -> list[GmmConfig]:
  """The warp-specialized kernel around its default: a 4th stage (made room for by 64-column
  epilogue chunks), chained per-tile pipelines, and the narrower 128x128 CTA tile that won at the
  OLMoE-like shape, each with and without the chain. Smoke: two tiny configs."""
  ws, simple = MosaicWsGmmConfig, MosaicGmmConfig
  if smoke:
    return [simple(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2, grid_tile_width=1),
            ws(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2, grid_tile_width=1)]
  return [gmm_default_config(shape, dtypes),
          ws(max_concurrent_steps=4, epi_cols=64),
          ws(max_concurrent_steps=4, epi_cols=64, chain=True),
          ws(max_concurrent_steps=4, epi_cols=64, chain=True, grid_tile_width=16),
          ws(max_concurrent_steps=2, chain=True),
          ws(block_n=64, max_concurrent_steps=4),
          ws(block_n=64, max_concurrent_steps=4, chain=True),
          ws(block_n=64, max_concurrent_steps=4, chain=True, grid_tile_width=16)]


def xty_search_space(shape: GroupedShape, dtypes: Dtypes, smoke: bool = False) -> list[XtyConfig]:
  """The warp-specialized kernel around its default (128x256 CTA tile, 64-row steps, 4 stages:
  224 KiB of shared memory, so deeper or wider variants trade depth for width), and the
  single-warpgroup kernel's default as the baseline it must beat, timed in the same run.
  block_rows=32 does not lower for either (the row mask's WGMMA layout needs 64-row blocks).
  largest_first=False: the groups in index order, to time the largest-first tile order."""
  ws, simple = MosaicWsXtyConfig, MosaicXtyConfig
  if smoke:
    return [ws(block_k=64, block_n=64, block_rows=64, max_concurrent_steps=2, grid_tile_width=1),
            simple(block_k=64, block_n=64, block_rows=64, max_concurrent_steps=2,
                   grid_tile_width=1)]
  return [xty_default_config(shape, dtypes),
          ws(max_concurrent_steps=3), ws(block_rows=128, max_concurrent_steps=2),
          ws(largest_first=False), ws(grid_tile_width=16),
          ws(block_rows=128, max_concurrent_steps=2, grid_tile_width=16),
          ws(block_n=64, max_concurrent_steps=6),
          simple()]


GMM = Backend(name="mosaic", fn=gmm, config_classes=(MosaicWsGmmConfig, MosaicGmmConfig),
              default_config=gmm_default_config, check=gmm_check,
              search_space=gmm_search_space, needs_gpu=True,
              epilogue_config=gmm_epilogue_config)
XTY = Backend(name="mosaic", fn=group_xty, config_classes=(MosaicWsXtyConfig, MosaicXtyConfig),
              default_config=xty_default_config, check=xty_check,
              search_space=xty_search_space, needs_gpu=True)

__all__ = ["GMM", "XTY", "MosaicGmmConfig", "MosaicWsGmmConfig", "MosaicWsXtyConfig",
           "MosaicXtyConfig", "fits_default_tiles", "gmm", "group_xty"]
