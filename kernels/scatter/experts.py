"""Expert MLP and GLU blocks on the ScatterMoE scatter matmul (pure functions of arrays).

  scatter_mlp: y[t] = sum_j gates[t, j] * act(x[t] @ w_in[e]) @ w_out[e],        e = expert of (t, j)
  scatter_glu: y[t] = sum_j gates[t, j] * (act(x[t] @ w_gate[e]) * (x[t] @ w_up[e])) @ w_down[e]

Dataflow (as in ScatterMoE): the first product gathers token rows inside the kernel and writes the
hidden rows grouped by expert (M = T * k rows); the activation runs on the grouped rows; the last
product reads grouped rows, multiplies by the gates and scatters back to token-choice order, and
the k choices are summed. The routed input is never copied into a (M, d) buffer.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from kernels.common import validation
from kernels.hidden import hidden
from kernels.scatter.api import scatter_matmul
from kernels.scatter.routing import SortedSlots


def _check(x, routing, gates, named_weights):
  validation.check_float_operand("x", x, 2)
  t, d = x.shape
  for name, w in named_weights.items():
    validation.check_float_operand(name, w, 3)
  validation.check_same_dtype(x=x, **named_weights)
  if not isinstance(routing, SortedSlots):
    raise ValueError(f"routing must be a SortedSlots (see kernels.scatter.sort_slots), "
                     f"got {type(routing).__name__}")
  validation.check_float_operand("gates", gates, 2)
  if gates.shape[0] != t or gates.shape[0] * gates.shape[1] != routing.sorted_flat.shape[0]:
    raise ValueError(f"gates must have shape ({t}, k) with {t} * k = "
                     f"{routing.sorted_flat.shape[0]} routed rows, got {tuple(gates.shape)}")
  return t, d


def scatter_mlp(
    x: jax.Array,
    w_in: jax.Array,
    w_out: jax.Array,
    routing: SortedSlots,
    gates: jax.Array,
    *,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.silu,
    backend: str | None = None,
    config: Any = None,
) -> jax.Array:
  """Expert MLP; x (T, d), w_in (E, d, f), w_out (E, f, d), gates (T, k) -> (T, d) in x.dtype."""
  t, d = _check(x, routing, gates, {"w_in": w_in, "w_out": w_out})
  e, d_in, f = w_in.shape
  validation.check_dim("w_in", d_in, d, "dimension 1 (d_model)")
  if tuple(w_out.shape) != (e, f, d):
    raise ValueError(f"w_out must have shape {(e, f, d)}, got {tuple(w_out.shape)}")
  kw = dict(backend=backend, config=config)
  h = scatter_matmul(x, w_in, routing, y_grouped=True, **kw)            # (M, f) sorted
  a = hidden(activation, h)
  return scatter_matmul(a, w_out, routing, x_grouped=True, gates=gates, **kw)  # (T, d)


def scatter_glu(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    routing: SortedSlots,
    gates: jax.Array,
    *,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.silu,
    backend: str | None = None,
    config: Any = None,
) -> jax.Array:
  """Expert GLU (SwiGLU with silu); x (T, d), w_gate/w_up (E, d, f), w_down (E, f, d) -> (T, d)."""
  t, d = _check(x, routing, gates, {"w_gate": w_gate, "w_up": w_up, "w_down": w_down})
  e, d_in, f = w_gate.shape
  validation.check_dim("w_gate", d_in, d, "dimension 1 (d_model)")
  if w_up.shape != w_gate.shape:
    raise ValueError(f"w_up must have the shape of w_gate {tuple(w_gate.shape)}, got "
                     f"{tuple(w_up.shape)}")
  if tuple(w_down.shape) != (e, f, d):
    raise ValueError(f"w_down must have shape {(e, f, d)}, got {tuple(w_down.shape)}")
  kw = dict(backend=backend, config=config)
  g = scatter_matmul(x, w_gate, routing, y_grouped=True, **kw)          # (M, f) sorted
  u = scatter_matmul(x, w_up, routing, y_grouped=True, **kw)            # (M, f) sorted
  a = hidden(activation, g, u)
  return scatter_matmul(a, w_down, routing, x_grouped=True, gates=gates, **kw)  # (T, d)
