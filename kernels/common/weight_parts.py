"""Expert weights given as parts along the output dimension: (w_1, ..., w_r), each (E, K, N_i)
(or (E, N_i, K) when the op transposes them), taken as the one weight of width N = sum N_i.

The grouped and scatter matmuls accept such a tuple so that the GLU's gate and up projections
run as one product of width 2f: the input rows are read once, and the backward runs one
data-gradient product with K = 2f (one (M, d) array, not two to be added) and one weight gradient
over one copy of the rows. The ops concatenate the parts transiently in the forward and again in
the backward, keeping the parts (the caller's arrays, usually parameters) as residuals rather than
their concatenation, and return the parts' gradients as a tuple.
"""

from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from kernels.common import validation

Weight = Union[jax.Array, tuple[jax.Array, ...]]


def n_axis(transposed: bool) -> int:
  """The axis of N in a weight: 2 for (E, K, N), 1 for (E, N, K)."""
  return 1 if transposed else 2


def check(name: str, w, transposed: bool, dtype_of: dict[str, jax.Array]):
  """Validates a weight or a tuple of parts (ValueError naming `name` or `name[i]`) and returns
  w (a tuple for a tuple or list) and the joined weight's shape and dtype (a ShapeDtypeStruct
  for parts). dtype_of: the other operands that must share the weight's dtype, by name."""
  if not isinstance(w, (tuple, list)):
    validation.check_float_operand(name, w, 3)
    validation.check_same_dtype(**dtype_of, **{name: w})
    return w, w
  if not w:
    raise ValueError(f"{name}: a tuple of weights must hold at least one, got an empty tuple")
  for i, part in enumerate(w):
    validation.check_float_operand(f"{name}[{i}]", part, 3)
    validation.check_same_dtype(**dtype_of, **{f"{name}[{i}]": part})
  axis = n_axis(transposed)
  kept = [a for a in range(3) if a != axis]   # E and K: the parts must agree on them
  for i, part in enumerate(w[1:], 1):
    if [part.shape[a] for a in kept] != [w[0].shape[a] for a in kept]:
      raise ValueError(f"{name}[{i}]: the parts of {name} must agree in every dimension but N, "
                       f"got shapes {[tuple(p.shape) for p in w]} (N is axis {axis})")
  shape = list(w[0].shape)
  shape[axis] = sum(p.shape[axis] for p in w)
  return tuple(w), jax.ShapeDtypeStruct(tuple(shape), w[0].dtype)


def join(w: Weight, transposed: bool) -> jax.Array:
  """The one weight of a tuple of parts, concatenated along N (a weight array as it is)."""
  if not isinstance(w, tuple):
    return w
  return w[0] if len(w) == 1 else jnp.concatenate(w, axis=n_axis(transposed))


def split(dw: jax.Array, parts: Weight, transposed: bool) -> Weight:
  """The joined weight's gradient as the parts' gradients (dw itself for a weight array)."""
  if not isinstance(parts, tuple):
    return dw
  axis = n_axis(transposed)
  ends = [int(e) for e in np.cumsum([p.shape[axis] for p in parts])[:-1]]
  return tuple(jnp.split(dw, ends, axis=axis))
