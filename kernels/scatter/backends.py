"""The registry of the scatter matmul: backend name -> `ScatterBackend` record.

  "xla"               gather, jax.lax.ragged_dot, scatter as XLA ops (scatter/xla.py); CPU default
  "triton"            every product in the Triton scatter kernel (scatter/triton.py), as the paper
  "mosaic"            the products that gather token-order rows in the Triton scatter kernel, the
                      products whose rows are already grouped on the Mosaic grouped-matmul kernels
  "pallas"            as "mosaic", with grouped_matmul's own "pallas" choice (Mosaic on Hopper
                      where the shape fits, else Triton) for the grouped products; GPU default
  "triton_interpret", "mosaic_interpret"   the same in the Pallas interpreter
The weight gradient (group_xty over grouped rows) runs on the grouped-matmul backend of the same
name. This module is the only place that maps these names to code.

Shapes given to default_config / check: `kernels.gmm.shapes.GroupedShape(m, k, n, g)` with M the
sorted rows, K and N the product's (x columns, output columns), G the experts.
"""

from __future__ import annotations

import dataclasses

from kernels.common import registry
from kernels.common.registry import Backend, Registry
from kernels.gmm.backends import GMM_BACKENDS, XTY_BACKENDS
from kernels.gmm.shapes import Dtypes, GroupedShape
from kernels.scatter import triton, xla


@dataclasses.dataclass(frozen=True)
class ScatterBackend(Backend):
  """A scatter-matmul backend. fn is the gather-matmul-scatter primitive (the arguments of
  `kernels.scatter.triton.scatter2scatter`).

  gmm_backend: the grouped_matmul backend of the products whose input rows are already grouped
               (None: they run on fn too).
  xty_backend: the group_xty backend of the weight gradient.
  """
  gmm_backend: str | None = None
  xty_backend: str = "xla"

  def interpreted(self) -> "ScatterBackend":
    return dataclasses.replace(
        super().interpreted(),
        gmm_backend=None if self.gmm_backend is None else f"{self.gmm_backend}_interpret",
        xty_backend=f"{self.xty_backend}_interpret")


def _grouped_products_check(shape: GroupedShape, dtypes: Dtypes, config) -> str | None:
  """Why the Mosaic kernels cannot run this shape's grouped products (forward K -> N, data
  gradient N -> K, weight gradient over (K, N)) at their default configs, or None."""
  del config  # the scatter kernel's config; the grouped kernels take their own defaults
  transposed = GroupedShape(shape.m, shape.n, shape.k, shape.g)
  for what, reg, s in (("grouped_matmul", GMM_BACKENDS, shape),
                       ("grouped_matmul (data gradient)", GMM_BACKENDS, transposed),
                       ("group_xty", XTY_BACKENDS, shape)):
    mosaic = reg.get("mosaic")
    why = mosaic.check(s, dtypes, mosaic.default_config(s, dtypes))
    if why is not None:
      return f"its grouped products run on the Mosaic {what}, which needs {why}"
  return None


def _scatter_config(shape: GroupedShape, dtypes: Dtypes) -> triton.TritonScatterConfig:
  return triton.TritonScatterConfig()


_TRITON = ScatterBackend(name="triton", fn=triton.scatter2scatter,
                         config_classes=(triton.TritonScatterConfig,),
                         default_config=_scatter_config, needs_gpu=True, xty_backend="triton")
_MOSAIC = dataclasses.replace(_TRITON, name="mosaic", check=_grouped_products_check,
                              gmm_backend="mosaic", xty_backend="mosaic")

SCATTER_BACKENDS = Registry(
    "kernels.scatter_matmul",
    [ScatterBackend(name="xla", fn=xla.scatter2scatter, xty_backend="xla"),
     _TRITON,
     _MOSAIC,
     _TRITON.interpreted(),
     _MOSAIC.interpreted(),
     dataclasses.replace(_TRITON, name=registry.PALLAS, gmm_backend=registry.PALLAS,
                         xty_backend=registry.PALLAS)])
