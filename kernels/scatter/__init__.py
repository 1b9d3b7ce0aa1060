"""ScatterMoE scatter matmul (arXiv 2403.08245): the differentiable op, its backends, the expert
MLP/GLU built on it, its reference.

  api.py        scatter_matmul (custom_vjp): gather / scatter / gate-weighted combine in the kernel
  routing.py    SortedSlots, sort_slots: expert-sorted routing metadata
  backends.py   SCATTER_BACKENDS, GLU_BACKENDS: the registries (name -> record)
  xla.py        backend "xla": gather + ragged_dot + scatter as XLA ops
  triton.py     the Pallas-Triton scatter2scatter kernel and its config (backends "triton",
                "mosaic" and "pallas" gather with it)
  experts.py    scatter_mlp, scatter_glu: expert blocks on scatter_matmul (scatter_glu: the fused
                GLU path on the backends with its kernels)
  glu.py        the fused GLU op (custom_vjp over the fused kernels)
  glu_triton.py the fused GLU kernels (Pallas-Triton) and FusedGluConfig
  reference.py  plain-jnp reference
"""

from kernels.scatter.api import scatter_matmul
from kernels.scatter.backends import GLU_BACKENDS, SCATTER_BACKENDS, GluBackend, ScatterBackend
from kernels.scatter.experts import scatter_glu, scatter_mlp
from kernels.scatter.glu_triton import FusedGluConfig
from kernels.scatter.reference import scatter_glu_reference, scatter_matmul_reference
from kernels.scatter.routing import SortedSlots, sort_slots
from kernels.scatter.triton import TritonScatterConfig, scatter2scatter

__all__ = [
    "FusedGluConfig", "GLU_BACKENDS", "GluBackend", "SCATTER_BACKENDS", "ScatterBackend",
    "SortedSlots", "TritonScatterConfig", "sort_slots", "scatter2scatter", "scatter_glu",
    "scatter_glu_reference", "scatter_matmul", "scatter_matmul_reference", "scatter_mlp",
]
