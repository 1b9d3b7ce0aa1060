"""kernels.top_k on the GPU: exactness against jax.lax.top_k, then its time against lax.top_k's.

For each (T, E, k) of SHAPES, float32 scores:
  1. checks: the Triton kernel's indices and values equal lax.top_k's exactly on random scores,
     on scores with many ties (rounded to steps of 0.5), on router-masked scores (half the
     lanes -inf on every other row, some rows all -inf) and on scores with NaN, -NaN, +-0 and
     +-inf in one lane of eight (the kernel ranks them in the float total order lax.top_k uses
     on CPU); PASS/FAIL lines.
  2. times (experiments.bench_common.time_jax, median): the kernel at its default config,
     lax.top_k (an XLA sort on the GPU), and a row max (jnp.max over E: one read of the scores,
     the floor any top-k pays); --sweep adds every config of the kernel's search space.
  3. JSON (run record, checks, timings) to OUT/<device>/<date>-topk.json and a table with the
     kernel's speedup over lax.top_k. Exit status 1 when a check fails.

GPU:    python -m experiments.bench_topk --out DIR [--sweep]
CPU:    python -m experiments.bench_topk --quick --out DIR   (tiny shapes, triton_interpret)
"""

from __future__ import annotations

import argparse
import sys
import traceback

import jax
import jax.numpy as jnp

import kernels
from experiments import bench_common as bc
from kernels.topk import TopKShape
from kernels.topk import triton as topk_triton

SHAPES = [(40960, 128, 8), (32768, 256, 16), (24576, 64, 4), (40960, 32, 2), (65536, 64, 1),
          (32768, 128, 8)]
QUICK_SHAPES = [(37, 60, 7), (20, 6, 1)]
F32 = (jnp.dtype(jnp.float32),)


def score_sets(key, t: int, e: int) -> dict[str, jax.Array]:
  """The (T, E) float32 scores each shape is checked on."""
  x = jax.random.normal(key, (t, e), jnp.float32)
  rows, lanes = jnp.arange(t)[:, None], jnp.arange(e)[None, :]
  masked = jnp.where((rows % 2 == 0) & (lanes % 2 == 1), -jnp.inf, x)
  masked = jnp.where(rows % 7 == 3, -jnp.inf, masked)
  # NaN, -NaN, +-0 and +-inf sprinkled: the float total order lax.top_k ranks by on CPU (the
  # kernel's order); this set shows whether the GPU's lax.top_k ranks them the same way.
  specials = jnp.asarray([jnp.nan, -jnp.nan, 0.0, -0.0, jnp.inf, -jnp.inf], jnp.float32)
  pick = jax.random.randint(jax.random.fold_in(key, 1), (t, e), 0, 6 * 8)
  specials = jnp.where(pick < 6, specials[jnp.minimum(pick, 5)], x)
  return {"random": x, "ties": jnp.round(x * 2) / 2, "masked": masked, "specials": specials}


def check_shape(t: int, e: int, k: int, backend: str) -> list[dict]:
  """One row per score set: mismatched index rows and values against lax.top_k."""
  out = []
  top_k = jax.jit(lambda x: kernels.top_k(x, k, backend=backend))
  for name, x in score_sets(jax.random.key(t + e + k), t, e).items():
    want_v, want_i = jax.jit(lambda x: jax.lax.top_k(x, k))(x)
    got_v, got_i = top_k(x)
    bad_rows = int(jnp.sum(jnp.any(got_i != want_i, axis=1)))
    # Bit patterns: NaN == NaN and -0 != +0.
    same_values = bool(jnp.array_equal(jax.lax.bitcast_convert_type(got_v, jnp.int32),
                                       jax.lax.bitcast_convert_type(want_v, jnp.int32)))
    ok = bad_rows == 0 and same_values and got_i.dtype == jnp.int32
    out.append({"shape": [t, e, k], "scores": name, "rows_differing": bad_rows,
                "values_equal": same_values, "pass": ok})
    print(f"{'PASS' if ok else 'FAIL'} T={t} E={e} k={k} {name}: {bad_rows} rows differ, "
          f"values {'equal' if same_values else 'differ'}", flush=True)
  return out


def time_shape(t: int, e: int, k: int, backend: str, iters: int, sweep: bool) -> dict:
  """Microseconds of the kernel (default config; with sweep every search-space config), of
  lax.top_k and of a row max, on random scores."""
  x = jax.random.normal(jax.random.key(0), (t, e), jnp.float32)
  us = lambda fn: 1e3 * bc.time_jax(jax.jit(fn), x, iters=iters)
  row = {"T": t, "E": e, "k": k,
         "kernel_us": us(lambda x: kernels.top_k(x, k, backend=backend)),
         "lax_us": us(lambda x: jax.lax.top_k(x, k)),
         "row_max_us": us(lambda x: jnp.max(x, axis=1))}
  shape = TopKShape(t, e, k)
  row["config"] = topk_triton.default_config(shape, F32).__dict__
  row["speedup"] = row["lax_us"] / row["kernel_us"]
  if sweep:
    row["sweep"] = []
    for cfg in topk_triton.search_space(shape, F32):
      row["sweep"].append({**cfg.__dict__, "us": us(
          lambda x, cfg=cfg: kernels.top_k(x, k, backend=backend, config=cfg))})
    best = min(row["sweep"], key=lambda r: r["us"])
    row["best_sweep_us"], row["best_config"] = best["us"], {
        c: best[c] for c in ("block_t", "num_warps")}
    print(f"  sweep T={t} E={e} k={k}: " + ", ".join(
        f"bt{r['block_t']}/w{r['num_warps']} {r['us']:.1f}" for r in row["sweep"]), flush=True)
  print(f"  T={t} E={e} k={k}: kernel {row['kernel_us']:.1f} us, lax.top_k {row['lax_us']:.1f} "
        f"us, row max {row['row_max_us']:.1f} us", flush=True)
  return row


def main(argv: list[str] | None = None) -> str:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=bc.RESULTS_DIR,
                  help="results folder: writes OUT/<device>/<date>-topk.json")
  ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU via triton_interpret")
  ap.add_argument("--sweep", action="store_true",
                  help="also time every config of the kernel's search space")
  ap.add_argument("--iters", type=int, default=20)
  args = ap.parse_args(argv)
  backend, shapes, iters = (("triton_interpret", QUICK_SHAPES, 1) if args.quick
                            else ("triton", SHAPES, args.iters))
  env = bc.environment()
  print("environment:", env, flush=True)
  payload = {"env": env, "backend": backend, "checks": [], "timings": []}
  for t, e, k in shapes:
    try:
      payload["checks"] += check_shape(t, e, k, backend)
      payload["timings"].append(time_shape(t, e, k, backend, iters, args.sweep))
    except Exception as err:   # a shape that fails to lower or run is a failure, not the end
      traceback.print_exc()
      payload["checks"].append({"shape": [t, e, k], "pass": False,
                                "error": f"{type(err).__name__}: {err}"[:400]})
    path = bc.write_result(args.out, "topk", payload)   # rewritten as it goes
  print(bc.table(payload["timings"], ["T", "E", "k", "kernel_us", "lax_us", "row_max_us",
                                      "speedup"] + (["best_sweep_us"] if args.sweep else [])))
  fails = [c for c in payload["checks"] if not c["pass"]]
  print(f"{len(payload['checks'])} checks, {len(fails)} failures; written to {path}")
  if fails:
    sys.exit(1)
  return path


if __name__ == "__main__":
  main()
