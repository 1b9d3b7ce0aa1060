"""Dense masked references for the block-sparse products (float32, HIGHEST precision).

The block-sparse matrix S has logical shape (P, E*f) = topo.sparse_shape and is stored as its
nonzero blocks `data` (Z, b, b) = topo.data_shape; `to_dense` gives S with zeros outside the valid
blocks, `from_dense` samples a dense matrix at the topology (zeros for the padding blocks).
Operands written with a transpose flag are stored transposed: lhs (K, P) when transpose_lhs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.blocksparse.topology import Topology, block_mask

_HI = jax.lax.Precision.HIGHEST


def to_dense(data: jax.Array, topo: Topology) -> jax.Array:
  """(Z, b, b) blocks -> dense (P, E*f) float32, zero outside valid blocks."""
  b, r, c = topo.block_size, topo.num_row_blocks, topo.num_col_blocks
  valid = jnp.arange(topo.max_nnz) < topo.nnz[0]
  vals = jnp.where(valid[:, None, None], data.astype(jnp.float32), 0.0)
  dense = jnp.zeros((r, c, b, b), jnp.float32)
  rows = jnp.where(valid, topo.row_indices, r)  # out of range: dropped
  dense = dense.at[rows, topo.column_indices].set(vals, mode="drop")
  return dense.transpose(0, 2, 1, 3).reshape(r * b, c * b)


def from_dense(dense: jax.Array, topo: Topology) -> jax.Array:
  """Dense (P, E*f) -> (Z, b, b) blocks at the topology; padding blocks are zero."""
  b, r, c = topo.block_size, topo.num_row_blocks, topo.num_col_blocks
  blocks = dense.reshape(r, b, c, b).transpose(0, 2, 1, 3)
  vals = blocks[topo.row_indices, topo.column_indices]
  valid = jnp.arange(topo.max_nnz) < topo.nnz[0]
  return jnp.where(valid[:, None, None], vals, 0).astype(dense.dtype)


def _f32(x):
  return x.astype(jnp.float32)


def sdd_reference(lhs, rhs, topo: Topology, *, transpose_lhs=False, transpose_rhs=False,
                  out_dtype=None):
  """Blocks of mask * (lhs @ rhs): lhs (P, K) [(K, P)], rhs (K, E*f) [(E*f, K)] -> (Z, b, b)."""
  a = _f32(lhs).T if transpose_lhs else _f32(lhs)
  w = _f32(rhs).T if transpose_rhs else _f32(rhs)
  dense = jnp.where(block_mask(topo), jnp.dot(a, w, precision=_HI), 0.0)
  return from_dense(dense, topo).astype(out_dtype or lhs.dtype)


def dsd_reference(data, rhs, topo: Topology, *, transpose_lhs=False, transpose_rhs=False,
                  out_dtype=None):
  """S @ rhs (or S^T @ rhs): rhs (E*f, N) [(N, E*f)] -> (P, N); with transpose_lhs rhs is
  (P, N) [(N, P)] and the result (E*f, N)."""
  s = to_dense(data, topo)
  s = s.T if transpose_lhs else s
  w = _f32(rhs).T if transpose_rhs else _f32(rhs)
  return jnp.dot(s, w, precision=_HI).astype(out_dtype or data.dtype)


def dds_reference(lhs, data, topo: Topology, *, transpose_lhs=False, transpose_rhs=False,
                  out_dtype=None):
  """lhs @ S (or lhs @ S^T): lhs (M, P) [(P, M)] -> (M, E*f); with transpose_rhs lhs is
  (M, E*f) [(E*f, M)] and the result (M, P)."""
  s = to_dense(data, topo)
  s = s.T if transpose_rhs else s
  a = _f32(lhs).T if transpose_lhs else _f32(lhs)
  return jnp.dot(a, s, precision=_HI).astype(out_dtype or lhs.dtype)
