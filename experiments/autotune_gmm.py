"""Autotune the grouped-matmul block sizes per shape; write the winners into the tuned table.

For each shape (default: the three benchmark shapes of bench_grouped_matmul.SHAPES and the
Small preset's "small", "small64_up" and "small64_down"), op and backend, times a small
candidate grid of kernel configs (at most 8, the kernel's default first):

  op "gmm"    grouped_matmul forward     lhs (M, K) x rhs (G, K, N)        table key k=K, n=N
  op "gmm_t"  its data gradient          dy (M, N) x rhs (G, K, N)^T       table key k=N, n=K
  op "xty"    group_xty weight gradient  x (M, K), dy (M, N) -> (G, K, N)  table key k=K, n=N

The candidate grids are the backends' search spaces (kernels.gmm.backends: each backend record
owns its default, check and search space). The Mosaic grids hold both kernels of each op (gmm:
mosaic_ws_kernel and mosaic_kernel; xty: mosaic_xty_ws_kernel and mosaic_kernel), so one run
compares them; the winner's config type picks the kernel at dispatch.

Every candidate is first checked against the float32 `kernels.gmm.reference` on the same random
inputs (relative error below 1e-2 for bf16, no NaN); candidates that do not fit the shape, fail to
compile or fail the check are skipped and recorded with the reason. The fastest passing candidate
is kept, unless it beats the default by less than --min-gain (timing noise): then the default is.

Timing noise: at the K=2048 shapes the same config measures 10-15% apart between processes and
drifts within one, so the sequential pass (each candidate timed once, one after the other) can
favour whichever ran in a fast stretch. --interleave R then times every passing candidate again
in R rounds, each round visiting each candidate once (1 warmup + --iters runs per visit; each
round starts max(n // R, 1) of the n candidates further along, so drift falls on every candidate
alike), reusing the jitted functions of the sequential pass. Each candidate's ms is then the
median over its R rounds (the record keeps the rounds as round_ms and the sequential time as
sequential_ms), and the winner and the --min-gain rule use those medians. R rounds cost about R
times the sequential pass's timing runs (not its compiles or checks).

The winners are merged into the table (--write, default kernels/gmm/tuned_configs.json) that
`kernels.gmm.tuning.lookup` reads, and every candidate's result goes to a JSON record (--record).
Progress is printed as it goes, then a table of candidates with TFLOP/s. The table key has no
group-size distribution (--dist): a later run of the same key replaces the earlier entry.

Run on the GPU (one shape per command keeps each under the 10-minute limit):
  python -m experiments.autotune_gmm --shapes mixtral
  python -m experiments.autotune_gmm --shapes olmoe
  python -m experiments.autotune_gmm --shapes finegrained
  python -m experiments.autotune_gmm --shapes olmoe --ops xty --dist skewed --interleave 5
CPU smoke test (tiny shape, interpret backends, 1 timing iteration, writes to a temp dir; about
1.5-2.5 minutes, 20 s with --backends triton: the warp-specialized Mosaic kernel interprets slowly):
  python -m experiments.autotune_gmm --smoke
CPU pre-flight (lowers every GPU candidate for an H100, runs nothing; about 50 s):
  python -m experiments.autotune_gmm --lower-only
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as bc
from experiments.bench_grouped_matmul import SHAPES, group_sizes_for
from kernels.common import registry
from kernels.gmm import reference, tuning
from kernels.gmm.shapes import GroupedShape, dtypes as make_dtypes

SMOKE_SHAPES = {"smoke": (200, 128, 256, 4)}  # (M, K, N, G); 200 is not a tile multiple
# The benchmark shapes plus the Small preset's expert matmul at one 16 x 1024-token microbatch
# (d 768, expert d_ff 3072, 64 experts, top-1: ~256 rows per expert; gmm_t covers the other
# direction, K=3072 -> N=768).
# "small64_up"/"small64_down": the same at the preset's batch of 64 x 1024 tokens in one step
# (~1024 rows per expert), the first and the second expert matmul (each op: gmm, its gmm_t
# gradient, xty), where a training step spends ~55 ms of ~260 (H100 profile,
# experiments/results/h100/2026-11-23-profile-small-b64-remat-xla-loss.json).
TUNE_SHAPES = {**SHAPES, "small": (16384, 768, 3072, 64),
               "small64_up": (65536, 768, 3072, 64), "small64_down": (65536, 3072, 768, 64)}
OPS = tuning.OPS
BACKENDS = tuning.TUNED_BACKENDS
# Relative-error budget of a candidate's output against the float32 reference, by operand dtype.
TOL = {"bfloat16": 1e-2, "float16": 3e-3, "float32": 1e-4}
MAX_CANDIDATES = 8


def _backend(op: str, backend: str):
  """The record of `backend` in the registry of `op` (kernels.gmm.backends, via tuning)."""
  return tuning.REGISTRIES[op].get(backend)


def default_config(op: str, backend: str, k: int, n: int, dtype: Any) -> Any:
  """The config `kernels.grouped_matmul` uses without a table entry (the timing baseline): the
  backend record's default for this shape."""
  return _backend(op, backend).default_config(GroupedShape(1, k, n, 1), make_dtypes(dtype))


def candidates(op: str, backend: str, k: int, n: int, dtype: Any, smoke: bool = False) -> list[Any]:
  """The backend record's autotune search space (<= MAX_CANDIDATES, the default first, no
  duplicates). Modest on purpose (GPU time is scarce): one or two knobs moved at a time around
  the default. Smoke mode: two tiny configs per kernel, cheap enough for the interpreter."""
  grid = _backend(op, backend).search_space(GroupedShape(1, k, n, 1), make_dtypes(dtype), smoke)
  out: list[Any] = []
  for c in grid:
    if c not in out:
      out.append(c)
  return out[:MAX_CANDIDATES]


_SHORT = {"block_m": "bm", "block_n": "bn", "block_k": "bk", "block_rows": "br",
          "max_concurrent_steps": "st", "grid_tile_width": "tw", "memory_registers": "mr",
          "group_m": "gm", "num_warps": "nw", "num_stages": "ns", "largest_first": "lf",
          "epi_cols": "epi", "chain": "chain"}
_KIND = {"MosaicWsGmmConfig": "ws", "MosaicGmmConfig": "simple", "MosaicXtyConfig": "xty",
         "MosaicWsXtyConfig": "wsxty",
         "TritonGmmConfig": "gmm", "TritonXtyConfig": "xty"}


def short(cfg: Any) -> str:
  """A compact config label for tables, e.g. ws(bm128,bn128,bk64,st3,tw8,mr40)."""
  def part(name, value):  # booleans by name when on; off booleans and unset (None) left out
    label = _SHORT.get(name, name)
    if isinstance(value, bool):
      return label if value else ""
    return "" if value is None else f"{label}{value}"
  fields = ",".join(p for f in dataclasses.fields(cfg) if (p := part(f.name, getattr(cfg, f.name))))
  return f"{_KIND.get(type(cfg).__name__, type(cfg).__name__)}({fields})"


def kernel_fn(op: str, backend: str, cfg: Any, interpret: bool) -> Callable:
  """jit of `backend`'s function for `op`'s operands with config `cfg` (its type picks the
  kernel where the backend has several)."""
  fn = _backend(op, backend).fn
  if op == "xty":
    return jax.jit(lambda x, dy, s: fn(x, dy, s, out_dtype=x.dtype, config=cfg,
                                       interpret=interpret))
  tr = op == "gmm_t"
  return jax.jit(lambda a, w, s: fn(a, w, s, transpose_rhs=tr, out_dtype=a.dtype, config=cfg,
                                    interpret=interpret))


def op_problem(op: str, m: int, k: int, n: int, g: int, dtype: Any, sizes: np.ndarray):
  """(operands, key k, key n, FLOPs, float32 reference) of `op` at benchmark shape (M, K, N, G)."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  gs = jnp.asarray(sizes, jnp.int32)
  rhs = (jax.random.normal(k2, (g, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
  if op == "gmm":
    lhs = jax.random.normal(k1, (m, k), dtype)
    ref = jax.jit(functools.partial(reference.gmm_reference, out_dtype=jnp.float32))(lhs, rhs, gs)
    return (lhs, rhs, gs), k, n, ref
  if op == "gmm_t":  # the data gradient: dy (M, N) times rhs[g]^T -> (M, K)
    dy = jax.random.normal(k3, (m, n), dtype)
    ref = jax.jit(functools.partial(reference.gmm_reference, transpose_rhs=True,
                                    out_dtype=jnp.float32))(dy, rhs, gs)
    return (dy, rhs, gs), n, k, ref
  del rhs
  x = jax.random.normal(k1, (m, k), dtype)
  dy = jax.random.normal(k3, (m, n), dtype)
  ref = jax.jit(functools.partial(reference.group_xty_reference, out_dtype=jnp.float32))(x, dy, gs)
  return (x, dy, gs), k, n, ref


rel_err = bc.rel_err  # ||got - want|| / ||want||; inf on NaN/inf


def _error_text(e: BaseException) -> str:
  first = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"{type(e).__name__}: {first}"[:300]


def tune(op: str, backend: str, shape_name: str, shape: tuple[int, int, int, int], dtype: Any,
         dist: str, iters: int, warmup: int, interpret: bool, smoke: bool,
         min_gain: float, interleave: int = 0) -> dict[str, Any]:
  """Checks and times the candidate grid of one (shape, op, backend); returns its record.

  With interleave=R > 0, the candidates that passed are timed again in R interleaved rounds
  (`interleaved_rounds`) and the medians over the rounds decide."""
  m, k, n, g = shape
  sizes = group_sizes_for(m, g, dist, seed=0)
  args, kk, nn, ref = op_problem(op, m, k, n, g, dtype, sizes)
  flops = 2.0 * m * k * n
  dtype_name = jnp.dtype(dtype).name
  tol = TOL[dtype_name]
  grid = candidates(op, backend, kk, nn, dtype, smoke)
  rows: list[dict[str, Any]] = []
  fns: dict[int, Callable] = {}   # jitted fn of each passing row (by index), for the rounds
  for i, cfg in enumerate(grid):
    row: dict[str, Any] = {"config_type": type(cfg).__name__, "config": dataclasses.asdict(cfg),
                           "label": short(cfg), "baseline": i == 0}
    tag = f"  [{i + 1}/{len(grid)}] {shape_name} {op}/{backend} {short(cfg)}"
    why = _backend(op, backend).check(GroupedShape(m, kk, nn, g), make_dtypes(dtype), cfg)
    if why is not None:
      row.update(status="unsupported", reason=f"needs {why}")
      print(f"{tag}: skipped ({row['reason']})", flush=True)
      rows.append(row)
      continue
    fn = kernel_fn(op, backend, cfg, interpret)
    t0 = time.perf_counter()
    try:
      out = jax.block_until_ready(fn(*args))
    except Exception as e:  # non-compiling / failing candidate: skip and record
      row.update(status="error", reason=_error_text(e))
      print(f"{tag}: skipped ({row['reason']})", flush=True)
      rows.append(row)
      continue
    row["first_call_s"] = time.perf_counter() - t0
    err = rel_err(out, ref)
    del out
    row["rel_err"] = err
    if not err < tol:
      row.update(status="wrong", reason=f"relative error {err:.3g} >= {tol:g} (or NaN)")
      print(f"{tag}: skipped ({row['reason']})", flush=True)
      rows.append(row)
      continue
    try:
      ms = bc.time_jax(fn, *args, warmup=warmup, iters=iters)
    except Exception as e:
      row.update(status="error", reason=_error_text(e))
      print(f"{tag}: skipped ({row['reason']})", flush=True)
      rows.append(row)
      continue
    row.update(status="ok", ms=ms, tflops=bc.tflops(flops, ms))
    print(f"{tag}: {ms:.3f} ms  {row['tflops']:.4g} TFLOP/s  err {err:.2e}", flush=True)
    fns[len(rows)] = fn
    rows.append(row)
  del ref
  if interleave > 0:
    interleaved_rounds(rows, fns, args, interleave, iters, flops,
                       f"{shape_name} {op}/{backend}")
  del args, fns

  ok = [r for r in rows if r["status"] == "ok"]
  record: dict[str, Any] = {
      "shape": shape_name, "M": m, "K": k, "N": n, "G": g, "dist": dist, "op": op,
      "backend": backend, "dtype": dtype_name, "key_k": kk, "key_n": nn, "flops": flops,
      "interleave": interleave, "candidates": rows, "chosen": None,
  }
  if ok:
    best = min(ok, key=lambda r: r["ms"])
    base = rows[0] if rows[0]["status"] == "ok" else None
    if base is not None and best is not base and best["ms"] > base["ms"] * (1.0 - min_gain):
      best = base  # within noise of the default: keep the default
    best["chosen"] = True
    record["chosen"] = best["label"]
    record["default_ms"] = base["ms"] if base else None
    print(f"  -> {shape_name} {op}/{backend}: {best['label']} {best['tflops']:.4g} TFLOP/s"
          + (f" ({base['ms'] / best['ms']:.3f}x the default)" if base else " (default failed)"),
          flush=True)
  else:
    print(f"  -> {shape_name} {op}/{backend}: no candidate passed; no entry written", flush=True)
  return record


def interleaved_rounds(rows: list[dict[str, Any]], fns: dict[int, Callable], args: tuple,
                       rounds: int, iters: int, flops: float, what: str) -> None:
  """Times the passing rows again in `rounds` rounds, each visiting every one of them once
  (bc.time_jax with 1 warmup and `iters` runs), and replaces each row's ms/tflops by the median
  over the rounds (the sequential pass's number is kept as `sequential_ms`, the rounds' as
  `round_ms`). Each round starts at another candidate (the visiting order of the n candidates
  rotated by a further max(n // rounds, 1) places each round), so a slow drift of the GPU's
  speed over the rounds lands on every candidate alike instead of on the last ones. A candidate
  that raises is marked as an error and left out of the later rounds."""
  live = [i for i in sorted(fns) if rows[i]["status"] == "ok"]
  for i in live:
    rows[i]["round_ms"] = []
  for r in range(rounds):
    if not live:
      break
    shift = (r * max(len(live) // rounds, 1)) % len(live)
    order = live[shift:] + live[:shift]
    for i in order:
      try:
        rows[i]["round_ms"].append(bc.time_jax(fns[i], *args, warmup=1, iters=iters))
      except Exception as e:
        rows[i].update(status="error", reason=f"interleaved round {r + 1}: {_error_text(e)}")
        for key in ("ms", "tflops"):
          rows[i].pop(key, None)
    live = [i for i in live if rows[i]["status"] == "ok"]
    times = "  ".join(f"[{i + 1}] {rows[i]['round_ms'][-1]:.3f}" for i in live)
    print(f"  round {r + 1}/{rounds} {what} (visited from [{order[0] + 1}]): {times} ms",
          flush=True)
  for i in live:
    row = rows[i]
    row["sequential_ms"] = row["ms"]
    row["ms"] = statistics.median(row["round_ms"])
    row["tflops"] = bc.tflops(flops, row["ms"])


def table_entry(record: dict[str, Any], device_kind: str, env: dict[str, Any]) -> dict | None:
  """The tuned-table entry of a record's chosen candidate (None when none passed)."""
  best = next((r for r in record["candidates"] if r.get("chosen")), None)
  if best is None:
    return None
  cfg = tuning.config_classes()[best["config_type"]](**best["config"])
  key = tuning.make_key(record["op"], record["backend"], record["dtype"], record["key_k"],
                        record["key_n"], record["M"], device_kind=device_kind)
  meta = {
      "ms": float(f"{best['ms']:.4g}"), "tflops": float(f"{best['tflops']:.4g}"),
      "default_ms": float(f"{record['default_ms']:.4g}") if record.get("default_ms") else None,
      "rel_err": float(f"{best['rel_err']:.3g}"), "shape": record["shape"], "M": record["M"],
      "G": record["G"], "dist": record["dist"], "jax": env["jax"], "date": env["date"],
      "source": "experiments/autotune_gmm.py",
  }
  if record.get("interleave"):
    meta["interleave"] = record["interleave"]   # ms: median over this many interleaved rounds
  return tuning.make_entry(key, cfg, meta)


def lower_only(shapes: dict[str, tuple[int, int, int, int]], ops: list[str],
               backend_names: list[str], dtype: Any) -> list[dict[str, Any]]:
  """Lowers (does not run) every candidate for an abstract H100 on this machine, so candidates
  that cannot lower are found on CPU before GPU time is spent on them (cheap pre-flight)."""
  from kernels.common.gpu_lowering import lower_for_gpu

  sds = jax.ShapeDtypeStruct
  rows = []
  for shape_name, (m, k, n, g) in shapes.items():
    operands = {"gmm": (sds((m, k), dtype), sds((g, k, n), dtype)),
                "gmm_t": (sds((m, n), dtype), sds((g, k, n), dtype)),
                "xty": (sds((m, k), dtype), sds((m, n), dtype))}
    for op in ops:
      kk, nn = (n, k) if op == "gmm_t" else (k, n)
      for backend in backend_names:
        for cfg in candidates(op, backend, kk, nn, dtype):
          row = {"shape": shape_name, "op": op, "backend": backend, "config": short(cfg)}
          if _backend(op, backend).check(GroupedShape(m, kk, nn, g), make_dtypes(dtype), cfg):
            row["status"] = "unsupported"
          else:
            try:
              lower_for_gpu(kernel_fn(op, backend, cfg, False), *operands[op],
                            sds((g,), jnp.int32))
              row["status"] = "lowers"
            except Exception as e:
              row.update(status="fails", why=_error_text(e)[:80])
          print(f"  {shape_name} {op}/{backend} {row['config']}: {row['status']} "
                f"{row.get('why', '')}", flush=True)
          rows.append(row)
  print(bc.table(rows, ["shape", "op", "backend", "config", "status", "why"]))
  return rows


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _merge_record(path: str, env: dict[str, Any], records: list[dict[str, Any]]) -> None:
  """Writes the candidate records, replacing earlier records of the same shape/op/backend."""
  old: list[dict[str, Any]] = []
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f).get("results", [])
  ident = lambda r: (r["shape"], r["M"], r["K"], r["N"], r["G"], r["dist"], r["op"], r["backend"],
                     r["dtype"])
  merged = {ident(r): r for r in old}
  merged.update({ident(r): r for r in records})
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"env": env, "results": list(merged.values())}, f, indent=1, default=float)


def _csv(value: str, allowed: tuple[str, ...] | list[str], name: str) -> list[str]:
  items = [v for v in value.split(",") if v]
  bad = [v for v in items if v not in allowed]
  if bad or not items:
    raise SystemExit(f"--{name} must be a comma-separated subset of {list(allowed)}, got {value!r}")
  return items


def _chosen_shapes(value: str | None) -> dict[str, tuple[int, int, int, int]]:
  """--shapes (default: all of TUNE_SHAPES) -> {name: (M, K, N, G)}."""
  names = _csv(value or ",".join(TUNE_SHAPES), list(TUNE_SHAPES), "shapes")
  return {name: TUNE_SHAPES[name] for name in names}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the autotune; returns {"table": path, "record": path, "entries": [...], "records": [...]}."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--shapes", default=None,
                  help=f"comma-separated subset of {list(TUNE_SHAPES)} (default: all; smoke: 'smoke')")
  ap.add_argument("--ops", default=",".join(OPS), help=f"subset of {list(OPS)}")
  ap.add_argument("--backends", default=",".join(BACKENDS), help=f"subset of {list(BACKENDS)}")
  ap.add_argument("--dtype", default="bfloat16", choices=list(TOL))
  ap.add_argument("--dist", default="uniform", choices=["uniform", "skewed"],
                  help="group sizes: uniform, or Dirichlet(0.5) skew")
  ap.add_argument("--iters", type=int, default=10, help="timed runs per candidate (median)")
  ap.add_argument("--min-gain", type=float, default=0.02,
                  help="keep the default unless the best is at least this much faster")
  ap.add_argument("--interleave", type=int, default=0, metavar="R",
                  help="after the sequential pass, time every passing candidate again in R "
                       "rounds (each round visits each candidate once, starting at a rotated "
                       "position; 1 warmup + --iters runs per visit) and choose by the median "
                       "over the rounds (default 0: the sequential timings decide)")
  ap.add_argument("--write", default=None,
                  help="table to merge the winners into (default kernels/gmm/tuned_configs.json; "
                       "smoke: a temp file)")
  ap.add_argument("--record", default=None,
                  help="JSON of every candidate (default experiments/results/"
                       "autotune_gmm_<device>.json; smoke: next to --write)")
  ap.add_argument("--smoke", action="store_true",
                  help="CPU: tiny shape through the interpret backends, 1 timing iteration")
  ap.add_argument("--lower-only", action="store_true",
                  help="any machine: only lower every candidate for an H100 (no run, no table)")
  args = ap.parse_args(argv)
  if args.interleave < 0:
    raise SystemExit(f"--interleave must be >= 0, got {args.interleave}")

  env = bc.environment()
  device_kind = tuning.current_device_kind()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if args.lower_only:
    shapes = _chosen_shapes(args.shapes)
    rows = lower_only(shapes, _csv(args.ops, OPS, "ops"),
                      _csv(args.backends, BACKENDS, "backends"), jnp.dtype(args.dtype))
    return {"lowered": rows}
  if args.smoke:
    shapes = {**SMOKE_SHAPES}
    if args.shapes:
      raise SystemExit("--shapes: --smoke uses its own tiny shape; leave --shapes out")
    iters, warmup, interpret = 1, 1, True
    write = args.write or os.path.join(tempfile.mkdtemp(prefix="autotune_gmm_"), "tuned.json")
    record_path = args.record or os.path.join(os.path.dirname(os.path.abspath(write)),
                                              "autotune_gmm_record.json")
  else:
    if not registry.on_gpu():
      raise SystemExit("autotune_gmm.py times GPU kernels: run it on a GPU, or use --smoke on CPU")
    shapes = _chosen_shapes(args.shapes)
    iters, warmup, interpret = args.iters, 2, False
    write = args.write or os.path.join(root, "kernels", "gmm", "tuned_configs.json")
    record_path = args.record or os.path.join(root, "experiments", "results",
                                              f"autotune_gmm_{_slug(device_kind)}.json")
  if args.iters < 1:
    raise SystemExit(f"--iters must be >= 1, got {args.iters}")
  ops = _csv(args.ops, OPS, "ops")
  backend_names = _csv(args.backends, BACKENDS, "backends")
  dtype = jnp.dtype(args.dtype)
  if "mosaic" in backend_names and dtype.itemsize != 2:
    print(f"note: Mosaic is used for 16-bit operands only; skipping it for {dtype.name}", flush=True)
    backend_names = [b for b in backend_names if b != "mosaic"]
  print("environment:", env, flush=True)
  print(f"tuning {list(shapes)} x {ops} x {backend_names} ({dtype.name}, {args.dist}) on "
        f"{device_kind!r}; table -> {write}", flush=True)

  records, entries = [], []
  t_start = time.perf_counter()
  for shape_name, shape in shapes.items():
    print(f"== {shape_name}: (M, K, N, G) = {shape}", flush=True)
    for op in ops:
      for backend in backend_names:
        rec = tune(op, backend, shape_name, shape, dtype, args.dist, iters, warmup, interpret,
                   args.smoke, args.min_gain, args.interleave)
        records.append(rec)
        entry = table_entry(rec, device_kind, env)
        if entry is not None:
          entries.append(entry)
        # Written as it goes, so a run cut at its time limit keeps what it finished.
        _merge_record(record_path, env, [rec])
        if entry is not None:
          tuning.write_table(write, [entry], comment=tuning.TABLE_COMMENT)
        print(f"   ({time.perf_counter() - t_start:.0f} s so far)", flush=True)

  if not os.path.exists(write):  # nothing passed: still leave a valid (possibly empty) table
    tuning.write_table(write, [], comment=tuning.TABLE_COMMENT)
  table = tuning.load_table(write)
  for e in entries:  # read back: lookup must now give each chosen config
    key = tuning.TableKey(*(e[f] for f in tuning.TableKey._fields))
    got = tuning.lookup(key.op, key.backend, key.dtype, key.k, key.n, key.m_bucket,
                        device_kind=key.device_kind, path=write)
    if got is None or dataclasses.asdict(got) != e["config"]:
      raise RuntimeError(f"{write}: lookup of {key} gave {got}, not the config just written")

  rows = []
  for rec in records:
    for c in rec["candidates"]:
      rows.append({"shape": rec["shape"], "op": rec["op"], "backend": rec["backend"],
                   "config": c["label"], "status": c["status"] + (" *" if c.get("chosen") else ""),
                   "ms": c.get("ms"), "seq ms": c.get("sequential_ms", ""),
                   "TFLOP/s": c.get("tflops"),
                   "err": f"{c['rel_err']:.1e}" if "rel_err" in c else "",
                   "why": c.get("reason", "")[:60]})
  print(f"\nCandidates ({dtype.name}, {env['device']}, jax {env['jax']}; * = written to the table)")
  columns = ["shape", "op", "backend", "config", "status", "ms", "TFLOP/s", "err", "why"]
  if args.interleave:   # ms: median over the rounds; seq ms: the sequential pass
    columns.insert(6, "seq ms")
  print(bc.table(rows, columns))
  print(f"\nwrote {len(entries)} entries to {write} ({len(table.entries)} in the table); "
        f"candidate record {record_path}; {time.perf_counter() - t_start:.0f} s")
  return {"table": write, "record": record_path, "entries": entries, "records": records}


if __name__ == "__main__":
  main()
