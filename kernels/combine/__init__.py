"""Gather-and-sum in token order (the MoE combine, a gather's data gradient): the public op, its
backends, its reference.

  api.py        gather_sum: out[t] = sum_j weights[t, j] * rows[positions[t, j]], differentiable
  backends.py   COMBINE_BACKENDS: the registry (name -> backend record)
  shapes.py     CombineShape: what a backend's default_config / check / search_space are given
  triton.py     the Pallas-Triton kernel and TritonCombineConfig
  reference.py  jnp.take and a float32 sum
"""

from kernels.combine.api import gather_sum
from kernels.combine.backends import COMBINE_BACKENDS
from kernels.combine.reference import gather_sum_reference
from kernels.combine.shapes import CombineShape
from kernels.combine.triton import TritonCombineConfig

__all__ = ["COMBINE_BACKENDS", "CombineShape", "TritonCombineConfig", "gather_sum",
           "gather_sum_reference"]
