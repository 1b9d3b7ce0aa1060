"""Row-wise top-k (the router's expert choice): the public op, its backends, its reference.

  api.py        top_k: (values, indices) of the k largest scores per row, differentiable values
  backends.py   TOPK_BACKENDS: the registry (name -> backend record)
  shapes.py     TopKShape: what a backend's default_config / check / search_space are given
  triton.py     the Pallas-Triton kernel and TritonTopKConfig
  reference.py  jax.lax.top_k
"""

from kernels.topk.api import top_k
from kernels.topk.backends import TOPK_BACKENDS
from kernels.topk.reference import top_k_reference
from kernels.topk.shapes import TopKShape
from kernels.topk.triton import TritonTopKConfig

__all__ = ["TOPK_BACKENDS", "TopKShape", "TritonTopKConfig", "top_k", "top_k_reference"]
