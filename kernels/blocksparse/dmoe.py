"""Dropless MoE expert computation (MegaBlocks dMoE) from the block-sparse ops, as pure functions.

  x (T, d) tokens, expert_indices (T, k) int32 in [0, E) (not checked: values are traced),
  combine_weights (T, k) any float dtype (the combine runs in float32)
  w1 (E, d, f) input (gate) projection, w3 (E, d, f) up projection (GLU only), w2 (E, f, d) output
  MLP:  y[t] = sum_j c[t, j] * act(x[t] w1[e]) w2[e]                 with e = expert_indices[t, j]
  GLU:  y[t] = sum_j c[t, j] * (act(x[t] w1[e]) * (x[t] w3[e])) w2[e]

Steps: pad_to_blocks (sort by expert, pad each expert to block_size, topology) -> padded gather of tokens
-> sdd with the (d, E*f) concatenated first weight(s) -> elementwise activation on the nonzero
blocks -> dsd with the (E*f, d) second weight -> gather back to (token, slot) and combine.
Gradients come from the ops' custom VJPs (and JAX for the gathers and the activation).
f must be a multiple of block_size. Dropless: every (token, slot) is computed.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from kernels.blocksparse import api as ops
from kernels.blocksparse.padding import padded_destination_rows, padded_source_rows
from kernels.blocksparse.topology import Topology, make_topology
from kernels.blocksparse.triton import BlockSparseConfig
from kernels.common import validation
from kernels.common.groups import inverse_permutation
from kernels.hidden import hidden


class PaddedRows(NamedTuple):
  topo: Topology
  source_token: jax.Array     # (P,) int32 token held by each padded row; T for padding rows
  slot_padded_row: jax.Array  # (T*k,) int32 padded row of each (token, slot), row-major


def pad_to_blocks(expert_indices: jax.Array, num_experts: int, *, ffn_size: int,
          block_size: int = 128) -> PaddedRows:
  """Sort (token, slot) pairs by expert (stable), pad to block_size, build the topology.

  P = topo.padded_rows = (cdiv(T*k, b) + E - 1) * b is the static bound on padded rows.
  """
  if expert_indices.ndim != 2 or not jnp.issubdtype(expert_indices.dtype, jnp.integer):
    raise ValueError(
        f"expert_indices must be a (T, k) integer array, got shape {tuple(expert_indices.shape)} "
        f"dtype {expert_indices.dtype}")
  t, k = expert_indices.shape
  flat = expert_indices.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)          # sorted row -> slot
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  topo = make_topology(group_sizes, t * k, ffn_size=ffn_size, block_size=block_size)
  src = padded_source_rows(topo)                                      # (P,) sorted row or M
  src_slot = jnp.take(order, src, mode="fill", fill_value=t * k)
  source_token = jnp.where(src < t * k, src_slot // k, t).astype(jnp.int32)
  rank = inverse_permutation(order)                                   # slot -> sorted row
  slot_padded_row = padded_destination_rows(topo)[rank]
  return PaddedRows(topo, source_token, slot_padded_row)


def _concat_experts_in(w: jax.Array) -> jax.Array:
  """(E, d, f) -> (d, E*f): expert e's columns are column blocks [e*f/b, (e+1)*f/b)."""
  e, d, f = w.shape
  return jnp.transpose(w, (1, 0, 2)).reshape(d, e * f)


def dmoe_mlp(
    x: jax.Array,
    expert_indices: jax.Array,
    combine_weights: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    w3: jax.Array | None = None,
    *,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.silu,
    block_size: int = 128,
    backend: str | None = None,
    config: BlockSparseConfig | None = None,
) -> jax.Array:
  """Block-sparse expert MLP (w3 None) or GLU (w3 given); returns (T, d) in x.dtype.

  The activation runs in float32 on the hidden blocks and is cast back to x.dtype before the
  second product (bf16 operands, float32 accumulation).
  """
  validation.check_float_operand("x", x, 2)
  validation.check_float_operand("w1", w1, 3)
  validation.check_float_operand("w2", w2, 3)
  t, d = x.shape
  num_experts, d1, f = w1.shape
  validation.check_dim("w1", d1, d, "dimension 1 (d_model)")
  if tuple(w2.shape) != (num_experts, f, d):
    raise ValueError(f"w2 must have shape {(num_experts, f, d)}, got {tuple(w2.shape)}")
  if w3 is not None:
    validation.check_float_operand("w3", w3, 3)
    if w3.shape != w1.shape:
      raise ValueError(f"w3 must have the shape of w1 {tuple(w1.shape)}, got {tuple(w3.shape)}")
    validation.check_same_dtype(x=x, w1=w1, w2=w2, w3=w3)
  else:
    validation.check_same_dtype(x=x, w1=w1, w2=w2)
  if expert_indices.ndim != 2 or expert_indices.shape[0] != t:
    raise ValueError(f"expert_indices must have shape ({t}, k), got {tuple(expert_indices.shape)}")
  if not jnp.issubdtype(combine_weights.dtype, jnp.floating):
    raise ValueError(f"combine_weights must be a float array, got dtype {combine_weights.dtype}")
  if combine_weights.shape != expert_indices.shape:
    raise ValueError(
        f"combine_weights must have shape {tuple(expert_indices.shape)}, got {tuple(combine_weights.shape)}")
  if f % block_size:
    raise ValueError(f"w1: d_ff={f} must be a multiple of block_size={block_size}")

  routing = pad_to_blocks(expert_indices, num_experts, ffn_size=f, block_size=block_size)
  topo = routing.topo
  kw = dict(backend=backend, config=config)
  xp = jnp.take(x, routing.source_token, axis=0, mode="fill", fill_value=0)      # (P, d)
  h = ops.sdd(xp, _concat_experts_in(w1), topo, **kw)                             # (Z, b, b)
  up = None if w3 is None else ops.sdd(xp, _concat_experts_in(w3), topo, **kw)
  h = hidden(activation, h, up)          # float32 math; the backward recomputes it
  yp = ops.dsd(h.astype(x.dtype), w2.reshape(num_experts * f, d), topo, **kw)    # (P, d)
  y_slots = jnp.take(yp, routing.slot_padded_row, axis=0, mode="fill", fill_value=0)
  y_slots = y_slots.reshape(t, -1, d).astype(jnp.float32)
  y = jnp.einsum("tk,tkd->td", combine_weights.astype(jnp.float32), y_slots)
  return y.astype(x.dtype)
