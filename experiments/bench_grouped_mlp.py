"""Expert MLPs with the activation in the products' epilogues (kernels.grouped_mlp, and with
--kind glu kernels.grouped_glu) against the separate products and elementwise passes that the
grouped impl otherwise runs.

In ONE run, for each shape (rows sorted by expert, d, f, E; tanh-GELU for the plain MLP, SiLU for
the GLU; bf16; group sizes of a uniform routing draw), on one backend (default "pallas"):
  1. checks that the two compute the same output and gradients (x, W_in, W_out) within bf16
     rounding (the epilogue rounds the product to bf16 before the activation, as the separate
     pass does; what may differ is the activation's float32 tanh and the kernels' summation
     order), and that all are finite; for the plain MLP also kernels.grouped_mlp with
     keep_activation=False ("fused_keep_h");
     (the GLU's separate path takes gate and up as one product of width 2f and
     kernels.hidden_packed, as jaxmoe's grouped impl does);
  2. times the forward and forward+backward (jax.value_and_grad of <y, probe>), each plain and
     under jax.checkpoint (what MoEConfig.remat_experts runs), interleaved over --rounds
     (median of each), and reports TFLOP/s (forward 4 rows d f for the MLP, 6 for the GLU;
     backward twice that);
  3. writes JSON (run record, every number) to OUT/<device>/<date>-grouped-<kind>.json and
     prints a table with the separate path's time over the fused one's.

GPU:  python -m experiments.bench_grouped_mlp [--out DIR] [--kind mlp|glu] [--shapes ...]
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
from kernels.hidden import hidden, hidden_packed

# kind -> name -> (rows, d, f, E). MLP: the Small preset's batch 64 x 1024 tokens at top-1 (and a
# batch 16 microbatch of it), XS at batch 64. GLU: SonicMoE's Figure 14 1.4B and 7B
# configurations with n = 256 / 512 (rows T k), OLMoE-like (16384 tokens, k 8), Mixtral-like.
SHAPES = {
    "mlp": {"small_b64": (65536, 768, 3072, 64), "small_b16": (16384, 768, 3072, 64),
            "xs_b64": (65536, 512, 2048, 64)},
    "glu": {"fig14_1.4b_n256": (327680, 768, 256, 128), "fig14_7b_n512": (98304, 1536, 512, 64),
            "olmoe": (131072, 2048, 1024, 64), "mixtral": (32768, 4096, 14336, 8)},
}
SMOKE_SHAPES = {"smoke": (200, 128, 256, 4)}
ACTIVATION = {"mlp": "gelu_tanh", "glu": "silu"}
# fused_keep_h (the plain MLP): kernels.grouped_mlp(keep_activation=False), the forward keeping h
# only and the backward's epilogue writing act(h) again (MoEConfig.recompute_activation).
IMPLS = {"mlp": ("separate", "fused", "fused_keep_h"), "glu": ("separate", "fused")}


def separate(kind, x, ws, gs, backend):
  """What jaxmoe's grouped impl runs with fuse_activation=False (jaxmoe.experts.expert_mlp): for a
  GLU, gate and up as one product of width 2f and kernels.hidden_packed."""
  act = ACTIVATIONS[ACTIVATION[kind]]
  if kind == "mlp":
    a = hidden(act, kernels.grouped_matmul(x, ws[0], gs, backend=backend))
  else:
    a = hidden_packed(act, kernels.grouped_matmul(x, tuple(ws[:2]), gs, backend=backend))
  return kernels.grouped_matmul(a.astype(x.dtype), ws[-1], gs, backend=backend)


def fused(kind, x, ws, gs, backend, keep_activation: bool = True):
  if kind == "mlp":
    return kernels.grouped_mlp(x, *ws, gs, activation=ACTIVATION[kind], backend=backend,
                               keep_activation=keep_activation)
  return kernels.grouped_glu(x, *ws, gs, activation=ACTIVATION[kind], backend=backend)


def fused_keep_h(kind, x, ws, gs, backend):
  return fused(kind, x, ws, gs, backend, keep_activation=False)


def _functions(kind, impl, backend, remat: bool):
  mlp = {"separate": separate, "fused": fused, "fused_keep_h": fused_keep_h}[impl]
  fwd = lambda x, ws, gs: mlp(kind, x, ws, gs, backend)
  if remat:
    fwd = jax.checkpoint(fwd)

  def loss(x, ws, gs, probe):
    return jnp.sum(fwd(x, ws, gs).astype(jnp.float32) * probe)

  grad = jax.value_and_grad(loss, argnums=(0, 1))
  return jax.jit(fwd), jax.jit(grad)


def _inputs(kind, rows, d, f, e, seed=0):
  keys = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(keys[0], (rows, d), jnp.float32).astype(jnp.bfloat16)
  weight = lambda key, shape, fan_in: (
      jax.random.normal(key, shape, jnp.float32) * fan_in ** -0.5).astype(jnp.bfloat16)
  ws = [weight(keys[1], (e, d, f), d)]
  if kind == "glu":
    ws.append(weight(keys[5], (e, d, f), d))
  ws.append(weight(keys[2], (e, f, d), f))
  choice = jax.random.randint(keys[3], (rows,), 0, e)
  gs = jnp.bincount(choice, length=e).astype(jnp.int32)
  probe = jax.random.normal(keys[4], (rows, d), jnp.float32)
  return x, tuple(ws), gs, probe


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=bc.RESULTS_DIR, help="results folder: writes "
                  "OUT/<device>/<date>-grouped-mlp.json (default experiments/results)")
  ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU, backend xla")
  ap.add_argument("--kind", default="mlp", choices=tuple(SHAPES),
                  help="mlp: grouped_mlp (tanh-GELU); glu: grouped_glu (SiLU)")
  ap.add_argument("--shapes", default="", help="comma-separated, of the kind's shapes: " + "; ".join(
      f"{k}: {', '.join(v)}" for k, v in SHAPES.items()) + " (default: all)")
  ap.add_argument("--backend", default=None, help="a GMM_BACKENDS name (default: the platform's)")
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--rounds", type=int, default=3)
  args = ap.parse_args(argv)
  kind = args.kind
  shapes = SMOKE_SHAPES if args.smoke else SHAPES[kind]
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
    x, ws, gs, probe = _inputs(kind, m, d, f, e)
    fns = {(impl, remat): _functions(kind, impl, backend, remat) for impl in IMPLS[kind]
           for remat in (False, True)}
    # 1. The same values (forward and gradients), finite.
    outs = {impl: fns[(impl, False)][1](x, ws, gs, probe) for impl in IMPLS[kind]}
    leaves = {impl: jax.tree.leaves(o) for impl, o in outs.items()}
    finite = all(bool(jnp.all(jnp.isfinite(a))) for o in leaves.values() for a in o)
    errs = {impl: [bc.rel_err(a, b) for a, b in zip(leaves[impl], leaves["separate"])]
            for impl in IMPLS[kind] if impl != "separate"}
    ok = finite and max(max(e) for e in errs.values()) < 1e-2
    checks[name] = {"rel_err_loss_dx_dweights": errs, "finite": finite, "pass": ok}
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'} {name}: vs separate rel err (loss, dx, then each "
          f"weight's gradient) " + "; ".join(f"{impl} {[f'{v:.2e}' for v in e]}"
                                              for impl, e in errs.items())
          + f", finite={finite}", flush=True)
    del outs, leaves
    # 2. Times, interleaved.
    times = {(key, part): [] for key in fns for part in ("fwd", "fwdbwd")}
    for r in range(args.rounds):
      for key in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
        fwd, grad = fns[key]
        if not key[1]:   # under checkpoint the forward alone is the plain one
          times[(key, "fwd")].append(bc.time_jax(fwd, x, ws, gs, iters=args.iters))
        times[(key, "fwdbwd")].append(bc.time_jax(grad, x, ws, gs, probe, iters=args.iters))
    flops = (4.0 if kind == "mlp" else 6.0) * m * d * f
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
    del x, ws, gs, probe
  for r in rows:
    base = next(b for b in rows if b["shape"] == r["shape"] and b["remat"] == r["remat"]
                and b["impl"] == "separate")
    for part in ("fwd", "fwdbwd"):
      if f"{part}_ms" in r:
        r[f"{part}_speedup"] = base[f"{part}_ms"] / r[f"{part}_ms"]
  payload = {"env": bc.environment(), "kind": kind, "backend": backend,
             "activation": ACTIVATION[kind], "checks": checks, "results": rows,
             "failures": failures}
  path = bc.write_result(args.out, f"grouped-{kind}", payload)
  print(bc.table(rows, ["shape", "impl", "remat", "fwd_ms", "fwd_speedup", "fwdbwd_ms",
                        "fwdbwd_speedup", "fwdbwd_tflops"]))
  print(f"wrote {path}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
