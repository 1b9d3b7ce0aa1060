"""The registry of kernels.gather_sum: backend name -> record whose fn is
fn(rows, positions, weights, *, out_dtype, **kw) -> (T, N).

  "xla"               jnp.take and a float32 sum (reference.py): the CPU default, and any shape
                      the kernel does not take
  "triton"            the Pallas-Triton kernel (triton.py): k row segments gathered and summed
                      in registers per block of output rows
  "triton_interpret"  the same kernel in the Pallas interpreter
  "pallas"            the GPU default: "triton" where its check accepts the shape at its
                      default config, else "xla"
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
  """backend="pallas": the Triton kernel where it takes the shape at its default config."""
  return "triton" if triton.check(shape, dtypes, triton.default_config(shape, dtypes)) is None \
      else registry.XLA


_TRITON = Backend(name="triton", fn=triton.gather_sum,
                  config_classes=(triton.TritonCombineConfig,),
                  default_config=triton.default_config, check=triton.check,
                  search_space=triton.search_space, needs_gpu=True)

COMBINE_BACKENDS = Registry(
    "kernels.gather_sum",
    [Backend(name=registry.XLA, fn=gather_sum_reference), _TRITON, _TRITON.interpreted()],
    choosers={registry.PALLAS: choose_pallas})
