"""Token permutation helpers: sort (token, slot) pairs by expert, gather, unsort, combine.

T tokens, k slots each, E experts, d features.
  sort_by_expert(indices (T, k), E) -> ExpertSort(order (T*k,), token (T*k,), group_sizes (E,))
  gather_sorted(x (T, d), sort) -> (T*k, d)        rows grouped by expert, stable in token order
  combine_sorted(y (T*k, d), sort, weights (T, k)) -> (T, d)   sum_j weights[t, j] * y[slot (t, j)]

Names: the router's decision (which experts, with which weights) is a jaxmoe.router.RouterOutput;
an ExpertSort is the permutation that groups that decision's (token, slot) pairs by expert.

Also the capacity bookkeeping of the token-dropping baseline:
  capacity_positions(indices (T, k), E) -> (T, k) int32 rank of each slot in its expert's queue.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels.combine import gather_sum
from kernels.common.groups import inverse_permutation


class ExpertSort(NamedTuple):
  """Expert-sorted order of the T*k (token, slot) pairs of one routing decision.

  order: (T*k,) int32 flat slot index (t * k + j) at each sorted position.
  token: (T*k,) int32 token of each sorted position (order // k).
  inverse: (T*k,) int32 sorted position of each flat slot (argsort of order).
  group_sizes: (E,) int32 rows per expert in the sorted order.
  expert: (T*k,) int32 expert of each sorted position.
  """

  order: jax.Array
  token: jax.Array
  inverse: jax.Array
  group_sizes: jax.Array
  expert: jax.Array


def sort_by_expert(indices: jax.Array, num_experts: int) -> ExpertSort:
  """Stable sort of the (T, k) assignments by expert, so ties stay in token order."""
  t, k = indices.shape
  flat = indices.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  inverse = inverse_permutation(order)
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return ExpertSort(order, order // k, inverse, group_sizes, flat[order])


@jax.custom_vjp
def _gather_tokens(x: jax.Array, token: jax.Array, inverse: jax.Array) -> jax.Array:
  return jnp.take(x, token, axis=0)


def _gather_tokens_fwd(x, token, inverse):
  return jnp.take(x, token, axis=0), (inverse, x.shape[0])


def _gather_tokens_bwd(res, dy):
  # jnp.take's own transpose is a scatter-add of the T*k rows onto T tokens, k rows per token:
  # atomics on the GPU. Each token's k rows sit at known sorted positions (inverse), so the
  # gradient gathers them and sums over the k slots in one pass (kernels.gather_sum: float32,
  # then dy's dtype).
  inverse, t = res
  rows = dy.reshape(dy.shape[0], -1)
  dx = gather_sum(rows, inverse.reshape(t, -1), out_dtype=dy.dtype)
  return dx.reshape((t,) + dy.shape[1:]), None, None


_gather_tokens.defvjp(_gather_tokens_fwd, _gather_tokens_bwd)


def gather_sorted(x: jax.Array, dispatch: ExpertSort) -> jax.Array:
  """(T, d) -> (T*k, d): each token's row once per slot, grouped by expert.

  Its gradient sums each token's k rows by a gather over `dispatch.inverse` (no scatter-add). A
  jax.custom_vjp: reverse mode only (jax.jvp / jacfwd through it raise)."""
  return _gather_tokens(x, dispatch.token, dispatch.inverse)


def unsort(y_sorted: jax.Array, dispatch: ExpertSort, top_k: int) -> jax.Array:
  """(T*k, ...) expert-sorted rows -> (T, k, ...) in token/slot order (a gather, not a scatter).

  `inverse` is a permutation: unique_indices lets the gradient's scatter skip atomics."""
  y = jnp.take(y_sorted, dispatch.inverse, axis=0, unique_indices=True)
  return y.reshape((-1, top_k) + y_sorted.shape[1:])


def combine_sorted(y_sorted: jax.Array, dispatch: ExpertSort, weights: jax.Array) -> jax.Array:
  """(T*k, d) expert outputs -> (T, d) gate-weighted sum over each token's k slots.

  The product is taken in float32 and cast back to y's dtype: summing k bf16 terms in bf16 would
  add a rounding the grouped kernels (float32 accumulation) do not have.
  """
  y = unsort(y_sorted, dispatch, weights.shape[1])
  return weighted_sum(y, weights)


@jax.checkpoint
def weighted_sum(y: jax.Array, weights: jax.Array) -> jax.Array:
  """(T, k, d), (T, k) -> (T, d) in y's dtype, the products and sum in float32 (combine_sorted
  and the capacity path). Under jax.checkpoint the backward pass keeps y as given (16-bit)
  rather than its float32 copy."""
  out = jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights.astype(jnp.float32))
  return out.astype(y.dtype)


def capacity_positions(indices: jax.Array, num_experts: int) -> jax.Array:
  """(T, k) int32 queue position of each slot at its expert, GShard priority order.

  All first choices come before all second choices (and so on), each in token order: a token's
  best expert is the last thing dropped. A slot is kept iff its position < capacity.
  """
  t, k = indices.shape
  # Slot-major flat order: position p = j * T + t.
  one_hot = jax.nn.one_hot(indices.T.reshape(-1), num_experts, dtype=jnp.int32)   # (k*T, E)
  ranks = jnp.cumsum(one_hot, axis=0) - 1
  pos = jnp.sum(ranks * one_hot, axis=1)                                            # (k*T,)
  return pos.reshape(k, t).T
