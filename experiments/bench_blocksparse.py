"""Block-sparse (MegaBlocks) benchmark and GPU correctness check.

In ONE run:
  1. checks: every op (sdd, dsd, dds and the transposed forms the gradients use, forward and
     forward+backward) against dense masked references at an edge shape (rows not a multiple of
     the block, an empty expert, rows of one expert only), with sdd output poisoned first
     (padding blocks must come out exactly zero); at the timed shapes, sdd/dsd against the
     grouped matmul (kernels.grouped_matmul, xla backend) on the same routing; the full expert
     GLU against the grouped path. PASS/FAIL lines.
  2. op timings at Mixtral-like (32768 rows, d 4096, f 14336, E 8), OLMoE-like (65536, 2048, 1024,
     64) and fine-grained (65536, 2048, 2048, 32): each op forward, sdd/dsd forward+backward,
     against kernels.grouped_matmul and jax.lax.ragged_dot of the same useful FLOPs (2*M*d*f).
  3. the full SwiGLU expert MLP forward+backward at T=16384 tokens: Mixtral-like (d 4096, f 14336,
     E 8, k 2), OLMoE-like (2048, 1024, 64, 8), fine-grained (2048, 1408, 64, 6): block-sparse vs
     grouped path (sort + gather + kernels.grouped_matmul + unsort/combine) vs jax.lax.ragged_dot:
     time, TFLOP/s and memory (compiled plan and device peak).
  4. JSON (run record and all numbers) to OUT/<device>/<date>-blocksparse.json, compact table last.
TFLOP/s always count useful FLOPs (2*M*d*f per product), so padding shows up as lost speed.

GPU:        python -m experiments.bench_blocksparse [--out DIR] [--block-size 128 --num-warps 8
            --num-stages 3 --block-k 64 --block-n 128 --block-m 128 --group-lines 8 --shapes mixtral]
CPU smoke:  python -m experiments.bench_blocksparse --smoke --out /tmp/x
"""

from __future__ import annotations

import argparse
import functools
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as bc
from kernels import grouped_matmul
from kernels.blocksparse import (
    BlockSparseConfig, dds, dds_reference, dmoe_mlp, dsd, dsd_reference, make_topology, pad_rows,
    pad_to_blocks, sdd, sdd_reference)

OP_SHAPES = {  # name: (rows M, d, f, E)
    "mixtral": (32768, 4096, 14336, 8),
    "olmoe": (65536, 2048, 1024, 64),
    "finegrained": (65536, 2048, 2048, 32),
}
MLP_SHAPES = {  # name: (tokens T, d, f, E, k)
    "mixtral": (16384, 4096, 14336, 8, 2),
    "olmoe": (16384, 2048, 1024, 64, 8),
    "finegrained": (16384, 2048, 1408, 64, 6),
}
EDGE = (1000, 256, 512, np.array([0, 300, 1, 0, 450, 249], np.int32))   # M, d, f, sizes
SMOKE_OP = {"smoke": (100, 32, 64, 4)}
SMOKE_MLP = {"smoke": (40, 32, 64, 4, 2)}
SMOKE_EDGE = (70, 32, 32, np.array([0, 33, 1, 0, 36], np.int32))


rel = bc.rel_err  # ||got - want|| / ||want||; inf on NaN/inf


def report(checks: list, name: str, err: float, tol: float = 1e-2, extra: bool = True) -> None:
  ok = err <= tol and extra
  checks.append({"name": name, "err": err, "pass": ok})
  print(f"{'PASS' if ok else 'FAIL'} {name}: rel err {err:.2e}" + ("" if extra else " (extra check failed)"),
        flush=True)


def guarded(checks, name, fn):
  try:
    fn()
  except Exception as e:
    traceback.print_exc()
    checks.append({"name": name, "pass": False, "error": f"{type(e).__name__}: {e}"[:400]})
    print(f"FAIL {name}: {type(e).__name__}", flush=True)


def time_or_error(fn, *args, iters):
  try:
    return bc.time_jax(fn, *args, iters=iters), None
  except Exception as e:
    return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def sizes_for(m: int, e: int, seed: int) -> np.ndarray:
  """Near-uniform group sizes summing to m (routing noise of a balanced router)."""
  p = np.random.default_rng(seed).dirichlet(np.full(e, 20.0))
  s = np.floor(p * m).astype(np.int64)
  s[np.argmax(s)] += m - s.sum()
  return s.astype(np.int32)


def normal(key, shape, dtype, scale=1.0):
  return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


# ---------------------------------------------------------------------------- checks -------------

def check_edge(checks, edge, backend, cfg, block):
  """Every op and flag pair against the dense masked reference, forward and gradients."""
  m, d, f, sizes = edge
  topo = make_topology(jnp.asarray(sizes), m, ffn_size=f, block_size=block)
  p, ns = topo.sparse_shape
  ks = jax.random.split(jax.random.key(1), 6)
  dt = jnp.bfloat16
  x, w = normal(ks[0], (p, d), dt), normal(ks[1], (d, ns), dt, d ** -0.5)
  data = sdd_reference(x, w, topo)
  kw = dict(backend=backend, config=cfg)
  for ta in (False, True):
    for tb in (False, True):
      a = x.T if ta else x
      b = w.T if tb else w
      out = jax.jit(lambda a, b: sdd(a, b, topo, transpose_lhs=ta, transpose_rhs=tb, **kw))(a, b)
      pad_zero = bool(jnp.all(out[int(topo.nnz[0]):] == 0))
      report(checks, f"edge/sdd ta={ta} tb={tb}",
             rel(out, sdd_reference(a, b, topo, transpose_lhs=ta, transpose_rhs=tb, out_dtype=jnp.float32)),
             extra=pad_zero)
      r = normal(ks[2], (p if ta else ns, d), dt)
      r = r.T if tb else r
      out = jax.jit(lambda s, r: dsd(s, r, topo, transpose_lhs=ta, transpose_rhs=tb, **kw))(data, r)
      report(checks, f"edge/dsd ta={ta} tb={tb}",
             rel(out, dsd_reference(data, r, topo, transpose_lhs=ta, transpose_rhs=tb, out_dtype=jnp.float32)))
      l = normal(ks[3], (d, ns if tb else p), dt)
      l = l.T if ta else l
      out = jax.jit(lambda l, s: dds(l, s, topo, transpose_lhs=ta, transpose_rhs=tb, **kw))(l, data)
      report(checks, f"edge/dds ta={ta} tb={tb}",
             rel(out, dds_reference(l, data, topo, transpose_lhs=ta, transpose_rhs=tb, out_dtype=jnp.float32)))
  # Gradients of sdd and dsd against autodiff of the references.
  for name, op, ref, a, b in [("sdd", sdd, sdd_reference, x, w),
                              ("dsd", dsd, dsd_reference, data, normal(ks[4], (ns, d), dt))]:
    ct = normal(ks[5], jax.eval_shape(lambda: ref(a, b, topo)).shape, jnp.float32)
    got = jax.jit(jax.grad(lambda a, b: jnp.sum(op(a, b, topo, **kw).astype(jnp.float32) * ct), (0, 1)))(a, b)
    want = jax.grad(lambda a, b: jnp.sum(ref(a, b, topo, out_dtype=jnp.float32) * ct), (0, 1))(
        a.astype(jnp.float32), b.astype(jnp.float32))
    for g, wt, which in zip(got, want, ("d_lhs", "d_rhs")):
      report(checks, f"edge/{name} grad {which}", rel(g, wt))


def compact(data, topo):
  """(Z, b, b) blocks -> (P, f): row block r's C blocks side by side (the expert's columns)."""
  r, c, b = topo.num_row_blocks, topo.blocks_per_expert, topo.block_size
  return data.reshape(r, c, b, b).transpose(0, 2, 1, 3).reshape(r * b, c * b)


# ---------------------------------------------------------------------------- op benchmarks ------

def bench_ops(name, shape, backend, cfg, block, iters, checks, smoke):
  m, d, f, e = shape
  sizes = sizes_for(m, e, seed=len(name))
  gs = jnp.asarray(sizes)
  topo = make_topology(gs, m, ffn_size=f, block_size=block)
  p, ns = topo.sparse_shape
  dt = jnp.bfloat16
  ks = jax.random.split(jax.random.key(0), 6)
  xs = normal(ks[0], (m, d), dt)                      # expert-sorted rows
  w1 = normal(ks[1], (e, d, f), dt, d ** -0.5)
  w2 = normal(ks[2], (e, f, d), dt, f ** -0.5)
  xp = pad_rows(xs, topo)
  w1c = jnp.transpose(w1, (1, 0, 2)).reshape(d, ns)
  w2c = w2.reshape(ns, d)
  dy = normal(ks[3], (p, d), dt)
  kw = dict(backend=backend, config=cfg)
  try:
    h = jax.jit(lambda a, b: sdd(a, b, topo, **kw))(xp, w1c)
  except Exception as ex:  # keep going: the other ops still get timed on random blocks
    traceback.print_exc()
    checks.append({"name": f"{name}/sdd run", "pass": False, "error": f"{type(ex).__name__}: {ex}"[:400]})
    h = normal(ks[4], topo.data_shape, dt)
  row = {"shape": name, "M": m, "d": d, "f": f, "E": e, "block": block,
         "padded_rows_valid": int(topo.padded_offsets[-1]), "padded_rows_bound": p,
         "flops": 2.0 * m * d * f, "group_sizes": sizes.tolist()}
  print(f"== ops {name}: M={m} d={d} f={f} E={e}  padded rows {row['padded_rows_valid']} (bound {p})",
        flush=True)

  def checks_at_shape():
    ref_h = grouped_matmul(xs.astype(jnp.float32), w1.astype(jnp.float32), gs, backend="xla")
    report(checks, f"{name}/sdd vs grouped", rel(compact(h, topo), pad_rows(ref_h, topo)))
    hs = ref_h.astype(dt)
    hp = pad_rows(hs, topo)
    hb = (hp.reshape(topo.num_row_blocks, block, topo.blocks_per_expert, block)
          .transpose(0, 2, 1, 3).reshape(topo.data_shape))
    got = jax.jit(lambda s, w: dsd(s, w, topo, **kw))(hb, w2c)
    ref_y = grouped_matmul(hs.astype(jnp.float32), w2.astype(jnp.float32), gs, backend="xla")
    report(checks, f"{name}/dsd vs grouped", rel(got, pad_rows(ref_y, topo)))

  guarded(checks, f"{name}/checks", checks_at_shape)
  if smoke:
    iters = 1

  ct_h = normal(ks[4], topo.data_shape, dt)
  ct_y = dy
  ops = {
      "sdd": (lambda a, b: sdd(a, b, topo, **kw), (xp, w1c)),
      "dsd": (lambda s, b: dsd(s, b, topo, **kw), (h, w2c)),
      "sdd_nt (dH)": (lambda a, b: sdd(a, b, topo, transpose_rhs=True, **kw), (dy, w2c)),
      "dsd_tn (dW2)": (lambda s, b: dsd(s, b, topo, transpose_lhs=True, **kw), (h, dy)),
      "dsd_nt (dX)": (lambda s, b: dsd(s, b, topo, transpose_rhs=True, **kw), (h, w1c)),
      "dds_tn (dW1)": (lambda a, s: dds(a, s, topo, transpose_lhs=True, **kw), (xp, h)),
  }
  times = {}
  for op_name, (fn, args) in ops.items():
    times[op_name], err = time_or_error(jax.jit(fn), *args, iters=iters)
    if err:
      times[op_name + " error"] = err

  def fb(fn, ct):
    return jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(fn(a, b).astype(jnp.float32) * ct), (0, 1)))

  times["sdd fwd+bwd"], err = time_or_error(fb(ops["sdd"][0], ct_h), xp, w1c, iters=iters)
  times["dsd fwd+bwd"], err2 = time_or_error(fb(ops["dsd"][0], ct_y), h, w2c, iters=iters)
  row["blocksparse_ms"] = times
  for err_ in (err, err2):
    if err_:
      times.setdefault("errors", []).append(err_)

  # Baselines on the unpadded expert-sorted rows, same useful FLOPs.
  dy_s = normal(ks[5], (m, f), dt)
  base = {}
  for b_name, mm in [("grouped", lambda a, w, s: grouped_matmul(a, w, s, backend=None if not smoke else "xla")),
                     ("ragged_dot", jax.lax.ragged_dot)]:
    t = {}
    t["fwd"], e1 = time_or_error(jax.jit(mm), xs, w1, gs, iters=iters)
    loss = lambda a, w, s: jnp.sum(mm(a, w, s).astype(jnp.float32) * dy_s.astype(jnp.float32))
    t["fwd+bwd"], e2 = time_or_error(jax.jit(jax.value_and_grad(loss, (0, 1))), xs, w1, gs, iters=iters)
    if e1 or e2:
      t["errors"] = [x for x in (e1, e2) if x]
    base[b_name] = t
  row["baselines_ms"] = base
  print(f"   block-sparse ms: {times}\n   baselines ms: {base}", flush=True)
  return row


# ---------------------------------------------------------------------------- full MLP -----------

def grouped_mlp(x, idx, cw, w1, w2, w3, matmul):
  """Sort + gather + grouped matmuls (SwiGLU) + unsort/combine."""
  t, k = idx.shape
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  gs = jnp.bincount(flat, length=w1.shape[0]).astype(jnp.int32)
  xs = x[order // k]
  h = jax.nn.silu(matmul(xs, w1, gs).astype(jnp.float32)) * matmul(xs, w3, gs).astype(jnp.float32)
  ys = matmul(h.astype(x.dtype), w2, gs)
  y = jnp.zeros((t * k, x.shape[1]), ys.dtype).at[order].set(ys).reshape(t, k, -1)
  return jnp.einsum("tk,tkd->td", cw.astype(jnp.float32), y.astype(jnp.float32)).astype(x.dtype)


def bench_mlp(name, shape, backend, cfg, block, iters, checks, smoke, ragged=True):
  t, d, f, e, k = shape
  dt = jnp.bfloat16
  ks = jax.random.split(jax.random.key(2), 7)
  x = normal(ks[0], (t, d), dt)
  logits = jax.random.normal(ks[1], (t, e))
  cw, idx = jax.lax.top_k(jax.nn.softmax(logits), k)
  idx = idx.astype(jnp.int32)
  cw = cw.astype(dt)
  w1, w3 = normal(ks[2], (e, d, f), dt, d ** -0.5), normal(ks[3], (e, d, f), dt, d ** -0.5)
  w2 = normal(ks[4], (e, f, d), dt, f ** -0.5)
  ct = normal(ks[5], (t, d), jnp.float32)
  gmm_backend = "xla" if smoke else None
  impls = {
      "blocksparse": lambda x, cw, w1, w2, w3: dmoe_mlp(
          x, idx, cw, w1, w2, w3, activation=jax.nn.silu, block_size=block, backend=backend, config=cfg),
      "grouped": lambda x, cw, w1, w2, w3: grouped_mlp(
          x, idx, cw, w1, w2, w3, functools.partial(grouped_matmul, backend=gmm_backend)),
      "ragged_dot": lambda x, cw, w1, w2, w3: grouped_mlp(x, idx, cw, w1, w2, w3, jax.lax.ragged_dot),
  }
  if not ragged:   # --no-ragged-dot: its f+b takes seconds at the 64-expert shapes
    del impls["ragged_dot"]
  flops = 18.0 * t * k * d * f      # 3 products, forward + 2x backward
  r = pad_to_blocks(idx, e, ffn_size=f, block_size=block)
  row = {"shape": name, "T": t, "d": d, "f": f, "E": e, "k": k, "block": block, "flops_fwdbwd": flops,
         "padded_rows_valid": int(r.topo.padded_offsets[-1]), "padded_rows_bound": r.topo.padded_rows}
  print(f"== mlp {name}: T={t} d={d} f={f} E={e} k={k}", flush=True)
  args = (x, cw, w1, w2, w3)

  def check():
    ref_name = "ragged_dot" if "ragged_dot" in impls else "grouped"
    ref = jax.jit(impls[ref_name])(*args)
    for impl in [i for i in ("blocksparse", "grouped") if i != ref_name]:
      report(checks, f"mlp/{name}/{impl} vs {ref_name} fwd", rel(jax.jit(impls[impl])(*args), ref))

  guarded(checks, f"mlp/{name}/check", check)
  for impl, fn in impls.items():
    step = jax.value_and_grad(lambda *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32) * ct), argnums=(0, 1, 2, 3, 4))
    res = {}
    try:
      res["compiled_bytes"] = bc.compiled_bytes(step, *args)
    except Exception as ex:
      res["compiled_bytes_error"] = f"{type(ex).__name__}"
    res["ms"], err = time_or_error(jax.jit(step), *args, iters=1 if smoke else iters)
    res["device_peak_bytes_so_far"] = bc.peak_bytes()   # cumulative over the process
    if err:
      res["error"] = err
    if res["ms"]:
      res["tflops"] = bc.tflops(flops, res["ms"])
    row[impl] = res
    print(f"   {impl}: {res}", flush=True)
  return row


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=bc.RESULTS_DIR,
                  help="results folder: writes OUT/<device>/<date>-blocksparse.json (default experiments/results)")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU via triton_interpret")
  ap.add_argument("--shapes", default=",".join(OP_SHAPES))
  ap.add_argument("--only", choices=["ops", "mlp", "all"], default="all")
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--block-size", type=int, default=128)
  ap.add_argument("--block-k", type=int, default=64)
  ap.add_argument("--block-n", type=int, default=128)
  ap.add_argument("--block-m", type=int, default=128)
  ap.add_argument("--group-lines", type=int, default=8)
  ap.add_argument("--num-warps", type=int, default=8)
  ap.add_argument("--num-stages", type=int, default=3)
  ap.add_argument("--no-edge", action="store_true", help="skip the edge-shape checks")
  ap.add_argument("--no-ragged-dot", action="store_true",
                  help="MLP: do not time jax.lax.ragged_dot (check against the grouped path)")
  args = ap.parse_args()

  env = bc.environment()
  print("environment:", env, flush=True)
  if args.smoke:
    backend, block = "triton_interpret", 16
    cfg = BlockSparseConfig(block_k=16, block_n=16, block_m=16, group_lines=2)
    op_shapes, mlp_shapes, edge = SMOKE_OP, SMOKE_MLP, SMOKE_EDGE
  else:
    backend, block = "triton", args.block_size
    cfg = BlockSparseConfig(block_k=args.block_k, block_n=args.block_n, block_m=args.block_m,
                            group_lines=args.group_lines, num_warps=args.num_warps, num_stages=args.num_stages)
    names = args.shapes.split(",")
    op_shapes = {n: OP_SHAPES[n] for n in names}
    mlp_shapes = {n: MLP_SHAPES[n] for n in names}
    edge = EDGE
  payload = {"env": env, "config": {"backend": backend, "block_size": block, **cfg.__dict__},
             "checks": [], "ops": [], "mlp": []}
  checks = payload["checks"]
  out = lambda: bc.write_result(args.out, "blocksparse", payload)

  if not args.no_edge:
    guarded(checks, "edge", lambda: check_edge(checks, edge, backend, cfg, block))
  if args.only in ("ops", "all"):
    for name, shape in op_shapes.items():
      guarded(checks, f"ops/{name}", lambda: payload["ops"].append(
          bench_ops(name, shape, backend, cfg, block, args.iters, checks, args.smoke)))
      out()
  if args.only in ("mlp", "all"):
    for name, shape in mlp_shapes.items():
      guarded(checks, f"mlp/{name}", lambda: payload["mlp"].append(
          bench_mlp(name, shape, backend, cfg, block, args.iters, checks, args.smoke,
                    ragged=not args.no_ragged_dot)))
      out()
  print(f"wrote {out()}")

  rows = []
  for r in payload["ops"]:
    bs, base = r["blocksparse_ms"], r["baselines_ms"]
    tf = lambda ms, mult=1.0: bc.tflops(r["flops"] * mult, ms) if ms else None
    rows.append({"shape": r["shape"], "sdd": tf(bs.get("sdd")), "dsd": tf(bs.get("dsd")),
                 "dH": tf(bs.get("sdd_nt (dH)")), "dW2": tf(bs.get("dsd_tn (dW2)")),
                 "dX": tf(bs.get("dsd_nt (dX)")), "dW1": tf(bs.get("dds_tn (dW1)")),
                 "sdd f+b": tf(bs.get("sdd fwd+bwd"), 3), "dsd f+b": tf(bs.get("dsd fwd+bwd"), 3),
                 "gmm fwd": tf(base["grouped"].get("fwd")), "gmm f+b": tf(base["grouped"].get("fwd+bwd"), 3),
                 "ragged fwd": tf(base["ragged_dot"].get("fwd")),
                 "ragged f+b": tf(base["ragged_dot"].get("fwd+bwd"), 3)})
  if rows:
    print("op TFLOP/s (useful FLOPs 2*M*d*f; f+b = 3x), bf16, " + env["device"] + ", jax " + env["jax"])
    print(bc.table(rows, list(rows[0])))
  rows = []
  for r in payload["mlp"]:
    for impl in [i for i in ("blocksparse", "grouped", "ragged_dot") if i in r]:
      res = r.get(impl, {})
      mb = lambda v: v / 2 ** 20 if v else None
      rows.append({"shape": r["shape"], "impl": impl, "ms": res.get("ms"), "TFLOP/s": res.get("tflops"),
                   "plan MiB": mb(res.get("compiled_bytes")),
                   "vs grouped": (r["grouped"]["ms"] / res["ms"]) if res.get("ms") and r["grouped"].get("ms") else None})
  if rows:
    print("expert SwiGLU fwd+bwd, T=16384 (vs grouped = grouped ms / this ms; target >= 0.7)")
    print(bc.table(rows, list(rows[0])))
  fails = [c["name"] for c in checks if not c.get("pass")]
  print("CHECKS:", "ALL PASS" if not fails else f"{len(fails)} FAIL: {fails}")


if __name__ == "__main__":
  main()
