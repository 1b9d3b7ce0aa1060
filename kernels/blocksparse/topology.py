"""Block-sparse topology of the dMoE hidden activation (MegaBlocks, arXiv 2211.15841).

Rows are routed (token, slot) pairs sorted by expert; `group_sizes[e]` rows go to expert e. Each
expert's rows are padded up to a multiple of `block_size`, giving the padded layout of P rows:
  expert e owns padded rows [padded_offsets[e], padded_offsets[e+1]).
The hidden activation H (P, E*f) is block-sparse with blocks of block_size x block_size: the row
blocks of expert e are nonzero exactly in e's f/block_size column blocks.

Static bounds (JAX needs static shapes):
  num_row_blocks  R = cdiv(M, b) + E - 1   >= sum_e cdiv(group_sizes[e], b) for any sizes summing
                  to at most M (each expert adds less than one block of padding, and the total
                  padding of all experts with a remainder is at most (E-1) blocks beyond cdiv(M, b))
  padded rows     P = R * b
  nonzero blocks  Z = R * C,  C = f / b blocks per expert (each valid row block has exactly C)
Only the first `nnz[0]` nonzero blocks (and `num_valid_row_blocks[0]` row blocks) are real; the
rest are padding that every kernel writes as zeros.

Metadata (all int32, on device), MegaBlocks' names:
  row_indices, column_indices (Z,)  block row / block column of nonzero block z (row-major order,
                                    so nonzero z's values live at data[z])
  offsets (R+1,)                    CSR pointers: blocks of block row r are z in [offsets[r], offsets[r+1])
  offsets_t (E*C+1,)                transposed (CSC) pointers over block columns
  row_indices_t, block_offsets_t (Z,) for the j-th block in column-major order: its block row and
                                    its index into data
The Triton kernels read only nnz, num_valid_row_blocks, column_indices and padded_offsets: with
this structure their walks over block rows and columns are affine (see triton.py). The CSR /
CSC arrays stay as MegaBlocks' metadata, checked by the topology tests.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels.common.groups import cdiv, clipped_group_offsets


def num_row_blocks_bound(num_rows: int, num_experts: int, block_size: int) -> int:
  """Static upper bound R on the padded row blocks: cdiv(M, b) + E - 1."""
  return cdiv(num_rows, block_size) + num_experts - 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Topology:
  """Block-sparse structure of the (P, E*f) hidden activation; see the module docstring."""

  row_indices: jax.Array          # (Z,)
  column_indices: jax.Array       # (Z,)
  offsets: jax.Array              # (R+1,)
  row_indices_t: jax.Array        # (Z,)
  block_offsets_t: jax.Array      # (Z,)
  offsets_t: jax.Array            # (E*C+1,)
  nnz: jax.Array                  # (1,) valid nonzero blocks
  num_valid_row_blocks: jax.Array  # (1,)
  group_offsets: jax.Array        # (E+1,) unpadded row offsets of the sorted rows (clipped to M)
  padded_offsets: jax.Array       # (E+1,) padded row offsets, multiples of block_size
  num_rows: int = dataclasses.field(metadata=dict(static=True))         # M, unpadded rows
  num_experts: int = dataclasses.field(metadata=dict(static=True))      # E
  ffn_size: int = dataclasses.field(metadata=dict(static=True))         # f
  block_size: int = dataclasses.field(metadata=dict(static=True))       # b
  num_row_blocks: int = dataclasses.field(metadata=dict(static=True))   # R (static bound)

  @property
  def blocks_per_expert(self) -> int:
    return self.ffn_size // self.block_size

  @property
  def num_col_blocks(self) -> int:
    return self.num_experts * self.blocks_per_expert

  @property
  def max_nnz(self) -> int:
    """Z, the static bound on nonzero blocks."""
    return self.num_row_blocks * self.blocks_per_expert

  @property
  def padded_rows(self) -> int:
    """P, the static bound on padded rows."""
    return self.num_row_blocks * self.block_size

  @property
  def sparse_shape(self) -> tuple[int, int]:
    """Logical shape (P, E*f) of the block-sparse matrix."""
    return (self.padded_rows, self.num_experts * self.ffn_size)

  @property
  def data_shape(self) -> tuple[int, int, int]:
    """Shape (Z, b, b) of the stored nonzero blocks."""
    return (self.max_nnz, self.block_size, self.block_size)


def make_topology(
    group_sizes: jax.Array, num_rows: int, *, ffn_size: int, block_size: int = 128
) -> Topology:
  """Topology for `num_rows` expert-sorted rows with `group_sizes` (E,) int32 per expert.

  ffn_size (f) must be a positive multiple of block_size. If sum(group_sizes) > num_rows the group
  boundaries are clipped to num_rows, as in kernels.common.groups.
  """
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  if not isinstance(ffn_size, int) or ffn_size < 1 or ffn_size % block_size:
    raise ValueError(
        f"ffn_size must be a positive multiple of block_size={block_size}, got {ffn_size!r}")
  if not isinstance(num_rows, int) or num_rows < 1:
    raise ValueError(f"num_rows must be a positive int, got {num_rows!r}")
  if not hasattr(group_sizes, "ndim") or group_sizes.ndim != 1:
    raise ValueError(f"group_sizes must be a 1-D int32 array, got {getattr(group_sizes, 'shape', group_sizes)}")
  if jnp.dtype(group_sizes.dtype) != jnp.dtype(jnp.int32):
    raise ValueError(f"group_sizes must have dtype int32, got {jnp.dtype(group_sizes.dtype)}")

  b = block_size
  num_experts = group_sizes.shape[0]
  c = ffn_size // b
  r = num_row_blocks_bound(num_rows, num_experts, b)
  z = r * c
  group_offsets = clipped_group_offsets(group_sizes, num_rows)
  sizes = group_offsets[1:] - group_offsets[:-1]
  row_blocks = (sizes + b - 1) // b                                  # (E,) row blocks per expert
  zero = jnp.zeros((1,), jnp.int32)
  rb_offsets = jnp.concatenate([zero, jnp.cumsum(row_blocks)]).astype(jnp.int32)  # (E+1,)
  num_valid_rb = rb_offsets[-1]
  nnz = num_valid_rb * c

  # Row-major nonzero order: block z = (row block z // C, column C*expert(row) + z % C).
  zs = jnp.arange(z, dtype=jnp.int32)
  row_indices = zs // c
  # Expert of each row block: number of expert ends at or before it (E for invalid blocks).
  rb_expert = jnp.searchsorted(rb_offsets[1:], jnp.arange(r, dtype=jnp.int32), side="right")
  rb_expert = rb_expert.astype(jnp.int32)
  valid_z = zs < nnz
  column_indices = jnp.where(valid_z, jnp.minimum(rb_expert[row_indices], num_experts - 1) * c + zs % c, 0)
  row_indices = jnp.where(valid_z, row_indices, 0)
  offsets = (jnp.minimum(jnp.arange(r + 1, dtype=jnp.int32), num_valid_rb) * c).astype(jnp.int32)

  # Column-major order: column block (e, j) holds expert e's row blocks, row_blocks[e] of them.
  col_counts = jnp.repeat(row_blocks, c, total_repeat_length=num_experts * c)
  offsets_t = jnp.concatenate([zero, jnp.cumsum(col_counts)]).astype(jnp.int32)
  col_of_j = jnp.searchsorted(offsets_t[1:], zs, side="right").astype(jnp.int32)
  col_of_j = jnp.minimum(col_of_j, num_experts * c - 1)
  expert_of_j = col_of_j // c
  row_t = rb_offsets[expert_of_j] + (zs - offsets_t[col_of_j])
  row_indices_t = jnp.where(valid_z, row_t, 0).astype(jnp.int32)
  block_offsets_t = jnp.where(valid_z, row_t * c + col_of_j % c, 0).astype(jnp.int32)

  return Topology(
      row_indices=row_indices.astype(jnp.int32),
      column_indices=column_indices.astype(jnp.int32),
      offsets=offsets,
      row_indices_t=row_indices_t,
      block_offsets_t=block_offsets_t,
      offsets_t=offsets_t,
      nnz=nnz.reshape(1).astype(jnp.int32),
      num_valid_row_blocks=num_valid_rb.reshape(1).astype(jnp.int32),
      group_offsets=group_offsets,
      padded_offsets=(rb_offsets * b).astype(jnp.int32),
      num_rows=num_rows,
      num_experts=num_experts,
      ffn_size=ffn_size,
      block_size=b,
      num_row_blocks=r,
  )


def block_mask(topo: Topology) -> jax.Array:
  """(P, E*f) bool: True inside valid nonzero blocks (for dense masked references)."""
  b = topo.block_size
  p, n = topo.sparse_shape
  rb = jnp.arange(p) // b
  expert = jnp.searchsorted(topo.padded_offsets[1:] // b, rb, side="right")
  valid = rb < topo.num_valid_row_blocks[0]
  col_expert = jnp.arange(n) // topo.ffn_size
  return valid[:, None] & (expert[:, None] == col_expert[None, :])
