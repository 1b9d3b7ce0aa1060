"""The scatter matmul's weight gradient with its rows gathered in the kernel (Pallas-Triton).

  out[g] = sum over the sorted rows p of group g of  x[x_src[p]]^T dy[dy_src[p]]     (G, K, N)

with an optional per-row multiplier s[p] applied to either operand's row (the router gate of a
combining product). x_src / dy_src None means row p itself (already grouped).

Why: in a scatter matmul's backward the weight gradient needs x and dy in expert-sorted order,
while one of them lives in token order (the up projection's input x, the combining product's
output gradient dy). Gathering it with XLA first writes a (M, K) or (M, N) copy and reads it back
(at the 1.4B fine-grained layer, T 40960, k 8, d 768, the gathers of x and dy are one 630 us XLA
fusion of a 3.2 ms backward on the H200). Here each program gathers its rows with a masked pointer
load per step instead, as the forward scatter kernel gathers x.

Scaling: the multiplier is applied to the operand named by `scale_x` (x's row when True, dy's
when False) in float32, then rounded to the operand's dtype before the product: the same rounding
as scaling that operand's gathered copy with XLA (kernels.scatter.api chooses the narrower).

One program per (group, K tile, N tile) loops over the group's rows in steps of block_m, like
`kernels.gmm.triton.group_xty`; empty groups write zeros.
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
class TritonGatherXtyConfig:
  """Tiles and launch parameters (powers of two >= 16 for the tile sizes)."""
  block_m: int = 64    # rows reduced per step
  block_k: int = 128
  block_n: int = 128
  num_warps: int = 8
  num_stages: int = 3

  def __post_init__(self):
    for name in ("block_m", "block_k", "block_n"):
      v = getattr(self, name)
      if v < 16 or v & (v - 1):
        raise ValueError(f"config.{name} must be a power of two >= 16, got {v}")
    for name in ("num_warps", "num_stages"):
      if getattr(self, name) < 1:
        raise ValueError(f"config.{name} must be >= 1, got {getattr(self, name)}")


def _kernel(*refs, k: int, n: int, cfg: TritonGatherXtyConfig, has_x_src: bool,
            has_dy_src: bool, has_scale: bool, scale_x: bool):
  offsets_ref, *rest = refs
  x_src_ref = rest.pop(0) if has_x_src else None
  dy_src_ref = rest.pop(0) if has_dy_src else None
  scale_ref = rest.pop(0) if has_scale else None
  x_ref, dy_ref, out_ref = rest
  bm, bk, bn = cfg.block_m, cfg.block_k, cfg.block_n
  g, ki, ni = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = offsets_ref[g], offsets_ref[g + 1]
  kk = ki * bk + jnp.arange(bk, dtype=jnp.int32)
  nn = ni * bn + jnp.arange(bn, dtype=jnp.int32)
  k_ok, n_ok = kk < k, nn < n

  def rows_of(src_ref, row0, rows_ok, col0, width_ids, width_ok, ref, block):
    """The (block_m, block) tile of ref at the step's rows and columns [col0, col0 + block),
    gathered through src_ref if any."""
    if src_ref is None:
      view = ref.at[pl.ds(row0, bm), pl.ds(col0, block)]
    else:
      src = plt.load(src_ref.at[pl.ds(row0, bm)], mask=rows_ok, other=0)
      view = ref.at[src[:, None], width_ids[None, :]]
    return plt.load(view, mask=rows_ok[:, None] & width_ok[None, :], other=0.0)

  def body(step, acc):
    row0 = start + step * bm
    rows_ok = row0 + jnp.arange(bm, dtype=jnp.int32) < end
    x = rows_of(x_src_ref, row0, rows_ok, ki * bk, kk, k_ok, x_ref, bk)
    dy = rows_of(dy_src_ref, row0, rows_ok, ni * bn, nn, n_ok, dy_ref, bn)
    if has_scale:
      s = plt.load(scale_ref.at[pl.ds(row0, bm)], mask=rows_ok, other=0.0)
      s = s.astype(jnp.float32)[:, None]
      if scale_x:
        x = (x.astype(jnp.float32) * s).astype(x_ref.dtype)
      else:
        dy = (dy.astype(jnp.float32) * s).astype(dy_ref.dtype)
    return acc + dot_f32(x, dy, (((0,), (0,)), ((), ())))

  num_steps = (end - start + bm - 1) // bm
  acc = jax.lax.fori_loop(0, num_steps, body, jnp.zeros((bk, bn), jnp.float32))
  plt.store(out_ref.at[g, pl.ds(ki * bk, bk), pl.ds(ni * bn, bn)], acc.astype(out_ref.dtype),
            mask=k_ok[:, None] & n_ok[None, :])


def gather_xty(
    x: jax.Array,
    dy: jax.Array,
    group_sizes: jax.Array,
    x_src: jax.Array | None,
    dy_src: jax.Array | None,
    scale: jax.Array | None = None,
    *,
    m: int,
    scale_x: bool = True,
    out_dtype,
    config: TritonGatherXtyConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Per-group (gathered x)^T (gathered dy); see the module docstring.

  Args:
    x: (Mx, K) rows; sorted row p reads x[x_src[p]] (x[p] when x_src is None).
    dy: (My, N) rows; sorted row p reads dy[dy_src[p]] (dy[p] when dy_src is None).
    group_sizes: (G,) int32 sorted rows per group; rows at or past their sum are not read.
    x_src, dy_src: (M,) int32 row indices or None.
    scale: optional (M,) per-sorted-row multiplier of x's row (scale_x) or dy's row.
    m: the number of sorted rows M.
  Returns:
    (G, K, N) array of out_dtype.
  Inputs are validated by the caller (kernels.scatter.scatter_matmul's backward).
  """
  cfg = config or TritonGatherXtyConfig()
  k, n = x.shape[1], dy.shape[1]
  num_groups = group_sizes.shape[0]
  offsets = tiling.tile_metadata(group_sizes, m, cfg.block_m).offsets
  kernel = functools.partial(
      _kernel, k=k, n=n, cfg=cfg, has_x_src=x_src is not None, has_dy_src=dy_src is not None,
      has_scale=scale is not None, scale_x=scale_x)
  extra = [a for a in (x_src, dy_src, scale) if a is not None]
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      grid=(num_groups, tiling.cdiv(k, cfg.block_k), tiling.cdiv(n, cfg.block_n)),
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret,
      name="jaxmoe_gather_xty",
  )(offsets, *extra, x, dy)
