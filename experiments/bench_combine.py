"""kernels.gather_sum on the GPU: its check against the XLA reference, then its time against
the XLA gather and sum it replaces, at SonicMoE's Figure 14 combine shapes.

For each (T, k, N) of SHAPES (the (T, d) and k of SonicMoE's twelve configurations; rows M = T k
in expert-sorted order, positions a random permutation), bf16 rows:
  1. checks: the Triton kernel against `gather_sum_reference` (float32 sums) with and without
     gates, out-of-range positions giving NaN rows, and T, N off the blocks (EDGE_SHAPES);
     PASS/FAIL lines.
  2. times (experiments.bench_common.time_jax, median) of the combine (gates, as the scatter
     layer's forward runs it) and of the unweighted sum (the data gradient of the up projection's
     token-order input): the kernel at its default config, the XLA reference (jnp.take and a
     float32 sum: what the scatter layer ran before), and a floor (a sum over k of rows already
     in token order: the same bytes read and written, no gather); --sweep adds every config of
     the kernel's search space at SWEEP_SHAPES. GB/s counts the (M, N) rows read and the (T, N)
     output written once.
  3. JSON to OUT/<device>/<date>-gather-sum.json and a table. Exit status 1 when a check fails.

GPU:    python -m experiments.bench_combine --out DIR [--sweep]
CPU:    python -m experiments.bench_combine --quick --out DIR   (tiny shapes, triton_interpret)
"""

from __future__ import annotations

import argparse
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as bc
from kernels.combine import CombineShape, gather_sum, gather_sum_reference
from kernels.combine import triton as combine_triton

# (T, k, N): SonicMoE's 1.4B (T 40960, d 768), 7B (T 24576, d 1536) and 30B/120B (T 32768,
# d 4096) with each k of their configurations.
SHAPES = [(40960, 8, 768), (40960, 4, 768), (40960, 2, 768), (24576, 8, 1536), (24576, 4, 1536),
          (24576, 2, 1536), (32768, 16, 4096), (32768, 8, 4096), (32768, 4, 4096)]
SWEEP_SHAPES = [(40960, 8, 768), (24576, 8, 1536), (32768, 16, 4096)]
EDGE_SHAPES = [(37, 3, 70), (1000, 8, 768), (5, 1, 300)]
QUICK_SHAPES = [(37, 3, 70), (16, 2, 128)]
BF16 = jnp.bfloat16


def operands(t: int, k: int, n: int, seed: int = 0):
  """rows (T k, N) bf16, positions a random permutation as (T, k) int32, gates (T, k) float32."""
  key = jax.random.key(seed)
  rows = jax.random.normal(key, (t * k, n), jnp.float32).astype(BF16)
  positions = jax.random.permutation(jax.random.fold_in(key, 1), t * k).astype(jnp.int32)
  gates = jax.random.uniform(jax.random.fold_in(key, 2), (t, k), jnp.float32)
  return rows, positions.reshape(t, k), gates


def check_shape(t: int, k: int, n: int, backend: str) -> list[dict]:
  """One row per case: the kernel's largest relative difference from the reference."""
  rows, positions, gates = operands(t, k, n, seed=t + k + n)
  bad = positions.at[0, k - 1].set(-1).at[t - 1, 0].set(t * k)
  out = []
  for name, pos, w in (("gates", positions, gates), ("sum", positions, None),
                       ("out_of_range", bad, gates)):
    got = jax.jit(lambda r, p, w: gather_sum(r, p, w, out_dtype=jnp.float32,
                                             backend=backend))(rows, pos, w)
    want = jax.jit(lambda r, p, w: gather_sum_reference(r, p, w, out_dtype=jnp.float32))(
        rows, pos, w)
    got, want = np.asarray(got), np.asarray(want)
    same_nan = bool(np.array_equal(np.isnan(got), np.isnan(want)))
    finite = ~np.isnan(want)
    err = float(np.max(np.abs(got[finite] - want[finite])) /
                max(float(np.max(np.abs(want[finite]))), 1e-30)) if finite.any() else 0.0
    nan_rows_ok = name != "out_of_range" or bool(np.isnan(got[0]).all() and
                                                 np.isnan(got[t - 1]).all())
    ok = same_nan and nan_rows_ok and err <= 1e-6
    out.append({"shape": [t, k, n], "case": name, "rel_err": err, "nan_rows_match": same_nan,
                "pass": ok})
    print(f"{'PASS' if ok else 'FAIL'} T={t} k={k} N={n} {name}: rel err {err:.2e}, NaN rows "
          f"{'match' if same_nan else 'differ'}", flush=True)
  return out


def time_shape(t: int, k: int, n: int, backend: str, iters: int, sweep: bool) -> list[dict]:
  """Two rows (weighted combine, unweighted sum): microseconds of the kernel, the XLA reference
  and the no-gather floor."""
  rows, positions, gates = operands(t, k, n)
  us = lambda fn, *a: 1e3 * bc.time_jax(jax.jit(fn), *a, iters=iters)
  gb = (t * k * n + t * n) * 2 / 1e9
  shape = CombineShape(t, k, t * k, n)
  out = []
  for what, w in (("combine", gates), ("sum", None)):
    row = {"what": what, "T": t, "k": k, "N": n,
           "kernel_us": us(lambda r, p, w: gather_sum(r, p, w, backend=backend),
                           rows, positions, w),
           "xla_us": us(lambda r, p, w: gather_sum_reference(r, p, w), rows, positions, w),
           "floor_us": us(lambda r, w: (jnp.sum(r.reshape(t, k, n).astype(jnp.float32), axis=1)
                                        if w is None else jnp.einsum(
                                            "tkn,tk->tn", r.reshape(t, k, n).astype(jnp.float32),
                                            w)).astype(BF16), rows, w)}
    row["config"] = combine_triton.default_config(shape, (BF16, BF16)).__dict__
    row["speedup"] = row["xla_us"] / row["kernel_us"]
    row["kernel_gb_s"] = gb / (row["kernel_us"] * 1e-6)
    row["floor_gb_s"] = gb / (row["floor_us"] * 1e-6)
    if sweep and (t, k, n) in SWEEP_SHAPES:
      row["sweep"] = []
      for cfg in combine_triton.search_space(shape, (BF16, BF16)):
        row["sweep"].append({**cfg.__dict__, "us": us(
            lambda r, p, w, cfg=cfg: gather_sum(r, p, w, backend=backend, config=cfg),
            rows, positions, w)})
      best = min(row["sweep"], key=lambda r: r["us"])
      row["best_sweep_us"] = best["us"]
      row["best_config"] = {c: best[c] for c in ("block_t", "block_n", "num_warps")}
      print(f"  sweep {what} T={t} k={k} N={n}: " + ", ".join(
          f"t{r['block_t']}/n{r['block_n']}/w{r['num_warps']} {r['us']:.1f}"
          for r in row["sweep"]), flush=True)
    print(f"  {what} T={t} k={k} N={n}: kernel {row['kernel_us']:.1f} us, XLA "
          f"{row['xla_us']:.1f} us, floor {row['floor_us']:.1f} us", flush=True)
    out.append(row)
  return out


def main(argv: list[str] | None = None) -> str:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=bc.RESULTS_DIR,
                  help="results folder: writes OUT/<device>/<date>-gather-sum.json")
  ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU via triton_interpret")
  ap.add_argument("--sweep", action="store_true",
                  help="also time every config of the kernel's search space at SWEEP_SHAPES")
  ap.add_argument("--iters", type=int, default=20)
  args = ap.parse_args(argv)
  if args.quick:
    backend, checks, shapes, iters = "triton_interpret", QUICK_SHAPES, QUICK_SHAPES[1:], 1
  else:
    backend, checks, shapes, iters = "triton", EDGE_SHAPES + SHAPES[:1], SHAPES, args.iters
  env = bc.environment()
  print("environment:", env, flush=True)
  payload = {"env": env, "backend": backend, "checks": [], "timings": []}
  path = bc.write_result(args.out, "gather-sum", payload)
  for t, k, n in checks:
    try:
      payload["checks"] += check_shape(t, k, n, backend)
    except Exception as err:   # a shape that fails to lower or run is a failure, not the end
      traceback.print_exc()
      payload["checks"].append({"shape": [t, k, n], "pass": False,
                                "error": f"{type(err).__name__}: {err}"[:400]})
    path = bc.write_result(args.out, "gather-sum", payload)
  for t, k, n in shapes:
    try:
      payload["timings"] += time_shape(t, k, n, backend, iters, args.sweep)
    except Exception as err:
      traceback.print_exc()
      payload["checks"].append({"shape": [t, k, n], "pass": False, "stage": "timing",
                                "error": f"{type(err).__name__}: {err}"[:400]})
    path = bc.write_result(args.out, "gather-sum", payload)   # rewritten as it goes
  print(bc.table(payload["timings"], ["what", "T", "k", "N", "kernel_us", "xla_us", "floor_us",
                                      "speedup", "kernel_gb_s", "floor_gb_s"]
                 + (["best_sweep_us"] if args.sweep else [])))
  fails = [c for c in payload["checks"] if not c["pass"]]
  print(f"{len(payload['checks'])} checks, {len(fails)} failures; written to {path}")
  if fails:
    sys.exit(1)
  return path


if __name__ == "__main__":
  main()
