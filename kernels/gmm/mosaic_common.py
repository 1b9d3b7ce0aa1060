"""What the Mosaic GPU grouped-matmul kernels share: the SM count, shared-memory tiling and
budget, interpret-mode parameters and the masked row store.

Importing this module installs `kernels.common.mosaic_kernel_cache` (every Mosaic kernel of the
package imports it): equal kernels at different call sites then compile once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.common import mosaic_kernel_cache

mosaic_kernel_cache.install()

# Shared memory a CTA may use on Hopper (227 KiB), less a margin for the pipeline's barriers.
SMEM_BUDGET = 227 * 1024 - 1024


def num_sms() -> int:
  """SMs of the device the kernel is lowered for (the abstract mesh's, when lowering for a GPU
  from a CPU host), else of the default device; 132 (H100 SXM) when neither says."""
  abstract = jax.sharding.get_abstract_mesh().abstract_device
  if abstract is not None and abstract.num_cores:
    return abstract.num_cores
  dev = jax.devices()[0]
  return getattr(dev, "core_count", None) or 132


def smem_transforms(minor: int, dtype) -> tuple:
  """Tiling + swizzle for a shared-memory tile whose minor dimension has `minor` elements."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(minor * itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def interpret_params(interpret: bool):
  """The interpreter's parameters (race detection on) for interpret=True, else None (compile)."""
  return plgpu.InterpretGPUParams(detect_races=True) if interpret else None


def store_rows(src_smem, dst_gmem, *, first: jax.Array, count: jax.Array, dst_offset: jax.Array,
               max_rows: int) -> None:
  """TMA-stores rows [first, first + count) of src_smem to rows dst_offset + [first, first + count)
  of dst_gmem (both indexed rows first, same columns): one store per set bit of `count` (unrolled;
  max_rows bounds count), so rows outside the range, which belong to another group's visit of
  the same tile, are never written."""
  row = first
  rows = 1 << int(math.log2(max_rows))
  while rows >= 1:
    @pl.when((count & rows) != 0)
    def _():
      plgpu.copy_smem_to_gmem(src_smem.at[pl.ds(row, rows)],
                              dst_gmem.at[pl.ds(dst_offset + row, rows)])
    row = row + (count & rows)
    rows //= 2
