"""The registry of kernels.gather_sum: backend name -> record whose fn is
fn(rows, positions, weights, *, out_dtype, **kw) -> (T, N).

  "xla"               jnp.take and a float32 sum (reference.py): the CPU default, and any shape
                      the kernel does not take
  "triton"            the Pallas-Triton kernel (triton.py): k row segments gathered and summed
                      in registers per block of output rows
  "triton_interpret"  the same kernel in the Pallas interpreter
  "pallas"            the GPU default: the Triton kernel for bfloat16 rows at k <= 2, "xla"
                      otherwise. On the H200 the kernel passes against the reference at twelve
                      shapes and runs 1.06-1.11x as fast as XLA's gather and sum at k = 2, but
                      0.83-0.98x at k = 4 to 16, where XLA's fusion already moves the bytes at
                      90-97% of the copy floor (experiments/bench_combine.py; results in
                      experiments/results/h200/2026-12-07-gather-sum.json). float32 rows are
                      not timed, so they stay on XLA
This module is the only place that maps these names to code.

Shapes given to default_config / check: `kernels.combine.shapes.CombineShape(t, k, m, n)`;
dtypes: (rows dtype, out dtype).
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels.combine import triton
from kernels.combine.reference import gather_sum_reference
from kernels.combine.shapes import CombineShape
from kernels.common import registry
from kernels.common.registry import Backend, Registry


# The most picks per output row at which the Triton kernel beats XLA's gather and sum (H200,
# bfloat16; module docstring).
TRITON_WINS_UP_TO_K = 2


def choose_pallas(shape: CombineShape, dtypes) -> str:
  """backend="pallas": the Triton kernel where it was measured faster (bfloat16 rows, k <= 2) and
  takes the shape at its default config; XLA otherwise (module docstring)."""
  if (shape.k <= TRITON_WINS_UP_TO_K and jnp.dtype(dtypes[0]) == jnp.bfloat16
      and triton.check(shape, dtypes, triton.default_config(shape, dtypes)) is None):
    return _TRITON.name
  return registry.XLA


_TRITON = Backend(name="triton", fn=triton.gather_sum,
                  config_classes=(triton.TritonCombineConfig,),
                  default_config=triton.default_config, check=triton.check,
                  search_space=triton.search_space, needs_gpu=True)

COMBINE_BACKENDS = Registry(
    "kernels.gather_sum",
    [Backend(name=registry.XLA, fn=gather_sum_reference), _TRITON, _TRITON.interpreted()],
    choosers={registry.PALLAS: choose_pallas})
