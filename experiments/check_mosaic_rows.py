"""GPU check of the compiled Mosaic grouped-matmul kernels at row counts that are not a multiple
of 8 (their operands are zero-padded to one: kernels/gmm/mosaic.py), forward, transposed and
group_xty, bf16, against the float32 reference; rows past sum(group_sizes) must be zero.

GPU:  python -m experiments.check_mosaic_rows --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from experiments import bench_common as bc
from kernels.gmm.reference import gmm_reference, group_xty_reference


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  args = ap.parse_args()
  rows, k, n = [], 512, 1024
  for m, sizes in ((3001, [700, 0, 1200, 1, 900, 0, 100, 90]), (4099, [4099, 0, 0, 0, 0, 0, 0, 0]),
                   (4096, [512] * 8)):
    gs = jnp.asarray(sizes, jnp.int32)
    key = jax.random.split(jax.random.key(m), 3)
    lhs = jax.random.normal(key[0], (m, k), jnp.float32).astype(jnp.bfloat16)
    rhs = jax.random.normal(key[1], (8, k, n), jnp.float32).astype(jnp.bfloat16)
    dy = jax.random.normal(key[2], (m, n), jnp.float32).astype(jnp.bfloat16)
    used = int(sum(sizes))
    for op, got_fn, want_fn in (
        ("grouped_matmul", lambda: kernels.grouped_matmul(lhs, rhs, gs, backend="mosaic"),
         lambda: gmm_reference(lhs, rhs, gs, out_dtype=jnp.float32)),
        ("group_xty", lambda: kernels.group_xty(lhs, dy, gs, backend="mosaic"),
         lambda: group_xty_reference(lhs, dy, gs, out_dtype=jnp.float32))):
      try:
        got = jax.block_until_ready(jax.jit(got_fn)())
        err = bc.rel_err(got, want_fn())
        tail = bool(np.all(np.asarray(got[used:], np.float32) == 0)) if op == "grouped_matmul" \
            else True
        row = {"op": op, "m": m, "rel_err": err, "tail_zero": tail,
               "pass": bool(err <= 1e-2 and tail)}
      except Exception as e:  # a kernel that does not lower is a failure row
        row = {"op": op, "m": m, "pass": False, "error": f"{type(e).__name__}: {e}"[:300]}
      rows.append(row)
      print(row, flush=True)
  with open(args.out, "w") as f:
    json.dump({"env": bc.environment(), "rows": rows}, f, indent=1)
  return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
