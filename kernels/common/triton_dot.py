"""The matrix product inside the Pallas-Triton kernels (gmm, scatter, block-sparse).

Accumulates in float32. float32 operands multiply in IEEE float32: Triton's default for them is
TF32, whose ~3e-4 relative error broke the float32 checks on the H100; 16-bit operands take the
tensor cores' native path either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_f32(a: jax.Array, b: jax.Array, dims) -> jax.Array:
  """jax.lax.dot_general(a, b, dims) with a float32 result (see the module docstring)."""
  precision = (jax.lax.Precision.HIGHEST if jnp.dtype(a.dtype) == jnp.float32
               else jax.lax.Precision.DEFAULT)
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)
