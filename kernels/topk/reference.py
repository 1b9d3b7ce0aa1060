"""The reference top-k: jax.lax.top_k over the last axis, indices as int32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_reference(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(values (T, k) of x's dtype, indices (T, k) int32) of jax.lax.top_k(x, k): best first,
  lowest index first among equal scores, NaN and signed zeros in XLA's total order."""
  values, indices = jax.lax.top_k(x, k)
  return values, indices.astype(jnp.int32)
