"""The registry of kernels.top_k: backend name -> record whose fn is fn(x, k, **kw) -> (values,
indices).

  "xla"               jax.lax.top_k (an XLA sort on the GPU); the CPU default, and any E the
                      kernel does not take
  "triton"            the Pallas-Triton kernel (triton.py): a block of rows in registers, k rounds
                      of max / lowest lane / mark taken
  "triton_interpret"  the same kernel in the Pallas interpreter
  "pallas"            the GPU default: "triton" where its check accepts the shape (E <= 1024,
                      16/32-bit floats), else "xla"
This module is the only place that maps these names to code.

Shapes given to default_config / check: `kernels.topk.shapes.TopKShape(t, e, k)`; dtypes:
(x dtype,).
"""

from __future__ import annotations

from kernels.common import registry
from kernels.common.registry import Backend, Registry
from kernels.topk import triton
from kernels.topk.reference import top_k_reference
from kernels.topk.shapes import TopKShape


def choose_pallas(shape: TopKShape, dtypes) -> str:
  """backend="pallas": the Triton kernel where it takes the shape at its default config."""
  return "triton" if triton.check(shape, dtypes, triton.default_config(shape, dtypes)) is None \
      else registry.XLA


_TRITON = Backend(name="triton", fn=triton.top_k, config_classes=(triton.TritonTopKConfig,),
                  default_config=triton.default_config, check=triton.check,
                  search_space=triton.search_space, needs_gpu=True)

TOPK_BACKENDS = Registry(
    "kernels.top_k",
    [Backend(name=registry.XLA, fn=top_k_reference), _TRITON, _TRITON.interpreted()],
    choosers={registry.PALLAS: choose_pallas})
