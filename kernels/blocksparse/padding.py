"""Padded gather/scatter between expert-sorted rows (M of them) and the padded layout (P rows).

Expert e's sorted rows [group_offsets[e], group_offsets[e+1]) land at padded rows starting at
padded_offsets[e]; the padding rows after them (up to the next multiple of block_size) are zero.
Both directions are gathers (their gradients are the matching scatter-adds, done by JAX).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.blocksparse.topology import Topology


def padded_source_rows(topo: Topology) -> jax.Array:
  """(P,) int32: the sorted row held by each padded row, or M for a padding row."""
  p = jnp.arange(topo.padded_rows, dtype=jnp.int32)
  e = jnp.searchsorted(topo.padded_offsets[1:], p, side="right")
  e = jnp.minimum(e, topo.num_experts - 1)
  src = topo.group_offsets[e] + (p - topo.padded_offsets[e])
  ok = (p < topo.padded_offsets[-1]) & (src < topo.group_offsets[e + 1])
  return jnp.where(ok, src, topo.num_rows).astype(jnp.int32)


def padded_destination_rows(topo: Topology) -> jax.Array:
  """(M,) int32: the padded row of each sorted row, or P for rows in no expert (dropped)."""
  i = jnp.arange(topo.num_rows, dtype=jnp.int32)
  e = jnp.searchsorted(topo.group_offsets[1:], i, side="right")
  ok = e < topo.num_experts
  e = jnp.minimum(e, topo.num_experts - 1)
  dst = topo.padded_offsets[e] + (i - topo.group_offsets[e])
  return jnp.where(ok, dst, topo.padded_rows).astype(jnp.int32)


def pad_rows(x_sorted: jax.Array, topo: Topology) -> jax.Array:
  """(M, K) expert-sorted rows -> (P, K) padded layout, zero padding rows."""
  if x_sorted.ndim != 2 or x_sorted.shape[0] != topo.num_rows:
    raise ValueError(
        f"x_sorted must have shape ({topo.num_rows}, K), got {tuple(x_sorted.shape)}")
  return jnp.take(x_sorted, padded_source_rows(topo), axis=0, mode="fill", fill_value=0)


def unpad_rows(y_padded: jax.Array, topo: Topology) -> jax.Array:
  """(P, N) padded layout -> (M, N) expert-sorted rows (zero for rows in no expert)."""
  if y_padded.ndim != 2 or y_padded.shape[0] != topo.padded_rows:
    raise ValueError(
        f"y_padded must have shape ({topo.padded_rows}, N), got {tuple(y_padded.shape)}")
  return jnp.take(y_padded, padded_destination_rows(topo), axis=0, mode="fill", fill_value=0)
