"""What a grouped-matmul kernel can do with its float32 accumulator tile before storing it.

A plain MLP's two products each meet the activation once: the forward's first product feeds it,
and the backward's data gradient of the second product is multiplied by its derivative. Done in
the matmul kernel's epilogue, the tile is still in registers, which saves a separate elementwise
pass over a (rows, d_ff) array each time (a write and a read of it, and one of the other input):

  Epilogue("activation", act)       out = h = acc (rounded to the output dtype) and a second
                                    output a = act(h): the pre-activation kept for the backward
                                    pass and the activation that feeds the next product
  Epilogue("activation_grad", act)  one more input h (rows, N); out = dh, the gradient through
                                    a = act(h) of da = acc (rounded to the output dtype)
  Epilogue("activation_grad_value", act)   as "activation_grad", and a second output a = act(h):
                                    the activation recomputed where h is read anyway, for an MLP
                                    whose forward pass did not keep it (the down projection's
                                    weight gradient takes it)

The tile math is `kernels.hidden`'s: the activation runs in float32 on the 16-bit value and is
rounded back, and the gradient is jax.vjp of that same function. The activation is its kernel
form (kernels.activations.kernel_activation: the same function in primitives the kernels lower,
with fast exp and division in the Mosaic kernels), so a fused product agrees with the separate
passes over jax.nn's forms to float32 rounding of the activation (16-bit outputs then differ by
one unit in the last place at most, and rarely). `Epilogue.apply` runs the same kernel forms as
separate passes, for backends without epilogues.

A GLU, a = act(gate) * up, needs a tile's gate and up columns together. Its weights are packed
*interleaved* (`interleave`): units of GLU_UNIT = 64 columns alternate gate, up, gate, up, so a
128-column block of the product holds one gate unit and its up unit:

  Epilogue("glu", act)       on x [W_gate | W_up] interleaved, (M, 2f): out = gu (the product,
                             kept for the backward) and a second output a = act(g) * u, (M, f)
  Epilogue("glu_grad", act)  on da = dy W_out^T, (M, f), with the residual gu (M, 2f): out =
                             d(gu), (M, 2f) interleaved, the gradients of gate and up of a
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as prims

from kernels.activations import ACTIVATIONS, kernel_activation
from kernels.hidden import hidden_math

KINDS = ("activation", "activation_grad", "activation_grad_value", "glu", "glu_grad")
# Columns of one gate (or up) unit in the interleaved GLU layout.
GLU_UNIT = 64


@dataclasses.dataclass(frozen=True)
class Epilogue:
  """kind: one of KINDS; activation: a kernels.activations.ACTIVATIONS name (for the GLU kinds,
  the gate's nonlinearity)."""

  kind: str
  activation: str

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")

  @property
  def is_glu(self) -> bool:
    return self.kind in ("glu", "glu_grad")

  def output_widths(self, n: int) -> tuple[int, ...]:
    """Columns of each output of a product of width n."""
    return {"activation": (n, n), "activation_grad": (n,), "activation_grad_value": (n, n),
            "glu": (n, n // 2), "glu_grad": (2 * n,)}[self.kind]

  @property
  def num_outputs(self) -> int:
    return len(self.output_widths(2))

  @property
  def takes_residual(self) -> bool:
    """Whether the kernel reads the forward's product (h, or gu) as one more input."""
    return self.kind in ("activation_grad", "activation_grad_value", "glu_grad")

  def residual_width(self, n: int) -> int | None:
    """Columns of the residual input of a product of width n (None: it takes none)."""
    return {"activation_grad": n, "activation_grad_value": n, "glu_grad": 2 * n}.get(self.kind)

  def apply(self, out: jax.Array, residual: jax.Array | None = None):
    """The epilogue as separate passes over the product `out`: what the kernel returns."""
    if self.kind == "activation":
      return out, activation_tile(self.activation, out)
    if self.kind == "glu":
      return out, glu_tile(self.activation, *deinterleave(out))
    # The barrier hides from XLA that the residual is the forward's (kernels.hidden's backward
    # says why).
    residual = jax.lax.optimization_barrier(residual)
    if self.kind == "activation_grad":
      return activation_grad_tile(self.activation, residual, out)
    if self.kind == "activation_grad_value":
      return (activation_grad_tile(self.activation, residual, out),
              activation_tile(self.activation, residual))
    return interleave(*glu_grad_tile(self.activation, *deinterleave(residual), out))


def interleave(gate: jax.Array, up: jax.Array) -> jax.Array:
  """(..., f) and (..., f) -> (..., 2f): GLU_UNIT-column units of gate and up alternating (f a
  multiple of GLU_UNIT)."""
  if gate.shape != up.shape or gate.shape[-1] % GLU_UNIT:
    raise ValueError(f"gate and up: equal shapes whose last axis is a multiple of {GLU_UNIT}, "
                     f"got {gate.shape} and {up.shape}")
  *lead, f = gate.shape
  units = (*lead, f // GLU_UNIT, 1, GLU_UNIT)
  return jnp.concatenate([gate.reshape(units), up.reshape(units)], axis=-2).reshape(*lead, 2 * f)


def deinterleave(gu: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The inverse of `interleave`: (..., 2f) -> (gate, up), each (..., f)."""
  *lead, two_f = gu.shape
  if two_f % (2 * GLU_UNIT):
    raise ValueError(f"gu: the last axis must be a multiple of {2 * GLU_UNIT}, got {gu.shape}")
  units = gu.reshape(*lead, two_f // (2 * GLU_UNIT), 2, GLU_UNIT)
  return (units[..., 0, :].reshape(*lead, two_f // 2), units[..., 1, :].reshape(*lead, two_f // 2))


def activation_tile(activation: str, h: jax.Array) -> jax.Array:
  """a = act(h) for a 16-bit tile h, in h's dtype (kernels.hidden.hidden_math)."""
  return _lowerable(functools.partial(hidden_math, kernel_activation(activation), up=None), h)


def activation_grad_tile(activation: str, h: jax.Array, da: jax.Array) -> jax.Array:
  """dh of a = act(h) for the cotangent da (h's dtype), in h's dtype: hidden_math's backward."""
  def grad(h, da):
    _, vjp = jax.vjp(functools.partial(hidden_math, kernel_activation(activation), up=None), h)
    return vjp(da)[0]

  return _lowerable(grad, h, da)


def glu_tile(activation: str, g: jax.Array, u: jax.Array) -> jax.Array:
  """a = act(g) * u for 16-bit tiles g and u, in g's dtype (kernels.hidden.hidden_math)."""
  return _lowerable(functools.partial(hidden_math, kernel_activation(activation)), g, u)


def glu_grad_tile(activation: str, g: jax.Array, u: jax.Array,
                  da: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(dg, du) of a = act(g) * u for the cotangent da (g's dtype): hidden_math's backward."""
  def grad(g, u, da):
    _, vjp = jax.vjp(functools.partial(hidden_math, kernel_activation(activation)), g, u)
    return vjp(da)

  return _lowerable(grad, g, u, da)


def _lowerable(fn, *args):
  """fn(*args) with the same operations, minus three wrappers the Mosaic GPU lowering does not
  take: nested jits and custom_jvp functions (jax.nn.relu, the erfc of exact GELU) are inlined,
  and autodiff's add_any (how a cotangent flowing back along two uses of a value is summed)
  becomes a plain add: the same float32 arithmetic either way."""
  closed = jax.make_jaxpr(fn)(*args)
  outs = _eval(closed.jaxpr, closed.consts, *args)
  return outs[0] if len(outs) == 1 else tuple(outs)


def _eval(jaxpr: jex_core.Jaxpr, consts, *args) -> list:
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if eqn.primitive is prims.add_jaxvals_p:
      outs = [lax.add(*invals)]
    elif eqn.primitive in (prims.jit_p, prims.custom_jvp_call_p):
      inner = eqn.params["jaxpr" if eqn.primitive is prims.jit_p else "call_jaxpr"]
      outs = _eval(inner.jaxpr, inner.consts, *invals)
    else:
      outs = eqn.primitive.bind(*invals, **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]
