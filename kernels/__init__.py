"""jaxmoe kernels: Pallas GPU kernels for expert matmuls and the differentiable ops built on them.

Pure JAX: imports neither jaxmoe nor flax. One folder per op family, each with the same faces
(the public op, a registry of its backends, a file per backend, the reference):
  kernels.gmm          grouped_matmul, group_xty, grouped_mlp, grouped_glu  (GMM_BACKENDS, ...)
  kernels.scatter      scatter_matmul, scatter_mlp, scatter_glu (SCATTER_BACKENDS, GLU_BACKENDS)
  kernels.blocksparse  sdd, dsd, dds, dmoe_mlp                  (BLOCKSPARSE_BACKENDS)
  kernels.topk         top_k (the router's expert choice)       (TOPK_BACKENDS)
  kernels.combine      gather_sum (the combine over k in token order)  (COMBINE_BACKENDS)
  kernels.common       what the families share: the registry record, argument checks, group
                       offsets, row tiles, the Triton dot, GPU lowering, the Mosaic compile cache
  kernels.hidden       the expert MLP's activation with a recomputing backward
  kernels.activations  the named activations, and their forms inside the fused kernels
  kernels.cross_entropy  softmax cross-entropy on 16-bit logits
See kernels/README.md.
"""

from kernels.common.groups import inverse_permutation
from kernels.common.registry import Backend, Registry, default_backend
from kernels.gmm import GMM_BACKENDS, XTY_BACKENDS, gmm_reference, group_xty, group_xty_reference
from kernels.gmm import grouped_glu, grouped_matmul, grouped_mlp
from kernels.scatter import (
    GLU_BACKENDS, SCATTER_BACKENDS, SortedSlots, sort_slots, scatter_glu, scatter_matmul,
    scatter_mlp)
from kernels.blocksparse import BLOCKSPARSE_BACKENDS
from kernels.topk import TOPK_BACKENDS, top_k
from kernels.combine import COMBINE_BACKENDS, gather_sum

# Every op's registry, by the op's public name (the autotuner, the GPU checks and the tests walk it).
REGISTRIES: dict[str, Registry] = {
    "grouped_matmul": GMM_BACKENDS,
    "group_xty": XTY_BACKENDS,
    "scatter_matmul": SCATTER_BACKENDS,
    "scatter_glu": GLU_BACKENDS,
    "blocksparse": BLOCKSPARSE_BACKENDS,
    "top_k": TOPK_BACKENDS,
    "gather_sum": COMBINE_BACKENDS,
}

__all__ = [
    "BLOCKSPARSE_BACKENDS", "Backend", "COMBINE_BACKENDS", "GLU_BACKENDS", "GMM_BACKENDS",
    "REGISTRIES", "Registry", "SCATTER_BACKENDS", "SortedSlots", "TOPK_BACKENDS", "XTY_BACKENDS",
    "default_backend", "gather_sum", "gmm_reference", "group_xty", "group_xty_reference",
    "grouped_glu", "grouped_matmul", "grouped_mlp", "inverse_permutation",
    "sort_slots", "scatter_glu", "scatter_matmul", "scatter_mlp", "top_k",
]
