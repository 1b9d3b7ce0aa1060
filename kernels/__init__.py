"""jaxmoe kernels: Pallas GPU kernels for expert matmuls and the differentiable ops built on them.

Pure JAX: imports neither jaxmoe nor flax.
"""

from kernels.backends import BACKENDS, resolve_backend
from kernels.grouped_matmul import grouped_matmul, group_xty
from kernels.reference import gmm_reference, group_xty_reference

__all__ = [
    "BACKENDS",
    "resolve_backend",
    "grouped_matmul",
    "group_xty",
    "gmm_reference",
    "group_xty_reference",
]
