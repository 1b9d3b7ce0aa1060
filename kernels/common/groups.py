"""Rows sorted by group: the offsets, group ids and permutations every grouped op shares.

Conventions shared by every grouped op in this package:
  rows         (M, ...)   sorted by group: rows [off[g], off[g+1]) belong to group g
  group_sizes  (G,) int32 rows per group; off = [0, cumsum(group_sizes)]

Rows at or past sum(group_sizes) belong to no group. If sum(group_sizes) > M, the group
boundaries are clipped to M: the last groups simply have fewer rows than group_sizes says (see
`clipped_group_offsets`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def pow2_at_least(n: int) -> int:
  """The smallest power of two >= n (1 for n <= 1)."""
  return 1 << max(0, n - 1).bit_length()


def clipped_group_offsets(group_sizes: jax.Array, m: int) -> jax.Array:
  """(G+1,) int32 row offsets [0, cumsum(group_sizes)] clipped to [0, m]."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  return jnp.minimum(jnp.concatenate([jnp.zeros((1,), jnp.int32), ends]), m)


def inverse_permutation(perm: jax.Array) -> jax.Array:
  """(M,) inv with inv[perm[p]] = p for a permutation perm of 0..M-1 (e.g. the sorted position of
  each row from an argsort's order): a scatter of unique indices, in perm's dtype. The values
  are traced, so that perm is a permutation is the caller's contract; its shape and dtype are
  checked."""
  if getattr(perm, "ndim", None) != 1 or not jnp.issubdtype(perm.dtype, jnp.integer):
    raise ValueError(f"perm must be a 1-D integer array, got shape "
                     f"{getattr(perm, 'shape', None)} dtype {getattr(perm, 'dtype', type(perm))}")
  return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype),
                                           unique_indices=True)


def row_group_ids(group_sizes: jax.Array, m: int) -> jax.Array:
  """(M,) int32 group of each row; G for rows past the last group (no group)."""
  offsets = clipped_group_offsets(group_sizes, m)
  rows = jnp.arange(m, dtype=jnp.int32)
  # Number of group ends at or before the row = index of the row's group.
  return jnp.sum(rows[:, None] >= offsets[None, 1:], axis=1).astype(jnp.int32)
