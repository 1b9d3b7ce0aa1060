"""Grouped matmul over expert-sorted rows: the differentiable op, its backends, its reference.

  api.py              grouped_matmul (custom_vjp) and group_xty: the public ops
  mlp.py              grouped_mlp, grouped_glu: expert MLPs with the activation in the products' epilogues
  epilogue.py         what a product's kernel may apply to its tile before the store
  backends.py         GMM_BACKENDS / XTY_BACKENDS: the registries (name -> backend record)
  shapes.py           what a backend's default_config / check / search_space are given
  xla.py              backend "xla": jax.lax.ragged_dot
  triton.py           backend "triton": Pallas-Triton kernels, their configs and search spaces
  mosaic.py           backend "mosaic": picks a Mosaic GPU kernel by config type; defaults, checks
  mosaic_common.py    what the Mosaic kernels share (SM count, shared-memory tiling, row stores)
  mosaic_kernel.py    Mosaic gmm and group_xty with one compute warpgroup
  mosaic_ws_kernel.py, mosaic_xty_ws_kernel.py   the warp-specialized Mosaic kernels
  tuning.py           the per-device tuned-config table (tuned_configs.json) and its lookup
  reference.py        plain-jnp references
"""

from kernels.gmm.api import group_xty, grouped_matmul
from kernels.gmm.backends import GMM_BACKENDS, XTY_BACKENDS
from kernels.gmm.epilogue import Epilogue
from kernels.gmm.mlp import grouped_glu, grouped_mlp
from kernels.gmm.mosaic import MosaicGmmConfig, MosaicWsGmmConfig, MosaicWsXtyConfig, MosaicXtyConfig
from kernels.gmm.reference import gmm_reference, group_xty_reference
from kernels.gmm.shapes import GroupedShape
from kernels.gmm.triton import TritonGmmConfig, TritonXtyConfig

__all__ = [
    "Epilogue", "GMM_BACKENDS", "GroupedShape", "MosaicGmmConfig", "MosaicWsGmmConfig", "MosaicWsXtyConfig",
    "MosaicXtyConfig", "TritonGmmConfig", "TritonXtyConfig", "XTY_BACKENDS", "gmm_reference",
    "group_xty", "group_xty_reference", "grouped_glu", "grouped_matmul", "grouped_mlp",
]
