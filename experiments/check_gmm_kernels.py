"""GPU check of the three Mosaic gmm kernel variants at an edge shape (M not a tile multiple,
empty and one-row groups, rows past sum(group_sizes)): the simple kernel, the warp-specialized
default and its 4-stage chained variant, forward and transposed, against the float32 reference.

GPU:  python -m experiments.check_gmm_kernels   (prints PASS/FAIL lines; exit 1 on a failure)
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as bc
from experiments.bench_grouped_matmul import EDGE_SHAPE, EDGE_SIZES
from kernels.gmm import mosaic_kernel, mosaic_ws_kernel, reference

KERNELS = {
    "simple": (mosaic_kernel.gmm, mosaic_kernel.MosaicGmmConfig()),
    "ws": (mosaic_ws_kernel.gmm, mosaic_ws_kernel.MosaicWsGmmConfig()),
    "ws_chained": (mosaic_ws_kernel.gmm, mosaic_ws_kernel.MosaicWsGmmConfig(
        max_concurrent_steps=4, epi_cols=64, chain=True)),
}


def main() -> int:
  m, k, n, g = EDGE_SHAPE
  k1, k2 = jax.random.split(jax.random.key(0))
  lhs = jax.random.normal(k1, (m, k), jnp.bfloat16)
  gs = jnp.asarray(EDGE_SIZES)
  total = int(EDGE_SIZES.sum())
  fails = 0
  for tr in (False, True):
    shape = (g, n, k) if tr else (g, k, n)
    rhs = (jax.random.normal(k2, shape, jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
    want = reference.gmm_reference(lhs, rhs, gs, transpose_rhs=tr, out_dtype=jnp.float32)
    for name, (fn, cfg) in KERNELS.items():
      got = jax.jit(lambda a, w, s, fn=fn, cfg=cfg: fn(a, w, s, transpose_rhs=tr,
                                                        out_dtype=jnp.bfloat16, config=cfg))(lhs, rhs, gs)
      err = bc.rel_err(got, want)
      tail_zero = bool(np.all(np.asarray(got[total:], np.float32) == 0))
      ok = err < 1e-2 and tail_zero
      fails += not ok
      print(f"{'PASS' if ok else 'FAIL'} {name} transpose_rhs={tr}: rel_err {err:.3g} "
            f"tail_zero {tail_zero}", flush=True)
  print("env:", bc.environment())
  return 1 if fails else 0


if __name__ == "__main__":
  sys.exit(main())
