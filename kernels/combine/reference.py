"""The reference gather-and-sum: XLA gathers and a float32 weighted sum over the k picks."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def out_of_range_to_end(positions: jax.Array, m: int) -> jax.Array:
  """positions with every one outside [0, m) (negative ones too) set to m, which jnp.take's
  "fill" mode fills and .at[]'s "drop" mode drops."""
  return jnp.where((positions >= 0) & (positions < m), positions, m)


def gather_sum_reference(rows: jax.Array, positions: jax.Array, weights: jax.Array | None = None,
                         *, out_dtype=None) -> jax.Array:
  """out[t] = sum_j weights[t, j] * rows[positions[t, j]] (weights 1 when None), the products
  and the sum in float32, cast to out_dtype (default rows.dtype). A position outside [0, M)
  gathers NaN, so a bad index shows in the output (jnp.take alone would read a negative
  position from the end)."""
  t, k = positions.shape
  picked = jnp.take(rows, out_of_range_to_end(positions.reshape(-1), rows.shape[0]), axis=0,
                    mode="fill", fill_value=jnp.nan)
  picked = picked.reshape(t, k, rows.shape[1]).astype(jnp.float32)
  if weights is None:
    out = jnp.sum(picked, axis=1)
  else:
    out = jnp.einsum("tkn,tk->tn", picked, weights.astype(jnp.float32))
  return out.astype(out_dtype or rows.dtype)
