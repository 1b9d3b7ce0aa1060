"""The registry of the block-sparse products (sdd, dsd, dds share it: each one's backward runs the
others on the same backend): backend name -> record whose fn is a `BlockSparseKernels`.

  "xla"               block gathers + batched matmuls + segment sums (xla.py); CPU default
  "triton"            the Pallas-Triton kernels (triton.py)
  "triton_interpret"  the same kernels in the Pallas interpreter
  "pallas"            the GPU default: "triton", the only Pallas kernels of this op
There is no Mosaic block-sparse kernel, so "mosaic" is not a name of this op (a ValueError listing
these). This module is the only place that maps these names to code.

Shapes given to default_config / check: None (the topology fixes the block shapes and the
kernels mask ragged dense edges); dtypes: (operand dtype,).
"""

from __future__ import annotations

from kernels.blocksparse import triton, xla
from kernels.common import registry
from kernels.common.registry import Registry


def choose_pallas(shapes, dtypes) -> str:
  """backend="pallas": the Triton kernels (no other Pallas block-sparse kernels exist)."""
  return "triton"


BLOCKSPARSE_BACKENDS = Registry(
    "kernels.blocksparse",
    [xla.XLA, triton.TRITON, triton.TRITON_INTERPRET],
    choosers={registry.PALLAS: choose_pallas})
