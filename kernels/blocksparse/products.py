"""What a block-sparse backend's record holds as its function: the three products."""

from __future__ import annotations

from typing import Callable, NamedTuple


class BlockSparseKernels(NamedTuple):
  """sdd, dsd, dds of one backend, each f(a, b, topo, *, transpose_lhs, transpose_rhs, out_dtype)
  (plus config= for backends with a config class)."""
  sdd: Callable
  dsd: Callable
  dds: Callable
