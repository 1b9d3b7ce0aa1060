"""What the grouped-matmul backends' `default_config`, `check` and `search_space` are given.

  GroupedShape(m, k, n, g)   grouped_matmul: lhs (M, K), output (M, N), G groups (K and N as the
                             product sees them: with transpose_rhs the weights are stored (G, N, K))
                             group_xty: x (M, K), dy (M, N), output (G, K, N)
  dtypes                     (operand dtype, output dtype)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp


class GroupedShape(NamedTuple):
  m: int
  k: int
  n: int
  g: int


class Dtypes(NamedTuple):
  operands: Any
  out: Any


def dtypes(operands: Any, out: Any = None) -> Dtypes:
  """Dtypes(operands, out) as numpy dtypes (out defaults to the operands' dtype)."""
  return Dtypes(jnp.dtype(operands), jnp.dtype(out if out is not None else operands))
