"""Block-sparse products as Pallas kernels lowered through Triton (GPU; interpret mode on CPU).

Layouts (see topology.py): S is the (P, E*f) block-sparse matrix stored as data (Z, b, b).
  sdd: one program per nonzero block z (grid Z, the static bound): data[z] = lhs[row block] @
       rhs[:, column block] with a K loop; programs z >= nnz write zeros.
  dsd: one program per (output block line, N tile): loops over the nonzero blocks of its block row
       (CSR arrays) or, for S^T, of its block column (the transposed CSC arrays).
  dds: one program per (M tile, output block line): loops over the blocks of its block column
       (CSC) or, for S^T, of its block row (CSR).
All three walk a 1-D grid swizzled in bands of `group_lines` block rows/columns (as a tiled GEMM
rasterizes), so the programs running together share their sparse blocks and dense tiles in L2.
Each output tile is owned by exactly one program (block rows/columns never straddle two lines), so
there is no shared-tile race; every program writes its tile, zeros for empty lines.
Metadata arrays are passed as ordinary int32 operands and read with scalar loads.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels.blocksparse.topology import Topology, cdiv
from kernels.triton_dot import dot_f32


@dataclasses.dataclass(frozen=True)
class BlockSparseConfig:
  """Tile sizes for the Triton kernels (the sparse block size itself comes from the topology).

  block_k: K step of sdd.  block_n: dense N tile of dsd.  block_m: dense M tile of dds.
  All must be powers of two >= 16 for Triton dots.  group_lines: block rows (sdd, dsd) or block
  columns (dds) per band of the swizzled grid.
  """
  block_k: int = 64
  block_n: int = 128
  block_m: int = 128
  group_lines: int = 8
  num_warps: int = 8
  num_stages: int = 3

  def validate(self) -> None:
    for name in ("block_k", "block_n", "block_m"):
      v = getattr(self, name)
      if v < 16 or v & (v - 1):
        raise ValueError(f"config.{name} must be a power of two >= 16, got {v}")
    if self.group_lines < 1:
      raise ValueError(f"config.group_lines must be >= 1, got {self.group_lines}")


def _params(cfg: BlockSparseConfig):
  return plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _swizzle(num_lines: int, num_other: int, group: int):
  """(line, other) of this program on a 1-D grid of num_lines * num_other programs, in bands of
  `group` lines: consecutive programs sweep the lines of a band before moving to the next `other`."""
  pid = pl.program_id(0)
  band_size = group * num_other
  first = (pid // band_size) * group
  band_lines = jnp.minimum(num_lines - first, group)
  return first + (pid % band_size) % band_lines, (pid % band_size) // band_lines


# Contract dim 1 of a with dim 0 of b, optionally with either operand stored transposed.
def _mm(a, b, ta: bool, tb: bool):
  dims = (((0,) if ta else (1,), (1,) if tb else (0,)), ((), ()))
  return dot_f32(a, b, dims)


def _sdd_kernel(nnz_ref, row_ref, col_ref, lhs_ref, rhs_ref, out_ref, *, k, b, cfg, ta, tb,
                num_rows, per_row):
  # Every valid block row holds exactly `per_row` blocks (its expert's), so z = row * per_row + j.
  r, j = _swizzle(num_rows, per_row, cfg.group_lines)
  z = r * per_row + j
  bk = cfg.block_k

  @pl.when(z >= nnz_ref[0])
  def _():
    out_ref[z] = jnp.zeros((b, b), out_ref.dtype)

  @pl.when(z < nnz_ref[0])
  def _():
    r0 = row_ref[z] * b
    c0 = col_ref[z] * b
    ragged = k % bk != 0

    def body(ki, acc):
      k0 = ki * bk
      kmask = (k0 + jnp.arange(bk, dtype=jnp.int32)) < k
      if ta:  # lhs (K, P)
        a_idx, a_mask = lhs_ref.at[pl.ds(k0, bk), pl.ds(r0, b)], kmask[:, None]
      else:
        a_idx, a_mask = lhs_ref.at[pl.ds(r0, b), pl.ds(k0, bk)], kmask[None, :]
      if tb:  # rhs (E*f, K)
        w_idx, w_mask = rhs_ref.at[pl.ds(c0, b), pl.ds(k0, bk)], kmask[None, :]
      else:
        w_idx, w_mask = rhs_ref.at[pl.ds(k0, bk), pl.ds(c0, b)], kmask[:, None]
      if ragged:
        a = plt.load(a_idx, mask=a_mask, other=0.0)
        w = plt.load(w_idx, mask=w_mask, other=0.0)
      else:
        a, w = a_idx[...], w_idx[...]
      return acc + _mm(a, w, ta, tb)

    acc = jax.lax.fori_loop(0, cdiv(k, bk), body, jnp.zeros((b, b), jnp.float32))
    out_ref[z] = acc.astype(out_ref.dtype)


def sdd(lhs, rhs, topo: Topology, *, transpose_lhs, transpose_rhs, out_dtype,
        config: BlockSparseConfig | None = None, interpret: bool = False):
  """(Z, b, b) blocks of lhs @ rhs at the topology; inputs validated by the public op."""
  cfg = config or BlockSparseConfig()
  k = lhs.shape[0] if transpose_lhs else lhs.shape[1]
  b = topo.block_size
  kernel = functools.partial(_sdd_kernel, k=k, b=b, cfg=cfg, ta=transpose_lhs, tb=transpose_rhs,
                             num_rows=topo.num_row_blocks, per_row=topo.blocks_per_expert)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(topo.data_shape, out_dtype),
      grid=(topo.max_nnz,),
      compiler_params=_params(cfg),
      interpret=interpret,
      name="jaxmoe_bsr_sdd",
  )(topo.nnz, topo.row_indices, topo.column_indices, lhs, rhs)


def _lines(topo: Topology, by_column: bool):
  """(pointers, data index, other-side block index) of block rows (CSR) or block columns (CSC)."""
  if by_column:
    return topo.offsets_t, topo.block_offsets_t, topo.row_indices_t
  return topo.offsets, jnp.arange(topo.max_nnz, dtype=jnp.int32), topo.column_indices


def _dsd_kernel(ptr_ref, blk_ref, other_ref, data_ref, rhs_ref, out_ref, *, n, b, cfg, ta, tb,
                num_lines):
  line, ni = _swizzle(num_lines, cdiv(n, cfg.block_n), cfg.group_lines)
  bn = cfg.block_n
  n0 = ni * bn
  nmask = (n0 + jnp.arange(bn, dtype=jnp.int32)) < n
  ragged = n % bn != 0

  def body(t, acc):
    s = data_ref[blk_ref[t]]                     # (b, b)
    o0 = other_ref[t] * b
    if tb:  # rhs (N, K_sparse)
      idx, mask = rhs_ref.at[pl.ds(n0, bn), pl.ds(o0, b)], nmask[:, None]
    else:
      idx, mask = rhs_ref.at[pl.ds(o0, b), pl.ds(n0, bn)], nmask[None, :]
    w = plt.load(idx, mask=mask, other=0.0) if ragged else idx[...]
    return acc + _mm(s, w, ta, tb)

  acc = jax.lax.fori_loop(ptr_ref[line], ptr_ref[line + 1], body, jnp.zeros((b, bn), jnp.float32))
  out = out_ref.at[pl.ds(line * b, b), pl.ds(n0, bn)]
  if ragged:
    plt.store(out, acc.astype(out_ref.dtype), mask=nmask[None, :])
  else:
    out[...] = acc.astype(out_ref.dtype)


def dsd(data, rhs, topo: Topology, *, transpose_lhs, transpose_rhs, out_dtype,
        config: BlockSparseConfig | None = None, interpret: bool = False):
  """S @ rhs or S^T @ rhs (rhs optionally stored transposed); see the module docstring."""
  cfg = config or BlockSparseConfig()
  b = topo.block_size
  n = rhs.shape[0] if transpose_rhs else rhs.shape[1]
  ptr, blk, other = _lines(topo, by_column=transpose_lhs)
  num_lines = ptr.shape[0] - 1
  kernel = functools.partial(_dsd_kernel, n=n, b=b, cfg=cfg, ta=transpose_lhs, tb=transpose_rhs,
                             num_lines=num_lines)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_lines * b, n), out_dtype),
      grid=(num_lines * cdiv(n, cfg.block_n),),
      compiler_params=_params(cfg),
      interpret=interpret,
      name="jaxmoe_bsr_dsd",
  )(ptr, blk, other, data, rhs)


def _dds_kernel(ptr_ref, blk_ref, other_ref, lhs_ref, data_ref, out_ref, *, m, b, cfg, ta, tb,
                num_lines):
  line, mi = _swizzle(num_lines, cdiv(m, cfg.block_m), cfg.group_lines)
  bm = cfg.block_m
  m0 = mi * bm
  mmask = (m0 + jnp.arange(bm, dtype=jnp.int32)) < m
  ragged = m % bm != 0

  def body(t, acc):
    s = data_ref[blk_ref[t]]                     # (b, b)
    o0 = other_ref[t] * b
    if ta:  # lhs (K_sparse, M)
      idx, mask = lhs_ref.at[pl.ds(o0, b), pl.ds(m0, bm)], mmask[None, :]
    else:
      idx, mask = lhs_ref.at[pl.ds(m0, bm), pl.ds(o0, b)], mmask[:, None]
    a = plt.load(idx, mask=mask, other=0.0) if ragged else idx[...]
    return acc + _mm(a, s, ta, tb)

  acc = jax.lax.fori_loop(ptr_ref[line], ptr_ref[line + 1], body, jnp.zeros((bm, b), jnp.float32))
  out = out_ref.at[pl.ds(m0, bm), pl.ds(line * b, b)]
  if ragged:
    plt.store(out, acc.astype(out_ref.dtype), mask=mmask[:, None])
  else:
    out[...] = acc.astype(out_ref.dtype)


def dds(lhs, data, topo: Topology, *, transpose_lhs, transpose_rhs, out_dtype,
        config: BlockSparseConfig | None = None, interpret: bool = False):
  """lhs @ S or lhs @ S^T (lhs optionally stored transposed); see the module docstring."""
  cfg = config or BlockSparseConfig()
  b = topo.block_size
  m = lhs.shape[1] if transpose_lhs else lhs.shape[0]
  # lhs @ S walks S's block columns (CSC); lhs @ S^T walks S's block rows (CSR).
  ptr, blk, other = _lines(topo, by_column=not transpose_rhs)
  num_lines = ptr.shape[0] - 1
  kernel = functools.partial(_dds_kernel, m=m, b=b, cfg=cfg, ta=transpose_lhs, tb=transpose_rhs,
                             num_lines=num_lines)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, num_lines * b), out_dtype),
      grid=(num_lines * cdiv(m, cfg.block_m),),
      compiler_params=_params(cfg),
      interpret=interpret,
      name="jaxmoe_bsr_dds",
  )(ptr, blk, other, lhs, data)
