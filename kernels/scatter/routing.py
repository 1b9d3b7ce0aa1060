"""Expert-sorted routing metadata of the scatter matmul (a pytree of two int32 arrays).

T tokens each pick k experts; flat index f = t * k + j is token t's j-th choice. `sorted_flat`
(M = T * k,) lists the flat indices in expert-sorted order (stable), `group_sizes` (E,) the rows
per expert: sorted row p is flat choice sorted_flat[p].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SortedSlots(NamedTuple):
  """Expert-sorted routing metadata (a pytree of two int32 arrays)."""
  sorted_flat: jax.Array   # (M,) flat choice index t * k + j of each sorted row
  group_sizes: jax.Array   # (E,) sorted rows per expert


def sort_slots(expert_idx: jax.Array, num_experts: int) -> SortedSlots:
  """The (token, slot) choices of a (T, k) int32 top-k assignment sorted by expert (on device)."""
  if not hasattr(expert_idx, "ndim") or expert_idx.ndim != 2:
    raise ValueError(
        f"expert_idx must be a (T, k) integer array, got {getattr(expert_idx, 'shape', expert_idx)}"
    )
  if not jnp.issubdtype(expert_idx.dtype, jnp.integer):
    raise ValueError(f"expert_idx must have an integer dtype, got {expert_idx.dtype}")
  if not isinstance(num_experts, int) or num_experts < 1:
    raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
  flat = expert_idx.reshape(-1).astype(jnp.int32)
  sorted_flat = jnp.argsort(flat, stable=True).astype(jnp.int32)
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return SortedSlots(sorted_flat, group_sizes)
