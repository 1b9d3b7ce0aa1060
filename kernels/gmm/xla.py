"""The "xla" backend: jax.lax.ragged_dot(_general). Portable and the CPU default.

On the H100 its forward ran at 11-100 TFLOP/s and its backward ran out of memory at 64 groups,
which is why the Pallas kernels exist; on CPU it is the fastest exact path we have.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.common.groups import clipped_group_offsets
from kernels.common.registry import Backend


def clip_group_sizes(group_sizes: jax.Array, m: int) -> jax.Array:
  """Group sizes with the boundaries clipped to m rows (our sum(group_sizes) > M rule)."""
  return jnp.diff(clipped_group_offsets(group_sizes, m)).astype(jnp.int32)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool, out_dtype) -> jax.Array:
  sizes = clip_group_sizes(group_sizes, lhs.shape[0])
  w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
  out = jax.lax.ragged_dot(lhs, w, sizes, preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


_XTY_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)


def group_xty(x, dy, group_sizes, *, out_dtype) -> jax.Array:
  sizes = clip_group_sizes(group_sizes, x.shape[0])
  out = jax.lax.ragged_dot_general(
      x, dy, sizes, _XTY_DIMS, preferred_element_type=jnp.float32
  )
  return out.astype(out_dtype)


GMM = Backend(name="xla", fn=gmm)
XTY = Backend(name="xla", fn=group_xty)
