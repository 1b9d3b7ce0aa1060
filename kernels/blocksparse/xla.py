"""The "xla" backend: the block-sparse products as block gathers + batched matmuls + segment sums.

Only valid nonzero blocks contribute (padding blocks are masked to zero), so the FLOPs are those
of the sparse product, not of the dense masked one. Memory is Z x b x K for the gathered blocks:
fine on CPU and as a portable fallback; the Triton kernels are the fast path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.blocksparse.products import BlockSparseKernels
from kernels.blocksparse.topology import Topology
from kernels.common.registry import Backend


def _valid(topo: Topology) -> jax.Array:
  return jnp.arange(topo.max_nnz) < topo.nnz[0]


def _dot(spec, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def sdd(lhs, rhs, topo: Topology, *, transpose_lhs, transpose_rhs, out_dtype):
  a = lhs.T if transpose_lhs else lhs        # (P, K)
  w = rhs.T if transpose_rhs else rhs        # (K, E*f)
  b, k = topo.block_size, a.shape[1]
  a_blk = a.reshape(topo.num_row_blocks, b, k)[topo.row_indices]          # (Z, b, K)
  w_blk = w.reshape(k, topo.num_col_blocks, b)[:, topo.column_indices]    # (K, Z, b)
  out = _dot("zik,kzj->zij", a_blk, w_blk)
  return jnp.where(_valid(topo)[:, None, None], out, 0.0).astype(out_dtype)


def dsd(data, rhs, topo: Topology, *, transpose_lhs, transpose_rhs, out_dtype):
  w = rhs.T if transpose_rhs else rhs
  b, n = topo.block_size, w.shape[1]
  vals = jnp.where(_valid(topo)[:, None, None], data, 0)
  if transpose_lhs:   # S^T (E*f, P) @ w (P, N)
    w_blk = w.reshape(topo.num_row_blocks, b, n)[topo.row_indices]
    part = _dot("zji,zjn->zin", vals, w_blk)
    seg, lines = topo.column_indices, topo.num_col_blocks
  else:               # S (P, E*f) @ w (E*f, N)
    w_blk = w.reshape(topo.num_col_blocks, b, n)[topo.column_indices]
    part = _dot("zij,zjn->zin", vals, w_blk)
    seg, lines = topo.row_indices, topo.num_row_blocks
  out = jax.ops.segment_sum(part, seg, num_segments=lines)
  return out.reshape(lines * b, n).astype(out_dtype)


def dds(lhs, data, topo: Topology, *, transpose_lhs, transpose_rhs, out_dtype):
  a = lhs.T if transpose_lhs else lhs
  b, m = topo.block_size, a.shape[0]
  vals = jnp.where(_valid(topo)[:, None, None], data, 0)
  if transpose_rhs:   # a (M, E*f) @ S^T (E*f, P)
    a_blk = a.reshape(m, topo.num_col_blocks, b)[:, topo.column_indices]
    part = _dot("mzj,zij->zmi", a_blk, vals)
    seg, lines = topo.row_indices, topo.num_row_blocks
  else:               # a (M, P) @ S (P, E*f)
    a_blk = a.reshape(m, topo.num_row_blocks, b)[:, topo.row_indices]
    part = _dot("mzi,zij->zmj", a_blk, vals)
    seg, lines = topo.column_indices, topo.num_col_blocks
  out = jax.ops.segment_sum(part, seg, num_segments=lines)   # (lines, M, b)
  return out.transpose(1, 0, 2).reshape(m, lines * b).astype(out_dtype)


XLA = Backend(name="xla", fn=BlockSparseKernels(sdd, dsd, dds))
