"""Grouped-matmul benchmark and GPU correctness check.

For each shape (Mixtral-like, OLMoE-like, fine-grained) and group-size distribution (uniform,
Dirichlet(0.5) skew), in ONE run:
  1. checks every kernel (forward, data gradient, weight gradient, for each Pallas backend)
     against the float32 reference on fresh random inputs: relative error, NaN, tail rows zero;
  2. times forward, data gradient (dY W^T), weight gradient (X^T dY) and forward+backward for
     our Pallas backends, jax.lax.ragged_dot, XLA dense matmul of the same FLOPs (the ceiling)
     and torch._grouped_mm when torch imports;
  3. writes OUT/<device>/<date>-gmm.json (the run record: command, commit, device, versions,
     date; every number) and prints a TFLOP/s table last.

Run on the GPU:  python -m experiments.bench_grouped_matmul [--out DIR]
CPU smoke test:  python -m experiments.bench_grouped_matmul --smoke --out /tmp/x
"""

from __future__ import annotations

import argparse
import functools
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as bc
from kernels.gmm import mosaic_kernel, mosaic_ws_kernel, reference
from kernels.gmm import group_xty, grouped_matmul

SHAPES = {  # name: (M, K, N, G)
    "mixtral": (32768, 4096, 14336, 8),
    "olmoe": (65536, 2048, 1024, 64),
    "finegrained": (65536, 2048, 2048, 32),
}
SMOKE_SHAPES = {"smoke": (200, 128, 256, 4)}
# Checked, not timed: M not a multiple of any tile, empty groups, a 1-row group, and rows past
# sum(group_sizes) (which must come out zero).
EDGE_SHAPE = (1000, 256, 512, 5)
EDGE_SIZES = np.array([0, 300, 1, 0, 450], np.int32)


def group_sizes_for(m: int, g: int, dist: str, seed: int) -> np.ndarray:
  if dist == "edge":
    return EDGE_SIZES
  rng = np.random.default_rng(seed)
  if dist == "uniform":
    p = np.full(g, 1.0 / g)
  else:
    p = rng.dirichlet(np.full(g, 0.5))
  sizes = np.floor(p * m).astype(np.int64)
  sizes[np.argmax(sizes)] += m - sizes.sum()
  return sizes.astype(np.int32)


rel = bc.rel_err  # ||got - want|| / ||want||; inf on NaN/inf


def check_backend(name, fwd, dgrad, wgrad, lhs, rhs, dy, gs, ref_out, ref_dx, ref_dw, tail):
  """Returns a dict of relative errors; prints PASS/FAIL."""
  res = {}
  out = fwd(lhs, rhs, gs)
  res["fwd_err"] = rel(out, ref_out)
  res["tail_zero"] = bool(tail == out.shape[0] or jnp.all(out[tail:] == 0))
  res["dgrad_err"] = rel(dgrad(dy, rhs, gs), ref_dx)
  res["wgrad_err"] = rel(wgrad(lhs, dy, gs), ref_dw)
  ok = max(res["fwd_err"], res["dgrad_err"], res["wgrad_err"]) < 1e-2 and res["tail_zero"]
  res["pass"] = ok
  print(f"{'PASS' if ok else 'FAIL'} {name}: fwd {res['fwd_err']:.2e} dgrad {res['dgrad_err']:.2e}"
        f" wgrad {res['wgrad_err']:.2e} tail_zero {res['tail_zero']}", flush=True)
  return res


def torch_grouped_mm(lhs_np, rhs_np, sizes_np, iters):
  """Times torch._grouped_mm forward and forward+backward; None if unavailable."""
  try:
    import torch
  except Exception:
    return None
  if not hasattr(torch, "_grouped_mm") or not torch.cuda.is_available():
    return None
  out = {}
  a = torch.from_numpy(lhs_np).to("cuda", torch.bfloat16)
  w = torch.from_numpy(rhs_np).to("cuda", torch.bfloat16)
  # torch._grouped_mm wants the (G, K, N) operand column-major in its last two dims.
  b = w.transpose(-2, -1).contiguous().transpose(-2, -1)
  offs = torch.from_numpy(np.cumsum(sizes_np).astype(np.int32)).to("cuda")
  try:
    out["fwd_ms"] = bc.time_torch(lambda: torch._grouped_mm(a, b, offs=offs), iters=iters)
    a2 = a.clone().requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True)
    cot = torch.randn(a.shape[0], w.shape[2], device="cuda", dtype=torch.bfloat16)

    def fwd_bwd():
      y = torch._grouped_mm(a2, b2, offs=offs)
      y.backward(cot)

    out["fwdbwd_ms"] = bc.time_torch(fwd_bwd, iters=iters)
  except Exception as e:  # record, do not hide
    out["error"] = f"{type(e).__name__}: {e}"[:300]
  del a, w, b
  torch.cuda.empty_cache()
  return out


def time_or_error(fn, *args, iters):
  try:
    return bc.time_jax(fn, *args, iters=iters), None
  except Exception as e:
    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return None, msg


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=bc.RESULTS_DIR,
                  help="results folder: writes OUT/<device>/<date>-gmm.json (default experiments/results)")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU via interpret backends")
  ap.add_argument("--shapes", default=",".join(SHAPES))
  ap.add_argument("--dists", default="uniform,skewed")
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--no-check", action="store_true")
  ap.add_argument("--mosaic-sweep", action="store_true", help="also time a grid of Mosaic configs")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--backends", default="triton,mosaic",
                  help="kernel backends to check and time (subset of triton,mosaic)")
  ap.add_argument("--no-ragged-dot", action="store_true",
                  help="skip timing jax.lax.ragged_dot (slow: ~0.4 s per call at Mixtral-like)")
  args = ap.parse_args()
  kernel_backends = [b for b in args.backends.split(",") if b]
  if not kernel_backends or any(b not in ("triton", "mosaic") for b in kernel_backends):
    raise SystemExit(f"--backends must be a comma-separated subset of triton,mosaic, got "
                     f"{args.backends!r}")

  env = bc.environment()
  print("environment:", env, flush=True)
  if args.smoke:
    shapes, backends, dtype, iters = SMOKE_SHAPES, ["triton_interpret", "mosaic_interpret"], jnp.bfloat16, 1
  else:
    shapes = {k: SHAPES[k] for k in args.shapes.split(",") if k}   # --shapes "": the edge check only
    if not args.no_check:
      shapes = {"edge": EDGE_SHAPE, **shapes}
    backends, dtype, iters = kernel_backends, jnp.bfloat16, args.iters

  results = []
  for shape_name, (m, k, n, g) in shapes.items():
    for dist in (["edge"] if shape_name == "edge" else args.dists.split(",")):
      sizes = group_sizes_for(m, g, dist, seed=hash((shape_name, dist)) % 1000)
      key = jax.random.key(0)
      k1, k2, k3 = jax.random.split(key, 3)
      lhs = jax.random.normal(k1, (m, k), dtype)
      rhs = (jax.random.normal(k2, (g, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
      dy = jax.random.normal(k3, (m, n), dtype)
      gs = jnp.asarray(sizes)
      flops = 2.0 * m * k * n
      row = {"shape": shape_name, "M": m, "K": k, "N": n, "G": g, "dist": dist,
             "group_sizes": sizes.tolist(), "flops_fwd": flops}
      print(f"== {shape_name} {dist}: M={m} K={k} N={n} G={g} min/max group {sizes.min()}/{sizes.max()}",
            flush=True)

      if not args.no_check:
        ref_out = jax.jit(functools.partial(reference.gmm_reference, out_dtype=jnp.float32))(lhs, rhs, gs)
        ref_dx = jax.jit(functools.partial(reference.gmm_reference, transpose_rhs=True,
                                           out_dtype=jnp.float32))(dy, rhs, gs)
        ref_dw = jax.jit(functools.partial(reference.group_xty_reference, out_dtype=jnp.float32))(lhs, dy, gs)
        for b in backends:
          fwd = jax.jit(functools.partial(grouped_matmul, backend=b))
          dgrad = jax.jit(lambda d, w, s, b=b: grouped_matmul(d, w, s, transpose_rhs=True, backend=b),)
          wgrad = jax.jit(functools.partial(group_xty, backend=b))
          try:
            row[f"check_{b}"] = check_backend(
                f"{shape_name}/{dist}/{b}", fwd, dgrad,
                wgrad, lhs, rhs, dy, gs, ref_out, ref_dx, ref_dw, int(sizes.sum()))
          except Exception as e:
            traceback.print_exc()
            row[f"check_{b}"] = {"pass": False, "error": f"{type(e).__name__}: {e}"[:500]}
            print(f"FAIL {shape_name}/{dist}/{b}: {type(e).__name__}", flush=True)
        del ref_out, ref_dx, ref_dw

      if args.smoke or shape_name == "edge":
        results.append(row)
        continue

      def loss(x, w, s, b):
        return jnp.sum(grouped_matmul(x, w, s, backend=b).astype(jnp.float32) * dy.astype(jnp.float32))

      # value_and_grad: the loss value keeps the forward product alive (grad alone lets XLA
      # drop it, since d(loss)/d(x, w) does not need the product itself).

      for b in backends + ([] if args.no_ragged_dot else ["xla"]):
        t = {}
        t["fwd_ms"], e1 = time_or_error(jax.jit(functools.partial(grouped_matmul, backend=b)), lhs, rhs, gs, iters=iters)
        if b != "xla":  # the xla path's gradients are ragged_dot's own (fwd+bwd below)
          t["dgrad_ms"], e2 = time_or_error(
              jax.jit(lambda d, w, s, b=b: grouped_matmul(d, w, s, transpose_rhs=True, backend=b)),
              dy, rhs, gs, iters=iters)
          t["wgrad_ms"], e3 = time_or_error(jax.jit(functools.partial(group_xty, backend=b)), lhs, dy, gs, iters=iters)
        else:
          e2 = e3 = None
        t["fwdbwd_ms"], e4 = time_or_error(
            jax.jit(jax.value_and_grad(functools.partial(loss, b=b), argnums=(0, 1))), lhs, rhs, gs, iters=iters)
        errs = [e for e in (e1, e2, e3, e4) if e]
        if errs:
          t["errors"] = errs
        row[f"time_{'ragged_dot' if b == 'xla' else b}"] = t
        print(f"   {b}: {t}", flush=True)

      if args.mosaic_sweep:
        sweep = {}
        for bm, bn, steps, width in [(128, 128, 6, 4), (128, 128, 4, 8)]:
          cfg = mosaic_kernel.MosaicGmmConfig(block_m=bm, block_n=bn, block_k=64,
                                           max_concurrent_steps=steps, grid_tile_width=width)
          f = jax.jit(lambda x, w, s, cfg=cfg: mosaic_kernel.gmm(x, w, s, transpose_rhs=False,
                                                              out_dtype=x.dtype, config=cfg))
          ms, err = time_or_error(f, lhs, rhs, gs, iters=iters)
          sweep[str(cfg)] = ms if ms else err
          print(f"   {cfg}: {ms if ms else err}", flush=True)
        for bm, bn, steps, width in [(128, 128, 3, 8), (128, 128, 3, 4), (128, 128, 3, 16),
                                     (128, 64, 4, 8), (64, 128, 4, 8)]:
          cfg = mosaic_ws_kernel.MosaicWsGmmConfig(block_m=bm, block_n=bn, block_k=64,
                                                max_concurrent_steps=steps, grid_tile_width=width)
          if not mosaic_ws_kernel.supports(k, n, cfg):
            continue
          for tr in (False, True):
            w_in = jnp.swapaxes(rhs, 1, 2) if tr else rhs
            f = jax.jit(lambda x, w, s, cfg=cfg, tr=tr: mosaic_ws_kernel.gmm(
                x, w, s, transpose_rhs=tr, out_dtype=x.dtype, config=cfg))
            ms, err = time_or_error(f, lhs, w_in, gs, iters=iters)
            sweep[f"{cfg} transpose_rhs={tr}"] = ms if ms else err
            print(f"   {cfg} transpose_rhs={tr}: {ms if ms else err}", flush=True)
        row["mosaic_sweep_fwd_ms"] = sweep


      dense_m = m
      a = jax.random.normal(k1, (dense_m, k), dtype)
      w0 = rhs[0]
      row["time_dense"] = {"fwd_ms": bc.time_jax(jax.jit(jnp.dot), a, w0, iters=iters)}
      del a
      if not args.no_torch:
        row["time_torch"] = torch_grouped_mm(np.asarray(lhs.astype(jnp.float32)),
                                             np.asarray(rhs.astype(jnp.float32)), sizes, iters)
        print(f"   torch: {row['time_torch']}", flush=True)
      results.append(row)
      bc.write_result(args.out, "gmm", {"env": env, "results": results})

  path = bc.write_result(args.out, "gmm", {"env": env, "results": results})
  print(f"wrote {path}")
  # Table: TFLOP/s (fwd counts 2MKN; dgrad/wgrad the same; fwd+bwd 3x).
  rows = []
  for r in results:
    for impl in ["triton", "mosaic", "ragged_dot", "dense", "torch"]:
      t = r.get(f"time_{impl}") or {}
      if not t:
        continue
      def tf(key, mult=1.0):
        v = t.get(key)
        return bc.tflops(r["flops_fwd"] * mult, v) if v else None
      rows.append({"shape": r["shape"], "dist": r["dist"], "impl": impl,
                   "fwd": tf("fwd_ms"), "dgrad": tf("dgrad_ms"), "wgrad": tf("wgrad_ms"),
                   "fwd+bwd": tf("fwdbwd_ms", 3.0)})
  if rows:
    print("TFLOP/s (bf16, " + env["device"] + ", jax " + env["jax"] + ")")
    print(bc.table(rows, ["shape", "dist", "impl", "fwd", "dgrad", "wgrad", "fwd+bwd"]))
  fails = [k for r in results for k, v in r.items() if k.startswith("check_") and not v.get("pass")]
  print("CHECKS:", "ALL PASS" if not fails else f"{len(fails)} FAIL")


if __name__ == "__main__":
  main()
