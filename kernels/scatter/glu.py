"""The fused expert GLU on expert-sorted rows: two jax.custom_vjps over the fused GLU kernels,
with one undifferentiated forward.

  y[t] = sum_j gates[t, j] * (act(x[t] @ w_gate[e]) * (x[t] @ w_up[e])) @ w_down[e],
  e = expert of (t, j); M = T * k sorted rows (kernels.scatter.routing.SortedSlots)

Undifferentiated forward (both): the fused up-projection (`glu_triton.glu_up`) gathers each sorted row's token from
x inside the kernel once per K step for both products and writes a = act(g) * u (M, f); the down
projection is `scatter_matmul(a, w_down, x_grouped=True, gates=gates)` on the backend's scatter
matmul (gate-weighted, summed over the k choices). Differentiated, _fused_glu's up-projection also
writes g and u; _fused_up_glu runs the products path's forward instead.

_fused_glu (`fused_scatter_glu`, scatter_glu(fused=True)): the backward on the fused kernels. g
and u are the only (M, ·) residuals: it keeps x, the weights, the gates, the routing, g and u, not
a and not a gathered (M, d) copy of x. For the output gradient dy (T, d):
  dO = dy[token of each sorted row]                         (M, d) gathered once
  glu_hidden_grad: dA' = dO @ w_down^T with, in its epilogue, a recomputed from g and u, the GLU
    backward of dA = gates * dA' (dG, dU), gates * a, and the sums of dA' * a (d gates)
  glu_data_grad:   dX rows = dG @ w_gate^T + dU @ w_up^T in one K loop, written in flat order,
    then dx = their sum over each token's k rows (one reduce)
  weight gradients on group_xty: dW_gate = x_g^T dG, dW_up = x_g^T dU with x gathered once into
    x_g (transient), dW_down = (gates * a)^T dO.

_fused_up_glu (`fused_up_scatter_glu`, scatter_glu(fused="forward"), the GPU default): the fused
kernel's forward where the output is not differentiated (inference, evaluation), and the products
path's forward and backward (kernels.scatter.experts) where it is, whose grouped products run on
the Mosaic grouped-matmul kernels on the GPU ("pallas", "mosaic"), where the Triton backward above
is slower. At four of SonicMoE's Figure 14 configurations the undifferentiated forward ran
1.03-1.10x as fast as the products path's on the H200 and 1.08-1.17x on an H100; differentiated,
the fused forward (writing g, u and a) was 0.98-1.02x the products path's forward+backward on
the H200, so the fwd rule runs the products path (docs/performance.md, scatter path). The fwd rule keeps what the products path keeps (the packed
gu and a) and the backward runs, through `scatter_matmul_backward`, exactly the backwards of the
products path's down projection and packed gate-and-up projection, with the GLU's backward
between them as hidden_packed's:
  (da, dW_down, d gates) = the down projection's backward, from a, the gates and dy
  dG, dU = the GLU's backward of da from g and u (float32), packed as dGU (M, 2f) in x's dtype
  (dx, (dW_gate, dW_up)) = the backward of the product of width 2f, x (w_gate | w_up), from dGU
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.activations import ACTIVATIONS
from kernels.gmm.api import group_xty
from kernels.hidden import glu_math_grad, hidden_packed
from kernels.scatter.api import scatter_matmul, scatter_matmul_backward
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


def _forward(x, w_gate, w_up, w_down, gates, sorted_flat, group_sizes, activation, backend,
             config):
  """The forward of both custom_vjps, undifferentiated: a alone from the up-projection."""
  record = _record(backend)
  a = _up(x, w_gate, w_up, sorted_flat, group_sizes, gates.shape[1], activation, record, config,
          save_gate_up=False)
  return _down(a, w_down, gates, sorted_flat, group_sizes, record, config)


def packed_products_glu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                        routing: SortedSlots, gates: jax.Array, activation, *, backend: str,
                        config) -> tuple[jax.Array, jax.Array, jax.Array]:
  """scatter_glu's products path with the gate and up projections as one product of width 2f
  (the weight pair: x gathered once) on the scatter matmul `backend`, every product with
  `config`: y (T, d), and what its backward reads, the sorted product gu (M, 2f) and a (M, f).
  The products path itself and fused="forward"'s fwd rule both run it, so that the two are the
  same kernels."""
  gu = scatter_matmul(x, (w_gate, w_up), routing, y_grouped=True, backend=backend, config=config)
  a = hidden_packed(activation, gu)
  y = scatter_matmul(a, w_down, routing, x_grouped=True, gates=gates, backend=backend,
                     config=config)
  return y, gu, a


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _fused_glu(x, w_gate, w_up, w_down, gates, sorted_flat, group_sizes, activation, backend,
               config):
  return _forward(x, w_gate, w_up, w_down, gates, sorted_flat, group_sizes, activation, backend,
                  config)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _fused_up_glu(x, w_gate, w_up, w_down, gates, sorted_flat, group_sizes, activation, backend,
                  config):
  return _forward(x, w_gate, w_up, w_down, gates, sorted_flat, group_sizes, activation, backend,
                  config)


def _fused_up_fwd(x, w_gate, w_up, w_down, gates, sorted_flat, group_sizes, activation, backend,
                  config):
  # Differentiated, the forward is the products path's (not the fused kernel's): writing g, u
  # and a from the fused kernel's epilogue cost the H200 more than its gather saved (the layer's
  # forward+backward 0.98-1.02x the products path's), and the products' residuals are what the
  # backward below reads. Both products take config.down, as the backward's do.
  record = _record(backend)
  y, gu, a = packed_products_glu(x, w_gate, w_up, w_down, SortedSlots(sorted_flat, group_sizes),
                                 gates, ACTIVATIONS[activation], backend=record.scatter_backend,
                                 config=config.down)
  return y, (x, w_gate, w_up, w_down, gates, sorted_flat, group_sizes, gu, a)


def _fused_up_bwd(activation, backend, config, res, dy):
  x, w_gate, w_up, w_down, gates, sorted_flat, group_sizes, gu, a = res
  record = _record(backend)
  routing = SortedSlots(sorted_flat, group_sizes)
  f = gu.shape[-1] // 2
  g, u = gu[:, :f], gu[:, f:]   # slices XLA fuses into the GLU's backward below
  # Both products' backwards take config.down, the config of this path's scatter-kernel products
  # (None: the scatter kernel's default), so that they are the products path's very calls: a
  # TritonScatterConfig given to scatter_glu becomes every kernel's (FusedGluConfig.of_tiles),
  # as the products path gives it to every product. Not config.data_grad, although the up
  # projection's data gradient is glu_data_grad's product: its tiles are sized for a kernel that
  # loads four tiles per K step, the scatter kernel loads two.
  backward = functools.partial(scatter_matmul_backward, backend=record.scatter_backend,
                               config=config.down)
  da, dw_down, dgates = backward(a, w_down, routing, dy, gates=gates, x_grouped=True)
  # The GLU's backward as hidden_packed's (the same float32 math, the exact activation, not the
  # kernel's form): da arrives in a's dtype as there, and dG | dU leave in x's dtype, packed for
  # the one product of width 2f (XLA can fuse the concatenation into the elementwise pass).
  _, dg, du = glu_math_grad(ACTIVATIONS[activation], g, u, da.astype(jnp.float32))
  dgu = jnp.concatenate([dg, du], axis=-1).astype(x.dtype)               # (M, 2f) sorted
  dx, (dw_gate, dw_up), _ = backward(x, (w_gate, w_up), routing, dgu, y_grouped=True)
  return dx, dw_gate, dw_up, dw_down, dgates, None, None


_fused_up_glu.defvjp(_fused_up_fwd, _fused_up_bwd)


def fused_scatter_glu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                      routing: SortedSlots, gates: jax.Array, *, activation: str, backend: str,
                      config: FusedGluConfig) -> jax.Array:
  """The fused GLU (module docstring) on a GLU_BACKENDS backend with fused kernels; x (T, d),
  w_gate/w_up (E, d, f), w_down (E, f, d), gates (T, k) -> (T, d) in x's dtype. Arguments are
  validated by the public op, kernels.scatter.scatter_glu."""
  return _fused_glu(x, w_gate, w_up, w_down, gates, routing.sorted_flat, routing.group_sizes,
                    activation, backend, config)


def fused_up_scatter_glu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                         routing: SortedSlots, gates: jax.Array, *, activation: str, backend: str,
                         config: FusedGluConfig) -> jax.Array:
  """The fused GLU's forward with the products path's backward (module docstring) on a
  GLU_BACKENDS backend with fused kernels; the arguments and result of fused_scatter_glu, and
  its forward. Arguments are validated by the public op, kernels.scatter.scatter_glu."""
  return _fused_up_glu(x, w_gate, w_up, w_down, gates, routing.sorted_flat, routing.group_sizes,
                       activation, backend, config)
