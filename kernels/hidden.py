"""The expert MLP's hidden activation, act(gate) [* up], with a backward pass that recomputes.

hidden:         gate (..., f), up (..., f) or None -> act(gate) [* up]   (float32 math, gate's
                dtype out)
hidden_packed:  gate_up (..., 2f) = [gate | up] -> act(gate) * up: the GLU's two projections as
                the one product of width 2f that computed them; it keeps that product for the
                backward and returns its gradient as one (..., 2f) array, with no copies of halves

Every expert path (grouped, scatter, block-sparse, expert-parallel) computes the activation in
float32 on the first matmul's 16-bit outputs and casts back for the second matmul. Left to
autodiff, that keeps float32 intermediates for the backward pass (for SiLU-GLU: sigmoid, its
complement, the SiLU and the float32 up values: 20 bytes per hidden element against 4 for the
16-bit gate and up), written in the forward and read in the backward: at the Mixtral-like layer
(32768 rows x 14336) that is ~9.4 GB each way. This op saves the 16-bit gate and up instead and
recomputes the float32 elementwise math in the backward pass (one fused elementwise pass), with
the same values: the same float32 operations run in both.

Reverse-mode only (a custom_vjp): jax.jvp through it raises.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

Activation = Callable[[jax.Array], jax.Array]


def hidden_math(activation: Activation, gate: jax.Array, up: jax.Array | None) -> jax.Array:
  """act(gate) [* up] in float32 (the activation's precision), cast back to gate's dtype: the
  forward of `hidden`, and what the fused GLU kernels' epilogues compute
  (kernels.scatter.glu_triton)."""
  a = activation(gate.astype(jnp.float32))
  if up is not None:
    a = a * up.astype(jnp.float32)
  return a.astype(gate.dtype)


def glu_math_grad(activation: Activation, gate: jax.Array, up: jax.Array,
                  da: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(a, d gate, d up), float32, of a = act(gate) * up for a float32 cotangent da: the backward
  of hidden_math (the same float32 operations, by jax.vjp of the activation) without rounding
  the cotangent to gate's dtype; the fused GLU backward's epilogue."""
  g32, u32 = gate.astype(jnp.float32), up.astype(jnp.float32)
  act, act_vjp = jax.vjp(activation, g32)
  (dgate,) = act_vjp(da * u32)
  return act * u32, dgate, da * act


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _hidden(activation: Activation, gate: jax.Array, up: jax.Array | None) -> jax.Array:
  return hidden_math(activation, gate, up)


def _hidden_fwd(activation, gate, up):
  return hidden_math(activation, gate, up), (gate, up)


def _hidden_bwd(activation, residuals, dh):
  # The barrier hides from XLA that this recomputation reads the same gate as the forward's. Under
  # remat both run in the backward pass, and XLA shared their float32 intermediates (GELU's erfc):
  # it wrote them to memory, 4 bytes per element, and read them back in the gradient's fusion
  # (Small b64 H100 profile: 1.3 ms per layer for the two fusions, against ~0.7 when each pass
  # recomputes from the 16-bit gate).
  gate, up = jax.lax.optimization_barrier(residuals)
  _, vjp = jax.vjp(functools.partial(hidden_math, activation), gate, up)
  return vjp(dh)


_hidden.defvjp(_hidden_fwd, _hidden_bwd)


def hidden(activation: Activation, gate: jax.Array, up: jax.Array | None = None) -> jax.Array:
  """act(gate) [* up] computed in float32 and returned in gate's dtype.

  Args:
    activation: elementwise function (a hashable callable such as jax.nn.silu).
    gate: (..., f) floating array, the first matmul's output.
    up: None, or the GLU's second projection, same shape as gate (any floating dtype).
  """
  if not jnp.issubdtype(gate.dtype, jnp.floating):
    raise ValueError(f"gate: must be a floating array, got dtype {gate.dtype}")
  if up is not None and (up.shape != gate.shape or not jnp.issubdtype(up.dtype, jnp.floating)):
    raise ValueError(f"up: must be a floating array of gate's shape {tuple(gate.shape)}, got "
                     f"{up.dtype}{list(up.shape)}")
  return _hidden(activation, gate, up)


def _unpack(gate_up: jax.Array) -> tuple[jax.Array, jax.Array]:
  f = gate_up.shape[-1] // 2
  return gate_up[..., :f], gate_up[..., f:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _hidden_packed(activation: Activation, gate_up: jax.Array) -> jax.Array:
  return hidden_math(activation, *_unpack(gate_up))


def _hidden_packed_fwd(activation, gate_up):
  return hidden_math(activation, *_unpack(gate_up)), gate_up


def _hidden_packed_bwd(activation, gate_up, dh):
  gate_up = jax.lax.optimization_barrier(gate_up)   # recompute, as _hidden_bwd does
  _, vjp = jax.vjp(lambda gu: hidden_math(activation, *_unpack(gu)), gate_up)
  return vjp(dh)


_hidden_packed.defvjp(_hidden_packed_fwd, _hidden_packed_bwd)


def hidden_packed(activation: Activation, gate_up: jax.Array) -> jax.Array:
  """act(gate) * up of gate_up = [gate | up] packed along the last axis; (..., 2f) -> (..., f) in
  gate_up's dtype, the same float32 math as hidden(activation, gate, up).

  The residual is gate_up itself, and the gradient is one (..., 2f) array, as the product of
  width 2f that wrote gate_up wants it (hidden(activation, gate_up[..., :f], gate_up[..., f:])
  would keep the two halves, copied out of gate_up, for its backward)."""
  if not jnp.issubdtype(gate_up.dtype, jnp.floating):
    raise ValueError(f"gate_up: must be a floating array, got dtype {gate_up.dtype}")
  if gate_up.ndim < 1 or gate_up.shape[-1] % 2:
    raise ValueError(f"gate_up: the last axis packs gate and up, so it must have an even size, "
                     f"got shape {tuple(gate_up.shape)}")
  return _hidden_packed(activation, gate_up)
