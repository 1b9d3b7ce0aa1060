"""The expert MLP's hidden activation: kernels.hidden (recomputing backward) against plain autodiff.

In ONE run, for each shape (rows = T * k of a layer config, f = expert d_ff; SiLU-GLU, bf16):
  1. checks that kernels.hidden's output and gradients equal plain autodiff's (they run the same
     float32 operations, so the difference must be 0);
  2. times forward+backward for both, interleaved over --rounds (median of each): the forward
     and the backward as two jitted calls with the residuals between them (as in a layer, where
     the output matmul's kernels sit between the two and XLA cannot fuse across them), and
     reports the bytes of those residuals;
  3. writes JSON (run record, every number) to OUT/<device>/<date>-hidden.json and prints a table.

GPU:  python -m experiments.bench_hidden [--out DIR]
CPU:  python -m experiments.bench_hidden --smoke --out /tmp/x
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as bc
from kernels.hidden import hidden

# name: (rows, f): Mixtral-like layer (T 16384, k 2, f 14336), OLMoE-like (T 16384, k 8, f 1024),
# the Small preset's microbatch (16 x 1024 tokens, k 1, f 3072).
SHAPES = {"mixtral": (32768, 14336), "olmoe": (131072, 1024), "small": (16384, 3072)}
SMOKE_SHAPES = {"smoke": (64, 128)}


def plain(gate, up):
  return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


def fwd_bwd(fn):
  """(h, residuals) = fwd(gate, up); (dgate, dup) = bwd(residuals, dh): two jitted calls."""
  fwd = jax.jit(lambda gate, up: jax.vjp(fn, gate, up))
  bwd = jax.jit(lambda vjp, dh: vjp(dh))

  def run(gate, up, dh):
    h, vjp = fwd(gate, up)
    return h, bwd(vjp, dh)
  run.residual_bytes = lambda gate, up: sum(
      r.size * r.dtype.itemsize for r in jax.tree.leaves(jax.eval_shape(fwd, gate, up)[1]))
  return run


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=bc.RESULTS_DIR,
                  help="results folder: writes OUT/<device>/<date>-hidden.json (default experiments/results)")
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--rounds", type=int, default=3)
  args = ap.parse_args(argv)
  shapes = SMOKE_SHAPES if args.smoke else SHAPES
  fns = {"autodiff": fwd_bwd(plain), "hidden": fwd_bwd(lambda g, u: hidden(jax.nn.silu, g, u))}
  rows, checks = [], {}
  for name, (m, f) in shapes.items():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    gate = (jax.random.normal(k1, (m, f), jnp.float32) * 2).astype(jnp.bfloat16)
    up = jax.random.normal(k2, (m, f), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(k3, (m, f), jnp.bfloat16)   # the cotangent dh
    outs = {impl: fn(gate, up, w) for impl, fn in fns.items()}
    diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
               for a, b in zip(jax.tree.leaves(outs["hidden"]), jax.tree.leaves(outs["autodiff"])))
    checks[name] = {"max_abs_diff": diff, "pass": diff == 0.0}
    print(f"{'PASS' if diff == 0.0 else 'FAIL'} {name}: max |hidden - autodiff| = {diff:g}",
          flush=True)
    del outs
    times = {impl: [] for impl in fns}
    for r in range(args.rounds):
      for impl in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
        times[impl].append(bc.time_jax(fns[impl], gate, up, w, warmup=1, iters=args.iters))
    for impl, fn in fns.items():
      ms = float(np.median(times[impl]))
      rows.append({"shape": name, "rows": m, "f": f, "impl": impl, "ms": ms,
                   "round_ms": times[impl], "residual_GB": fn.residual_bytes(gate, up) / 1e9})
      print(f"   {name} {impl}: {ms:.3f} ms  rounds {[round(t, 3) for t in times[impl]]}",
            flush=True)
    del gate, up, w
  for r in rows:
    base = next(b for b in rows if b["shape"] == r["shape"] and b["impl"] == "autodiff")
    r["speedup_vs_autodiff"] = base["ms"] / r["ms"]
  payload = {"env": bc.environment(), "checks": checks, "results": rows}
  path = bc.write_result(args.out, "hidden", payload)
  print(bc.table(rows, ["shape", "rows", "f", "impl", "ms", "speedup_vs_autodiff", "residual_GB"]))
  print(f"wrote {path}")
  return payload


if __name__ == "__main__":
  main()
