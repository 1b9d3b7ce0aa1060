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

The tile math is `kernels.hidden`'s: the activation runs in float32 on the 16-bit value and is
rounded back, and the gradient is jax.vjp of that same function. The activation is its kernel
form (kernels.activations.kernel_activation: the same function in primitives the kernels lower,
with fast exp and division in the Mosaic kernels), so a fused product agrees with the separate
passes over jax.nn's forms to float32 rounding of the activation (16-bit outputs then differ by
one unit in the last place at most, and rarely). `Epilogue.apply` runs the same kernel forms as
separate passes, for backends without epilogues.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.extend.core as jex_core
from jax import lax
from jax.extend.core import primitives as prims

from kernels.activations import ACTIVATIONS, kernel_activation
from kernels.hidden import hidden_math

KINDS = ("activation", "activation_grad")


@dataclasses.dataclass(frozen=True)
class Epilogue:
  """kind: one of KINDS; activation: a kernels.activations.ACTIVATIONS name."""

  kind: str
  activation: str

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")

  @property
  def num_outputs(self) -> int:
    return 2 if self.kind == "activation" else 1

  @property
  def takes_residual(self) -> bool:
    """Whether the kernel reads the pre-activation h as one more (rows, N) input."""
    return self.kind == "activation_grad"


  def apply(self, out: jax.Array, residual: jax.Array | None = None):
    """The epilogue as separate passes over the product `out`: what the kernel returns."""
    if self.kind == "activation":
      return out, activation_tile(self.activation, out)
    # The barrier hides from XLA that h is the forward's (kernels.hidden's backward says why).
    return activation_grad_tile(self.activation, jax.lax.optimization_barrier(residual), out)


def activation_tile(activation: str, h: jax.Array) -> jax.Array:
  """a = act(h) for a 16-bit tile h, in h's dtype (kernels.hidden.hidden_math)."""
  return _lowerable(functools.partial(hidden_math, kernel_activation(activation), up=None), h)


def activation_grad_tile(activation: str, h: jax.Array, da: jax.Array) -> jax.Array:
  """dh of a = act(h) for the cotangent da (h's dtype), in h's dtype: hidden_math's backward."""
  def grad(h, da):
    _, vjp = jax.vjp(functools.partial(hidden_math, kernel_activation(activation), up=None), h)
    return vjp(da)[0]

  return _lowerable(grad, h, da)


def _lowerable(fn, *args):
  """fn(*args) with the same operations, minus three wrappers the Mosaic GPU lowering does not
  take: nested jits and custom_jvp functions (jax.nn.relu, the erfc of exact GELU) are inlined,
  and autodiff's add_any (how a cotangent flowing back along two uses of a value is summed)
  becomes a plain add: the same float32 arithmetic either way."""
  closed = jax.make_jaxpr(fn)(*args)
  (out,) = _eval(closed.jaxpr, closed.consts, *args)
  return out


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
