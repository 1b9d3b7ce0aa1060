"""Token-dropping MoE (Switch/GShard baseline): fixed per-expert capacity, dense batched matmuls.

Each expert has C slots (MoEConfig.capacity). Slots are filled in GShard priority order (all first
choices in token order, then all second choices, ...); an assignment past its expert's C-th slot is
dropped: it contributes nothing, so a token whose every assignment is dropped leaves the layer as
zero and passes through the transformer block's residual unchanged (Switch). Combine weights are
not renormalized after drops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe import dispatch
from jaxmoe.experts import RoutedExperts
from jaxmoe.recompute import checkpointed


def capacity_experts(experts: RoutedExperts, x: jax.Array, indices: jax.Array, weights: jax.Array,
                     capacity: int, recompute: bool = False
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x (T, d), indices/weights (T, k) -> (y (T, d), kept (T, k) bool, dropped_fraction f32 scalar).

  recompute: run the experts under jax.checkpoint (MoEConfig.remat_experts: the (E, C, d_ff)
  hidden arrays are recomputed, not kept)."""
  t, k = indices.shape
  e = experts.config.num_experts
  d = x.shape[-1]
  pos = dispatch.capacity_positions(indices, e)
  kept = pos < capacity
  # Flat buffer row of each kept assignment; dropped ones point past the end and are discarded by
  # mode="drop" on the way in and read back as zeros by mode="fill" on the way out.
  slot = jnp.where(kept, indices * capacity + pos, e * capacity).reshape(-1)
  rows = jnp.repeat(x.astype(experts.dtype), k, axis=0)                           # (T*k, d)
  buf = jnp.zeros((e * capacity, d), rows.dtype).at[slot].set(rows, mode="drop")
  buf = buf.reshape(e, capacity, d)
  out = (checkpointed(experts, buf, apply=RoutedExperts.apply_batched) if recompute
         else experts.apply_batched(buf)).reshape(e * capacity, d)
  y_slots = jnp.take(out, slot, axis=0, mode="fill", fill_value=0).reshape(t, k, d)
  y = dispatch.weighted_sum(y_slots, weights)                                     # out's dtype
  dropped = jnp.mean(jnp.logical_not(kept).astype(jnp.float32))  # exactly 0 when nothing drops
  return y, kept, dropped
