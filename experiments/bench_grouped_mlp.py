"""A plain expert MLP: kernels.grouped_mlp (activation in the products' epilogues) against the
separate products and elementwise passes that the grouped impl otherwise runs.

In ONE run, for each shape (rows sorted by expert, d, f, E; tanh-GELU, bf16, group sizes of a
uniform top-1 routing draw), on one backend (default "pallas"):
  1. checks that the two compute the same output and gradients (x, W_in, W_out) within bf16
     rounding (the epilogue rounds the product to bf16 before the activation, as the separate
     pass does; what may differ is the activation's float32 tanh and the kernels' summation
     order), and that all are finite;
  2. times the forward and forward+backward (jax.value_and_grad of <y, probe>), each plain and
     under jax.checkpoint (what MoEConfig.remat_experts runs), interleaved over --rounds
     (median of each), and reports TFLOP/s (forward 4 rows d f, backward twice that);
  3. writes JSON (run record, every number) to OUT/<device>/<date>-grouped-mlp.json and prints
     a table with the separate path's time over the fused one's.

GPU:  python -m experiments.bench_grouped_mlp [--out DIR] [--shapes small_b64,xs_b64]
CPU:  python -m experiments.bench_grouped_mlp --smoke --out /tmp/x   (tiny shape, backend xla)
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from experiments import bench_common as bc
from kernels.activations import ACTIVATIONS
from kernels.hidden import hidden

# name: (rows, d, f, E): the Small preset's batch 64 x 1024 tokens at top-1 (and a batch 16
# microbatch of it), XS at batch 64.
SHAPES = {"small_b64": (65536, 768, 3072, 64), "small_b16": (16384, 768, 3072, 64),
          "xs_b64": (65536, 512, 2048, 64)}
SMOKE_SHAPES = {"smoke": (200, 128, 256, 4)}
ACTIVATION = "gelu_tanh"
IMPLS = ("separate", "fused")


def separate(x, w_in, w_out, gs, backend):
  """What jaxmoe's grouped impl runs with fuse_activation=False (jaxmoe.experts.expert_mlp)."""
  h = kernels.grouped_matmul(x, w_in, gs, backend=backend)
  a = hidden(ACTIVATIONS[ACTIVATION], h).astype(x.dtype)
  return kernels.grouped_matmul(a, w_out, gs, backend=backend)


def fused(x, w_in, w_out, gs, backend):
  return kernels.grouped_mlp(x, w_in, w_out, gs, activation=ACTIVATION, backend=backend)


def _functions(impl, backend, remat: bool):
  mlp = {"separate": separate, "fused": fused}[impl]
  fwd = lambda x, w_in, w_out, gs: mlp(x, w_in, w_out, gs, backend)
  if remat:
    fwd = jax.checkpoint(fwd)

  def loss(x, w_in, w_out, gs, probe):
    return jnp.sum(fwd(x, w_in, w_out, gs).astype(jnp.float32) * probe)

  grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
  return jax.jit(fwd), jax.jit(grad)


def _inputs(rows, d, f, e, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (rows, d), jnp.float32).astype(jnp.bfloat16)
  w_in = (jax.random.normal(keys[1], (e, d, f), jnp.float32) * d ** -0.5).astype(jnp.bfloat16)
  w_out = (jax.random.normal(keys[2], (e, f, d), jnp.float32) * f ** -0.5).astype(jnp.bfloat16)
  choice = jax.random.randint(keys[3], (rows,), 0, e)
  gs = jnp.bincount(choice, length=e).astype(jnp.int32)
  probe = jax.random.normal(keys[4], (rows, d), jnp.float32)
  return x, w_in, w_out, gs, probe


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=bc.RESULTS_DIR, help="results folder: writes "
                  "OUT/<device>/<date>-grouped-mlp.json (default experiments/results)")
  ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU, backend xla")
  ap.add_argument("--shapes", default="", help=f"comma-separated, of {', '.join(SHAPES)} "
                  "(default: all)")
  ap.add_argument("--backend", default=None, help="a GMM_BACKENDS name (default: the platform's)")
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--rounds", type=int, default=3)
  args = ap.parse_args(argv)
  shapes = SMOKE_SHAPES if args.smoke else SHAPES
  wanted = [s for s in args.shapes.split(",") if s] or list(shapes)
  unknown = [s for s in wanted if s not in shapes]
  if unknown:
    ap.error(f"--shapes: unknown {unknown}; known: {', '.join(shapes)}")
  try:
    backend = kernels.GMM_BACKENDS.validate("xla" if args.smoke else args.backend, "--backend")
  except ValueError as e:
    ap.error(str(e))

  rows, checks, failures = [], {}, 0
  for name in wanted:
    m, d, f, e = shapes[name]
    x, w_in, w_out, gs, probe = _inputs(m, d, f, e)
    fns = {(impl, remat): _functions(impl, backend, remat) for impl in IMPLS
           for remat in (False, True)}
    # 1. The same values (forward and gradients), finite.
    outs = {impl: fns[(impl, False)][1](x, w_in, w_out, gs, probe) for impl in IMPLS}
    leaves = {impl: jax.tree.leaves(o) for impl, o in outs.items()}
    errs = [bc.rel_err(a, b) for a, b in zip(leaves["fused"], leaves["separate"])]
    finite = all(bool(jnp.all(jnp.isfinite(a))) for o in leaves.values() for a in o)
    ok = finite and max(errs) < 1e-2
    checks[name] = {"rel_err_loss_dx_dwin_dwout": errs, "finite": finite, "pass": ok}
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'} {name}: fused vs separate rel err (loss, dx, dW_in, "
          f"dW_out) {[f'{v:.2e}' for v in errs]}, finite={finite}", flush=True)
    del outs, leaves
    # 2. Times, interleaved.
    times = {(key, part): [] for key in fns for part in ("fwd", "fwdbwd")}
    for r in range(args.rounds):
      for key in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
        fwd, grad = fns[key]
        if not key[1]:   # under checkpoint the forward alone is the plain one
          times[(key, "fwd")].append(bc.time_jax(fwd, x, w_in, w_out, gs, iters=args.iters))
        times[(key, "fwdbwd")].append(
            bc.time_jax(grad, x, w_in, w_out, gs, probe, iters=args.iters))
    flops = 4.0 * m * d * f
    for (impl, remat), _ in fns.items():
      row = {"shape": name, "rows": m, "d": d, "f": f, "experts": e, "impl": impl,
             "remat": remat}
      for part, mult in (("fwd", 1), ("fwdbwd", 3)):
        samples = times[((impl, remat), part)]
        if samples:
          ms = float(np.median(samples))
          row[f"{part}_ms"], row[f"{part}_round_ms"] = ms, samples
          row[f"{part}_tflops"] = bc.tflops(mult * flops, ms)
      rows.append(row)
    del x, w_in, w_out, gs, probe
  for r in rows:
    base = next(b for b in rows if b["shape"] == r["shape"] and b["remat"] == r["remat"]
                and b["impl"] == "separate")
    for part in ("fwd", "fwdbwd"):
      if f"{part}_ms" in r:
        r[f"{part}_speedup"] = base[f"{part}_ms"] / r[f"{part}_ms"]
  payload = {"env": bc.environment(), "backend": backend, "activation": ACTIVATION,
             "checks": checks, "results": rows, "failures": failures}
  path = bc.write_result(args.out, "grouped-mlp", payload)
  print(bc.table(rows, ["shape", "impl", "remat", "fwd_ms", "fwd_speedup", "fwdbwd_ms",
                        "fwdbwd_speedup", "fwdbwd_tflops"]))
  print(f"wrote {path}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
