"""Plain-jnp references for the grouped-matmul family. Obviously right, not fast.

Conventions shared by every grouped op in this package:
  lhs          (M, K)     rows sorted by group: rows [off[g], off[g+1]) belong to group g
  rhs          (G, K, N)  one weight matrix per group ((G, N, K) with transpose_rhs=True)
  group_sizes  (G,) int32 rows per group; off = [0, cumsum(group_sizes)]

Rows at or past sum(group_sizes) belong to no group and produce zero output rows. If
sum(group_sizes) > M, the group boundaries are clipped to M: the last groups simply have
fewer rows than group_sizes says (see `clipped_group_offsets`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def gmm_reference(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    out_dtype=None,
) -> jax.Array:
  """out[m] = lhs[m] @ rhs[group(m)] (or rhs[group(m)].T), zero for rows in no group.

  Computes one full masked product per group in float32: G times the FLOPs of the real
  op, fine for tests.
  """
  m = lhs.shape[0]
  gids = row_group_ids(group_sizes, m)
  w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
  x = lhs.astype(jnp.float32)
  out = jnp.zeros((m, w.shape[2]), jnp.float32)
  for g in range(w.shape[0]):
    prod = jnp.dot(x, w[g].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    out = jnp.where((gids == g)[:, None], prod, out)
  return out.astype(out_dtype or lhs.dtype)


def group_xty_reference(
    x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *, out_dtype=None
) -> jax.Array:
  """(G, K, N): out[g] = x[rows of g].T @ dy[rows of g]; zero for empty groups.

  One full masked product per group in float32 (G times the FLOPs of the real op).
  """
  m = x.shape[0]
  gids = row_group_ids(group_sizes, m)
  dy32 = dy.astype(jnp.float32)
  outs = []
  for g in range(group_sizes.shape[0]):
    xg = jnp.where((gids == g)[:, None], x.astype(jnp.float32), 0.0)
    outs.append(jnp.dot(xg.T, dy32, precision=jax.lax.Precision.HIGHEST))
  return jnp.stack(outs).astype(out_dtype or x.dtype)
