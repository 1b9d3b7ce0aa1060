"""Plain-jnp references for the grouped-matmul family. Obviously right, not fast.

  lhs          (M, K)     rows sorted by group: rows [off[g], off[g+1]) belong to group g
  rhs          (G, K, N)  one weight matrix per group ((G, N, K) with transpose_rhs=True)
  group_sizes  (G,) int32 rows per group; off = [0, cumsum(group_sizes)]

Rows at or past sum(group_sizes) belong to no group and produce zero output rows. If
sum(group_sizes) > M, the group boundaries are clipped to M (`kernels.common.groups`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.common.groups import row_group_ids


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
