"""The expert MLPs' named activations, and their forms inside the fused Pallas-Triton kernels.

  ACTIVATIONS        name -> the elementwise function ("silu", "gelu" (exact, erfc), "gelu_tanh",
                     "relu"): jax.nn's functions, or named functions wrapping them, so that a
                     callable given to an op is recognized by identity (`activation_name`)
  kernel_activation  name -> the same function written in primitives the Pallas-Triton and
                     Mosaic GPU lowerings have, for the fused kernels' epilogues

The fused kernels compile their activation in, so they take it as one of these names. SiLU and
ReLU are jax.nn's own functions in the kernel too (logistic and max lower to both). Exact GELU
is 0.5 x erfc(-x / sqrt 2), and erfc has no Triton lowering: in the kernels it is the Chebyshev
fit of Numerical Recipes' `erfcc` (fractional error below 1.2e-7 over the whole real line,
float32 level) with the exact derivative -2/sqrt(pi) exp(-z^2) as its JVP, so the backward
differentiates the true function, not the fit. Tanh-GELU, 0.5 x (1 + tanh(u)), is written
x sigmoid(2 u), the same function without a tanh: the Mosaic kernels compile the activation
with the GPU's fast exp and division (a few float32 ulp), while its fast tanh is accurate to
only 2^-11, which 16-bit outputs would show; the exact tanh spilled registers there.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Activation = Callable[[jax.Array], jax.Array]


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x) (jax.nn.gelu with approximate=False)."""
  return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU's tanh approximation (jax.nn.gelu with approximate=True)."""
  return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Activation] = {
    "silu": jax.nn.silu,
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "relu": jax.nn.relu,
}
# Other callables that are one of the above: jax.nn.gelu's default is the tanh approximation.
_ALIASES: tuple[tuple[Activation, str], ...] = ((jax.nn.swish, "silu"), (jax.nn.gelu, "gelu_tanh"))


def activation_name(activation: str | Activation) -> str | None:
  """The ACTIVATIONS name of `activation` (a name, or a function of ACTIVATIONS or an alias such
  as jax.nn.gelu, compared by identity), or None when it is none of them."""
  if isinstance(activation, str):
    return activation if activation in ACTIVATIONS else None
  for name, fn in ACTIVATIONS.items():
    if activation is fn:
      return name
  for fn, name in _ALIASES:
    if activation is fn:
      return name
  return None


# Numerical Recipes (2nd ed., section 6.2) erfcc: erfc(z) = t exp(-z^2 + P(t)), t = 1/(1 + z/2)
# for z >= 0, and 2 - erfc(-z) below; P's coefficients from the lowest power up.
_ERFCC = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398,
          1.48851587, -0.82215223, 0.17087277)


@jax.custom_jvp
def _erfc(z: jax.Array) -> jax.Array:
  a = jnp.abs(z)
  t = 1.0 / (1.0 + 0.5 * a)
  poly = jnp.full_like(t, _ERFCC[-1])
  for c in _ERFCC[-2::-1]:
    poly = poly * t + c
  r = t * jnp.exp(-a * a + poly)
  return jnp.where(z >= 0, r, 2.0 - r)


@_erfc.defjvp
def _erfc_jvp(primals, tangents):
  (z,), (dz,) = primals, tangents
  return _erfc(z), dz * (-2.0 / np.sqrt(np.pi)).astype(np.float32) * jnp.exp(-z * z)


def _kernel_gelu(x: jax.Array) -> jax.Array:
  return 0.5 * x * _erfc(-x * np.float32(np.sqrt(0.5)))


# 0.5 (1 + tanh(u)) = sigmoid(2 u), u = sqrt(2 / pi) (x + 0.044715 x^3) (jax.nn.gelu's constants).
_GELU_TANH_2U = np.float32(2 * np.sqrt(2 / np.pi))


_GELU_TANH_A = np.float32(0.044715)


def _sigmoid_2u(x: jax.Array) -> jax.Array:
  return 1.0 / (1.0 + jnp.exp(-_GELU_TANH_2U * (x + _GELU_TANH_A * (x * x * x))))


@jax.custom_jvp
def _kernel_gelu_tanh(x: jax.Array) -> jax.Array:
  return x * _sigmoid_2u(x)


@_kernel_gelu_tanh.defjvp
def _kernel_gelu_tanh_jvp(primals, tangents):
  # d/dx x s(x) = s + x s (1 - s) 2u'(x), written out: autodiff's derivative of 1 / y is a
  # y ** -2 and of sigmoid a form that the Mosaic GPU lowering does not take.
  (x,), (dx,) = primals, tangents
  s = _sigmoid_2u(x)
  du = _GELU_TANH_2U * (1.0 + np.float32(3.0) * _GELU_TANH_A * (x * x))
  return x * s, dx * (s + x * s * (1.0 - s) * du)


_KERNEL_FORMS: dict[str, Activation] = {
    "silu": jax.nn.silu,
    "gelu": _kernel_gelu,
    "gelu_tanh": _kernel_gelu_tanh,
    "relu": jax.nn.relu,
}


def kernel_activation(name: str) -> Activation:
  """The function of ACTIVATIONS[name] in primitives the Pallas-Triton lowering has (see the
  module docstring); float32 in, float32 out."""
  if name not in _KERNEL_FORMS:
    raise ValueError(f"activation must be one of {tuple(_KERNEL_FORMS)}, got {name!r}")
  return _KERNEL_FORMS[name]
