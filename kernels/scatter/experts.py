"""Expert MLP and GLU blocks on the ScatterMoE scatter matmul (pure functions of arrays).

  scatter_mlp: y[t] = sum_j gates[t, j] * act(x[t] @ w_in[e]) @ w_out[e],        e = expert of (t, j)
  scatter_glu: y[t] = sum_j gates[t, j] * (act(x[t] @ w_gate[e]) * (x[t] @ w_up[e])) @ w_down[e]

Dataflow (as in ScatterMoE): the first product gathers token rows inside the kernel and writes the
hidden rows grouped by expert (M = T * k rows); the activation runs on the grouped rows; the last
product reads grouped rows, multiplies by the gates and scatters back to token-choice order, and
the k choices are summed. The routed input is never copied into a (M, d) buffer.

scatter_glu has three paths (its `fused` argument):
  fused     the fused GLU kernels (kernels.scatter.glu): one up-projection kernel gathers x once
            for both products and applies the activation in its epilogue; the backward fuses the
            GLU's backward into the down projection's data gradient and runs the two up
            projections' data gradients as one kernel. It keeps g and u, not a: the least
            activation memory of the three. fused=True, on every backend of GLU_BACKENDS but
            "xla". On the H200 it agrees with the products path at SonicMoE's fine-grained shapes
            and runs the forward+backward 0.84-0.93x as fast; checked against the reference on
            the GPU (docs/performance.md).
  forward   the fused up-projection where the output is not differentiated, the products path
            where it is (kernels.scatter.glu's second custom_vjp): fused="forward", and the
            default (fused=None) on the backends of fused=True where the fused kernels take the
            shape and the activation and no products config is given. The undifferentiated
            layer forward ran 1.08-1.17x as fast as the products path's on an H100 (1.03-1.10x
            on the H200) at four of SonicMoE's Figure 14 configurations, the forward+backward
            1.01-1.02x; checked against the reference on the GPU.
  products  scatter_matmul products with kernels.hidden between them: the gate and up projections
            as one product of width 2f, then the down projection with the combine: fused=False,
            and the only path of "xla" (which has no fused kernels).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from kernels.activations import ACTIVATIONS, activation_name
from kernels.common import validation
from kernels.gmm.shapes import GroupedShape, dtypes as make_dtypes
from kernels.hidden import hidden
from kernels.scatter.api import scatter_matmul
from kernels.scatter.backends import GLU_BACKENDS
from kernels.scatter.glu import fused_scatter_glu, fused_up_scatter_glu, packed_products_glu
from kernels.scatter.glu_triton import FusedGluConfig, check as check_fused_config
from kernels.scatter.routing import SortedSlots
from kernels.scatter.triton import TritonScatterConfig

# scatter_glu's `fused` values: the products path (False), the fused path (True), the fused
# forward with the products path's backward ("forward"), the default's choice (None).
_FUSED = (None, False, True, "forward")


def _check(x, routing, gates, named_weights):
  validation.check_float_operand("x", x, 2)
  t, d = x.shape
  for name, w in named_weights.items():
    validation.check_float_operand(name, w, 3)
  validation.check_same_dtype(x=x, **named_weights)
  if not isinstance(routing, SortedSlots):
    raise ValueError(f"routing must be a SortedSlots (see kernels.scatter.sort_slots), "
                     f"got {type(routing).__name__}")
  sorted_flat = routing.sorted_flat
  if getattr(sorted_flat, "ndim", None) != 1 or jnp.dtype(sorted_flat.dtype) != jnp.int32:
    raise ValueError(f"routing.sorted_flat must be a 1-D int32 array, got shape "
                     f"{getattr(sorted_flat, 'shape', None)} dtype "
                     f"{getattr(sorted_flat, 'dtype', None)}")
  validation.check_group_sizes(routing.group_sizes, next(iter(named_weights.values())).shape[0])
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


def _fused_config(config, shape: GroupedShape, dtypes, record) -> FusedGluConfig:
  """The fused path's config: the backend's default for None, every kernel with the tiles of a
  TritonScatterConfig, or a FusedGluConfig as given (ValueError if it cannot run the shape)."""
  if config is None:
    return record.default_config(shape, dtypes)
  if isinstance(config, TritonScatterConfig):
    config = FusedGluConfig.of_tiles(config)
  if not isinstance(config, FusedGluConfig):
    raise ValueError(f"config must be a kernels.scatter.FusedGluConfig, a TritonScatterConfig or "
                     f"None, got {type(config).__name__}")
  why = check_fused_config(shape, dtypes, config)
  if why is not None:
    raise ValueError(f"config: the fused GLU kernels need {why}")
  return config


def _default_path(record, activation: str | None, pack_gate_up: bool, config: Any,
                  shape: GroupedShape, dtype) -> str | bool:
  """fused=None's path: "forward" where it runs as configured (scatter_glu's `fused`), else the
  products path (False)."""
  if record.fn is None or activation is None or not pack_gate_up or config is not None:
    return False
  dtypes = make_dtypes(dtype)
  if check_fused_config(shape, dtypes, record.default_config(shape, dtypes)) is not None:
    return False
  return "forward"


def scatter_glu(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    routing: SortedSlots,
    gates: jax.Array,
    *,
    activation: str | Callable[[jax.Array], jax.Array] = jax.nn.silu,
    backend: str | None = None,
    config: Any = None,
    fused: bool | str | None = None,
    pack_gate_up: bool = True,
) -> jax.Array:
  """Expert GLU (SwiGLU with silu); x (T, d), w_gate/w_up (E, d, f), w_down (E, f, d) -> (T, d).

  Args:
    activation: the gate's nonlinearity: a name of kernels.activations.ACTIVATIONS ("silu",
      "gelu", "gelu_tanh", "relu") or a function. The fused kernels compile it in, so there it
      must be one of those (by name, or that very function: jax.nn.silu, jax.nn.relu,
      jax.nn.gelu (tanh), kernels.activations.gelu); the products path takes any function.
    backend: a name of GLU_BACKENDS (kernels.scatter.backends; the names of scatter_matmul) or
      None (the platform default).
    config: for the fused paths (fused True or "forward") a kernels.scatter.FusedGluConfig, or a
      TritonScatterConfig for every kernel; for the products path a TritonScatterConfig; None:
      the defaults. fused="forward" runs the scatter-kernel products of its differentiated
      forward and its backward with the FusedGluConfig's `down` (its hidden_grad and data_grad
      configure fused=True's backward).
    fused: True: the fused path (ValueError on "xla"); "forward": the fused up-projection where
      the output is not differentiated, the products path (forward and backward, its grouped
      products on the Mosaic kernels on the GPU) where it is (ValueError on "xla"); False: the
      products path (three scatter_matmul products and kernels.hidden); None (the default):
      "forward" where the backend has the fused kernels, they take this shape at their default
      config, the activation is one they compile in, pack_gate_up is True and config is None;
      the products path otherwise. All three are checked against the float32 reference in the
      Pallas interpreter and on the GPU (`python -m experiments.check_kernels --ops
      scatter_glu`).
    pack_gate_up: the products path runs the gate and up projections as one product of width 2f
      (True: x gathered once, one data-gradient product and one weight gradient over one gathered
      copy of x, but the two weights concatenated in the forward and again in the backward) or
      as two products (False). fused="forward" runs the packed product's backward, so it takes
      only True; fused=True ignores it.
  """
  t, d = _check(x, routing, gates, {"w_gate": w_gate, "w_up": w_up, "w_down": w_down})
  e, d_in, f = w_gate.shape
  validation.check_dim("w_gate", d_in, d, "dimension 1 (d_model)")
  if w_up.shape != w_gate.shape:
    raise ValueError(f"w_up must have the shape of w_gate {tuple(w_gate.shape)}, got "
                     f"{tuple(w_up.shape)}")
  if tuple(w_down.shape) != (e, f, d):
    raise ValueError(f"w_down must have shape {(e, f, d)}, got {tuple(w_down.shape)}")
  backend = GLU_BACKENDS.validate(backend)
  record = GLU_BACKENDS.get(backend)
  if pack_gate_up not in (True, False):
    raise ValueError(f"pack_gate_up must be True or False, got {pack_gate_up!r}")
  if fused not in _FUSED:
    raise ValueError(f"fused must be one of {_FUSED}, got {fused!r}")
  if fused and record.fn is None:
    raise ValueError(f"fused: backend {backend!r} has no fused GLU kernels (those with them: "
                     f"{tuple(b.name for b in GLU_BACKENDS if b.fn is not None)}); got "
                     f"fused={fused!r}")
  if fused == "forward" and not pack_gate_up:
    raise ValueError("pack_gate_up: fused='forward' runs the backward of the gate and up "
                     "projections packed as one product of width 2f; it needs pack_gate_up=True")
  name = activation_name(activation)
  if isinstance(activation, str) and name is None:
    raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)} or a function, got "
                     f"{activation!r}")
  if fused is None:
    fused = _default_path(record, name, pack_gate_up, config,
                          GroupedShape(routing.sorted_flat.shape[0], d, f, e), x.dtype)
  if fused and record.fn is not None:
    if name is None:
      raise ValueError(f"activation: the fused GLU kernels compile in one of "
                       f"{tuple(ACTIVATIONS)} (a name or kernels.activations' function), got "
                       f"{activation!r}; fused=False runs any function")
    shape = GroupedShape(routing.sorted_flat.shape[0], d, f, e)
    cfg = _fused_config(config, shape, make_dtypes(x.dtype), record)
    op = fused_up_scatter_glu if fused == "forward" else fused_scatter_glu
    return op(x, w_gate, w_up, w_down, routing, gates, activation=name, backend=backend,
              config=cfg)
  if isinstance(config, FusedGluConfig):
    raise ValueError("config: a FusedGluConfig configures the fused path; the products path "
                     "takes a TritonScatterConfig or None")
  act = ACTIVATIONS[activation] if isinstance(activation, str) else activation
  kw = dict(backend=backend, config=config)
  # The gate and up projections as one product of width 2f (scatter_matmul takes the weight
  # pair): x gathered once, and in the backward one data-gradient product and one gathered x.
  if pack_gate_up:
    return packed_products_glu(x, w_gate, w_up, w_down, routing, gates, act, **kw)[0]
  g = scatter_matmul(x, w_gate, routing, y_grouped=True, **kw)              # (M, f) sorted
  u = scatter_matmul(x, w_up, routing, y_grouped=True, **kw)                # (M, f) sorted
  a = hidden(act, g, u)
  return scatter_matmul(a, w_down, routing, x_grouped=True, gates=gates, **kw)  # (T, d)
