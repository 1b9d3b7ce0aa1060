"""The registries of the scatter ops: backend name -> record.

SCATTER_BACKENDS, the scatter matmul (`ScatterBackend` records):

  "xla"               gather, jax.lax.ragged_dot, scatter as XLA ops (scatter/xla.py); CPU default
  "triton"            every product in the Triton scatter kernel (scatter/triton.py), as the paper
  "mosaic"            the products that gather token-order rows in the Triton scatter kernel, the
                      products whose rows are already grouped on the Mosaic grouped-matmul kernels
  "pallas"            as "mosaic", with grouped_matmul's own "pallas" choice (Mosaic on Hopper
                      where the shape fits, else Triton) for the grouped products; GPU default
  "triton_interpret", "mosaic_interpret"   the same in the Pallas interpreter
The weight gradient (group_xty over grouped rows) runs on the grouped-matmul backend of the same
name; where grouped products' rows go back to token order, kernels.gather_sum runs on "triton"
("pallas": its own choice; "xla": XLA). This module is the only place that maps these names to code.

Shapes given to default_config / check: `kernels.gmm.shapes.GroupedShape(m, k, n, g)` with M the
sorted rows, K and N the product's (x columns, output columns), G the experts.

GLU_BACKENDS, the expert GLU `scatter_glu` (`GluBackend` records), the same names:
  "xla"               no fused kernels: the three scatter_matmul products on "xla" and
                      kernels.hidden (scatter/experts.py)
  "triton"            the fused GLU kernels (scatter/glu_triton.py), the down projection's products
                      and the weight gradients on the "triton" scatter matmul / group_xty
  "mosaic", "pallas"  the fused GLU kernels, the down projection's products on the scatter
                      matmul's backend of that name and the weight gradients on group_xty's
  "triton_interpret", "mosaic_interpret"   the same in the Pallas interpreter
Shapes: GroupedShape(m, k, n, g) of the up projection: M sorted rows, K = d, N = f, G experts.
"""

from __future__ import annotations

import dataclasses

from kernels.common import registry
from kernels.common.registry import Backend, Registry
from kernels.gmm.backends import GMM_BACKENDS, XTY_BACKENDS
from kernels.gmm.shapes import Dtypes, GroupedShape
from kernels.scatter import glu_triton, triton, xla


@dataclasses.dataclass(frozen=True)
class ScatterBackend(Backend):
  """A scatter-matmul backend. fn is the gather-matmul-scatter primitive (the arguments of
  `kernels.scatter.triton.scatter2scatter`).

  gmm_backend: the grouped_matmul backend of the products whose input rows are already grouped
               (None: they run on fn too).
  xty_backend: the group_xty backend of the weight gradient.
  combine_backend: the kernels.gather_sum backend that puts those grouped products' rows in
               token order and sums each token's k rows (the combine, and the data gradient of
               an input in token order).
  """
  gmm_backend: str | None = None
  xty_backend: str = "xla"
  combine_backend: str = "xla"

  def interpreted(self) -> "ScatterBackend":
    return dataclasses.replace(
        super().interpreted(),
        gmm_backend=None if self.gmm_backend is None else f"{self.gmm_backend}_interpret",
        xty_backend=f"{self.xty_backend}_interpret",
        combine_backend=f"{self.combine_backend}_interpret")


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
                         default_config=_scatter_config, needs_gpu=True, xty_backend="triton",
                         combine_backend="triton")
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
                         xty_backend=registry.PALLAS, combine_backend=registry.PALLAS)])


@dataclasses.dataclass(frozen=True)
class GluBackend(Backend):
  """A scatter_glu backend. fn: the fused path's kernels (`glu_triton.GluKernels`), or None for a
  backend without them ("xla": scatter_glu runs the scatter_matmul products).

  scatter_backend: the SCATTER_BACKENDS name of the down projection (and of the products path).
  xty_backend:     the group_xty backend of the weight gradients.
  """
  scatter_backend: str = "xla"
  xty_backend: str = "xla"

  def interpreted(self) -> "GluBackend":
    return dataclasses.replace(
        self, name=f"{self.name}_interpret", fn=glu_triton.interpreted_kernels(self.fn),
        needs_gpu=False, interpret=True, scatter_backend=f"{self.scatter_backend}_interpret",
        xty_backend=f"{self.xty_backend}_interpret")


def _glu_mosaic_check(shape: GroupedShape, dtypes: Dtypes, config) -> str | None:
  """The fused kernels' check, then the Mosaic kernels': the down projection's products (M, f)
  -> (M, d) and the up projections' weight gradients over (d, f)."""
  why = glu_triton.check(shape, dtypes, config)
  if why is not None:
    return why
  down = GroupedShape(shape.m, shape.n, shape.k, shape.g)
  why = _grouped_products_check(down, dtypes, None)
  if why is not None:
    return f"the down projection: {why}"
  mosaic = XTY_BACKENDS.get("mosaic")
  why = mosaic.check(shape, dtypes, mosaic.default_config(shape, dtypes))
  return None if why is None else f"its weight gradients run on the Mosaic group_xty, which needs {why}"


_GLU_TRITON = GluBackend(name="triton", fn=glu_triton.KERNELS,
                         config_classes=(glu_triton.FusedGluConfig,),
                         default_config=glu_triton.default_config, check=glu_triton.check,
                         search_space=glu_triton.search_space, needs_gpu=True,
                         scatter_backend="triton", xty_backend="triton")
_GLU_MOSAIC = dataclasses.replace(_GLU_TRITON, name="mosaic", check=_glu_mosaic_check,
                                  scatter_backend="mosaic", xty_backend="mosaic")

GLU_BACKENDS = Registry(
    "kernels.scatter_glu",
    [GluBackend(name="xla", fn=None),
     _GLU_TRITON,
     _GLU_MOSAIC,
     _GLU_TRITON.interpreted(),
     _GLU_MOSAIC.interpreted(),
     dataclasses.replace(_GLU_TRITON, name=registry.PALLAS, scatter_backend=registry.PALLAS,
                         xty_backend=registry.PALLAS)])
