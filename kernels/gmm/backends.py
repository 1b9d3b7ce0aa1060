"""The registries of the grouped-matmul ops: backend name -> `kernels.common.registry.Backend`.

  GMM_BACKENDS  grouped_matmul (forward and, with the weights transposed, its data gradient)
  XTY_BACKENDS  group_xty (the weight gradient)

Both hold the same names, since grouped_matmul's backward runs group_xty on the backend its
forward was given: "xla", "triton", "mosaic", "triton_interpret", "mosaic_interpret", and
"pallas", chosen per call by `choose_pallas`. This module is the only place that maps these names
to code; the ops (`kernels.gmm.api`), the tuned table (`kernels.gmm.tuning`), the autotuner, the
benchmarks and the tests read it.

Shapes and dtypes given to a backend's default_config / check / search_space: `kernels.gmm.shapes`.
"""

from __future__ import annotations

from kernels.common import registry
from kernels.common.registry import Registry
from kernels.gmm import mosaic, triton, xla
from kernels.gmm.shapes import Dtypes, GroupedShape


def choose_pallas(shape: GroupedShape, dtypes: Dtypes) -> str:
  """backend="pallas": Mosaic GPU on Hopper for 16-bit operands where the shape fits its default
  tiles (its float32 tiles exceed shared memory), Triton otherwise. For group_xty the Mosaic
  kernels tile the (K, N) output: K = x.shape[1] must divide like grouped_matmul's K."""
  if (registry.is_hopper() and dtypes.operands.itemsize == 2
      and mosaic.fits_default_tiles(shape.m, shape.k, shape.n)):
    return "mosaic"
  return "triton"


GMM_BACKENDS = Registry(
    "kernels.grouped_matmul",
    [xla.GMM, triton.GMM, mosaic.GMM, triton.GMM.interpreted(), mosaic.GMM.interpreted()],
    choosers={registry.PALLAS: choose_pallas})

XTY_BACKENDS = Registry(
    "kernels.group_xty",
    [xla.XTY, triton.XTY, mosaic.XTY, triton.XTY.interpreted(), mosaic.XTY.interpreted()],
    choosers={registry.PALLAS: choose_pallas})
