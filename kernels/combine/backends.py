"""The registry of kernels.gather_sum: backend name -> record whose fn is
fn(rows, positions, weights, *, out_dtype, **kw) -> (T, N).

  "xla"               jnp.take and a float32 sum (reference.py): the CPU default, and any shape
                      the kernel does not take
  "triton"            the Pallas-Triton kernel (triton.py): k row segments gathered and summed
                      in registers per block of output rows
  "triton_interpret"  the same kernel in the Pallas interpreter
  "pallas"            the GPU default: "xla" for now. The Triton kernel passes against the
                      reference in the Pallas interpreter and lowers for an H100, but has not
                      yet run on a GPU (experiments/jobs/gather-sum-bench-layers.txt checks and
                      times it there); until it has, the default stays on XLA and
                      backend="triton" asks for the kernel
This module is the only place that maps these names to code.

Shapes given to default_config / check: `kernels.combine.shapes.CombineShape(t, k, m, n)`;
dtypes: (rows dtype, out dtype).
"""

from __future__ import annotations

from kernels.combine import triton
from kernels.combine.reference import gather_sum_reference
from kernels.combine.shapes import CombineShape
from kernels.common import registry
from kernels.common.registry import Backend, Registry


def choose_pallas(shape: CombineShape, dtypes) -> str:
  """backend="pallas": XLA until the Triton kernel has been checked on a GPU (module docstring).
  Then: the Triton kernel where it takes the shape at its default config."""
  del shape, dtypes
  return registry.XLA


_TRITON = Backend(name="triton", fn=triton.gather_sum,
                  config_classes=(triton.TritonCombineConfig,),
                  default_config=triton.default_config, check=triton.check,
                  search_space=triton.search_space, needs_gpu=True)

COMBINE_BACKENDS = Registry(
    "kernels.gather_sum",
    [Backend(name=registry.XLA, fn=gather_sum_reference), _TRITON, _TRITON.interpreted()],
    choosers={registry.PALLAS: choose_pallas})
