"""The fused expert GLU on expert-sorted rows: a jax.custom_vjp over the fused GLU kernels.

  y[t] = sum_j gates[t, j] * (act(x[t] @ w_gate[e]) * (x[t] @ w_up[e])) @ w_down[e],
  e = expert of (t, j); M = T * k sorted rows (kernels.scatter.routing.SortedSlots)

Forward: the fused up-projection (`glu_triton.glu_up`) gathers each sorted row's token from x
inside the kernel once per K step for both products and writes a = act(g) * u (M, f); the down
projection is `scatter_matmul(a, w_down, x_grouped=True, gates=gates)` on the backend's scatter
matmul (gate-weighted, summed over the k choices). Differentiated, the up-projection also writes g
and u, the only (M, ·) residuals: the backward keeps x, the weights, the gates, the routing, g and
u, not a and not a gathered (M, d) copy of x.

Backward, for the output gradient dy (T, d):
  dO = dy[token of each sorted row]                         (M, d) gathered once
  glu_hidden_grad: dA' = dO @ w_down^T with, in its epilogue, a recomputed from g and u, the GLU
    backward of dA = gates * dA' (dG, dU), gates * a, and the sums of dA' * a (d gates)
  glu_data_grad:   dX rows = dG @ w_gate^T + dU @ w_up^T in one K loop, written in flat order,
    then dx = their sum over each token's k rows (one reduce)
  weight gradients on group_xty: dW_gate = x_g^T dG, dW_up = x_g^T dU with x gathered once into
    x_g (transient), dW_down = (gates * a)^T dO.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.gmm.api import group_xty
from kernels.scatter.api import scatter_matmul
from kernels.scatter.backends import GLU_BACKENDS, GluBackend
from kernels.scatter.glu_triton import FusedGluConfig
from kernels.scatter.routing import SortedSlots


def _record(backend: str) -> GluBackend:
  record = GLU_BACKENDS.get(backend)
  if record.fn is None:
    raise ValueError(f"backend {backend!r} has no fused GLU kernels")
  return record


def _up(x, w_gate, w_up, sorted_flat, group_sizes, k, activation, record, config, save_gate_up):
  return record.fn.up(x, w_gate, w_up, group_sizes, sorted_flat // k, activation=activation,
                      save_gate_up=save_gate_up, config=config.up)


def _down(a, w_down, gates, sorted_flat, group_sizes, record, config):
  return scatter_matmul(a, w_down, SortedSlots(sorted_flat, group_sizes), x_grouped=True,
                        gates=gates, backend=record.scatter_backend, config=config.down)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _fused_glu(x, w_gate, w_up, w_down, gates, sorted_flat, group_sizes, activation, backend,
               config):
  record = _record(backend)
  a = _up(x, w_gate, w_up, sorted_flat, group_sizes, gates.shape[1], activation, record, config,
          save_gate_up=False)
  return _down(a, w_down, gates, sorted_flat, group_sizes, record, config)


def _fwd(x, w_gate, w_up, w_down, gates, sorted_flat, group_sizes, activation, backend, config):
  record = _record(backend)
  a, g, u = _up(x, w_gate, w_up, sorted_flat, group_sizes, gates.shape[1], activation, record,
                config, save_gate_up=True)
  y = _down(a, w_down, gates, sorted_flat, group_sizes, record, config)
  return y, (x, w_gate, w_up, w_down, gates, sorted_flat, group_sizes, g, u)


def _bwd(activation, backend, config, res, dy):
  x, w_gate, w_up, w_down, gates, sorted_flat, group_sizes, g, u = res
  record = _record(backend)
  (t, k), m = gates.shape, sorted_flat.shape[0]
  token = sorted_flat // k
  do_rows = jnp.take(dy.astype(x.dtype), token, axis=0)               # (M, d), gathered once
  scale = jnp.take(gates.reshape(-1), sorted_flat).astype(jnp.float32)
  dg, du, gated_a, parts = record.fn.hidden_grad(
      do_rows, w_down, g, u, scale, group_sizes, activation=activation,
      config=config.hidden_grad)
  d_sorted = jnp.sum(parts, axis=0)
  dgates = jnp.zeros((m,), jnp.float32).at[sorted_flat].set(d_sorted, unique_indices=True)
  dgates = dgates.reshape(t, k).astype(gates.dtype)
  dx_rows = record.fn.data_grad(dg, du, w_gate, w_up, group_sizes, sorted_flat,
                                config=config.data_grad)                # (M, d) flat order
  dx = dx_rows.reshape(t, k, -1).sum(axis=1, dtype=jnp.float32).astype(x.dtype)
  x_rows = jnp.take(x, token, axis=0)                                  # (M, d), gathered once
  xty = functools.partial(group_xty, group_sizes=group_sizes, backend=record.xty_backend)
  dw_gate = xty(x_rows, dg, out_dtype=w_gate.dtype)
  dw_up = xty(x_rows, du, out_dtype=w_up.dtype)
  dw_down = xty(gated_a, do_rows, out_dtype=w_down.dtype)
  return dx, dw_gate, dw_up, dw_down, dgates, None, None


_fused_glu.defvjp(_fwd, _bwd)


def fused_scatter_glu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                      routing: SortedSlots, gates: jax.Array, *, activation: str, backend: str,
                      config: FusedGluConfig) -> jax.Array:
  """The fused GLU (module docstring) on a GLU_BACKENDS backend with fused kernels; x (T, d),
  w_gate/w_up (E, d, f), w_down (E, f, d), gates (T, k) -> (T, d) in x's dtype. Arguments are
  validated by the public op, kernels.scatter.scatter_glu."""
  return _fused_glu(x, w_gate, w_up, w_down, gates, routing.sorted_flat, routing.group_sizes,
                    activation, backend, config)
