"""MoE layer benchmark and GPU correctness check: routing and the Flax NNX MoE layers.

In ONE run:
  1. checks the layer (every impl in jaxmoe.config.IMPLS, plus MoA) against a float32 dense
     per-expert reference at a small shape on random inputs: outputs, gradients (relative error,
     NaN/inf), dropless impls against each other, capacity with a large factor dropping nothing;
     then, at the timed shape, every impl against ragged_dot on the same parameters;
  2. times forward+backward (router included) of MoE(impl=...) at the Mixtral-like shape
     (T=16384, d 4096, f 14336, E 8, k 2, SwiGLU, bf16) against the bare expert computation on the
     same routing: (a) sort + gather + grouped_matmul GLU + unsort/combine, (b) the three grouped
     matmuls alone on pre-sorted rows; median of --iters runs after warm-up (bench_common.time_jax);
  3. writes JSON (run record, every number) to OUT/<device>/<date>-layer.json;
  4. prints a compact table last: ms, expert TFLOP/s and the layer/bare ratio (target >= 0.85).

Run on the GPU:  python -m experiments.bench_moe_layer [--out DIR]
CPU smoke test:  python -m experiments.bench_moe_layer --smoke --out /tmp/x   (tiny shapes,
                 grouped matmul through the Pallas interpret backend)
"""

from __future__ import annotations

import argparse
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import bench_common as bc
from jaxmoe import MoE, MoEConfig, dispatch
from jaxmoe.config import DROPLESS_IMPLS, IMPLS
from jaxmoe.experts import activation_fn
from jaxmoe.moa import MOA_IMPLS, MoA, MoAConfig
from kernels import grouped_matmul

# name: (T, d_model, d_ff, E, k)
SHAPES = {"mixtral": (16384, 4096, 14336, 8, 2)}
CHECK_SHAPE = (512, 256, 512, 8, 2)
SMOKE_SHAPES = {"smoke": (64, 32, 64, 4, 2)}
SMOKE_CHECK_SHAPE = (48, 32, 64, 4, 2)
TOL = {"float32": 1e-4, "bfloat16": 2e-2}


rel = bc.rel_err  # ||got - want|| / ||want||; inf on NaN/inf


def report(name: str, err: float, tol: float, checks: dict) -> None:
  ok = bool(np.isfinite(err) and err <= tol)
  checks[name] = {"rel_err": err, "tol": tol, "pass": ok}
  print(f"{'PASS' if ok else 'FAIL'} {name}: rel_err={err:.3g} (tol {tol:.1g})", flush=True)


def dense_reference(layer: MoE, x: jax.Array) -> jax.Array:
  """Every expert on every token in float32, weighted by the router's choices (no drops)."""
  cfg = layer.config
  t = x.reshape(-1, cfg.d_model).astype(jnp.float32)
  r = layer.router(t)
  ex, act = layer.experts, activation_fn(cfg.activation)
  p = lambda v: v[...].astype(jnp.float32)
  y = jnp.zeros_like(t)
  for e in range(cfg.num_experts):
    h = act(t @ p(ex.w_gate)[e])
    if cfg.is_glu:
      h = h * (t @ p(ex.w_up)[e])
    coef = jnp.sum(jnp.where(r.indices == e, r.weights, 0.0), axis=1)
    y = y + coef[:, None] * (h @ p(ex.w_out)[e])
  return y.reshape(x.shape)


def layer_loss_fn(graphdef, impl):
  """(state, x, g) -> loss of the layer rebuilt from state: sum(y * g) + weighted aux losses."""
  def loss(state, x, g):
    layer = nnx.merge(graphdef, state)
    y, stats = layer(x, impl=impl)
    return jnp.sum(y.astype(jnp.float32) * g) + stats.loss
  return loss


def run_checks(shape, dtype, backend, block_size, checks: dict, impls=IMPLS) -> None:
  t, d, f, e, k = shape
  cfg = MoEConfig(d_model=d, d_ff=f, num_experts=e, top_k=k, capacity_factor=float(e),
                  backend=backend, block_size=block_size)
  key = jax.random.key(1)
  x = jax.random.normal(key, (t, d), jnp.float32).astype(dtype)
  g = jax.random.normal(jax.random.key(2), (t, d), jnp.float32)
  tol = TOL[jnp.dtype(dtype).name]
  layer = MoE(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32)
  graphdef, state = nnx.split(layer)
  want = jax.jit(dense_reference)(layer, x.astype(jnp.float32))
  ref_loss = lambda s, x, g: jnp.sum(dense_reference(nnx.merge(graphdef, s), x) * g)
  want_gs, want_gx = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(state, x.astype(jnp.float32), g)
  for impl in impls:
    name = f"moe/{jnp.dtype(dtype).name}/{impl}"
    try:
      y, stats = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, impl=impl))(state, x)
      report(f"{name}/forward", rel(y, want), tol, checks)
      report(f"{name}/dropped_fraction", abs(float(stats.dropped_fraction)), 0.0, checks)
      gs, gx = jax.jit(jax.grad(layer_loss_fn(graphdef, impl), argnums=(0, 1)))(state, x, g)
      report(f"{name}/dx", rel(gx, want_gx), tol, checks)
      for wname in ("w_gate", "w_up", "w_out"):
        report(f"{name}/d{wname}", rel(gs["experts"][wname][...], want_gs["experts"][wname][...]),
               tol, checks)
    except Exception as err:  # a failing impl must not hide the others' numbers
      traceback.print_exc()
      checks[name] = {"pass": False, "error": f"{type(err).__name__}: {err}"[:500]}
      print(f"FAIL {name}: {type(err).__name__}", flush=True)


def run_moa_check(dtype, backend, checks: dict) -> None:
  cfg = MoAConfig(d_model=64, num_heads=2, head_dim=32, num_experts=4, top_k=2, backend=backend)
  layer = MoA(cfg, rngs=nnx.Rngs(0), dtype=dtype)
  x = jax.random.normal(jax.random.key(3), (2, 64, 64), jnp.float32).astype(dtype)
  outs = {impl: jax.jit(lambda m, x, impl=impl: m(x, impl=impl)[0])(layer, x) for impl in MOA_IMPLS}
  f32 = MoA(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)
  want = f32(x.astype(jnp.float32), impl="ragged_dot")[0]
  for impl, y in outs.items():
    report(f"moa/{jnp.dtype(dtype).name}/{impl}", rel(y, want), TOL[jnp.dtype(dtype).name], checks)


def bare_fns(cfg: MoEConfig, backend):
  """The expert computation without the layer: (a) sort + gmm GLU + combine, (b) gmm GLU only."""
  act = activation_fn(cfg.activation)
  mm = lambda a, w, s: grouped_matmul(a, w, s, backend=backend)

  def glu(rows, wg, wu, wo, sizes):
    h = act(mm(rows, wg, sizes).astype(jnp.float32)) * mm(rows, wu, sizes).astype(jnp.float32)
    return mm(h.astype(rows.dtype), wo, sizes)

  def with_dispatch(params, x, g, indices, weights):
    disp = dispatch.sort_by_expert(indices, cfg.num_experts)
    y_sorted = glu(dispatch.gather_sorted(x, disp), *params, disp.group_sizes)
    y = dispatch.combine_sorted(y_sorted, disp, weights)
    return jnp.sum(y.astype(jnp.float32) * g)

  def kernels_only(params, rows, g_rows, sizes):
    return jnp.sum(glu(rows, *params, sizes).astype(jnp.float32) * g_rows)

  return with_dispatch, kernels_only


def time_or_error(fn, *args, iters):
  try:
    return bc.time_jax(fn, *args, iters=iters), None
  except Exception as err:
    traceback.print_exc()
    return None, f"{type(err).__name__}: {err}"[:500]


def run_timing(name, shape, dtype, param_dtype, backend, block_size, iters, checks, smoke,
               impls=IMPLS) -> dict:
  t, d, f, e, k = shape
  cfg = MoEConfig(d_model=d, d_ff=f, num_experts=e, top_k=k, activation="swiglu", backend=backend,
                  block_size=block_size)
  layer = MoE(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (t, d), jnp.float32).astype(dtype)
  g = jax.random.normal(jax.random.key(2), (t, d), jnp.float32)
  flops_fwd = 2.0 * t * k * d * f * (3 if cfg.is_glu else 2)
  row = {"shape": name, "T": t, "d_model": d, "d_ff": f, "E": e, "k": k,
         "dtype": jnp.dtype(dtype).name, "param_dtype": jnp.dtype(param_dtype).name,
         "flops_fwd": flops_fwd, "times": {}, "bytes": {}}

  # Same parameters and routing for the bare computation.
  routing = jax.jit(lambda s, x: nnx.merge(graphdef, s).router(x))(state, x)
  row["tokens_per_expert"] = np.bincount(np.asarray(routing.indices).ravel(), minlength=e).tolist()
  ex = layer.experts
  params = tuple(p[...].astype(dtype) for p in (ex.w_gate, ex.w_up, ex.w_out))
  with_dispatch, kernels_only = bare_fns(cfg, backend)
  disp = jax.jit(dispatch.sort_by_expert, static_argnums=1)(routing.indices, e)
  rows = jnp.take(x, disp.token, axis=0)
  g_rows = jax.random.normal(jax.random.key(4), (t * k, d), jnp.float32)

  # The timed shape's agreement check compares against ragged_dot, or the first dropless impl
  # timed when ragged_dot is not (it is slow and memory-hungry at large shapes).
  ref_impl = "ragged_dot" if "ragged_dot" in impls else next(
      (i for i in impls if i in DROPLESS_IMPLS), None)
  ref_y = None
  for impl in impls:
    fb = jax.jit(jax.value_and_grad(layer_loss_fn(graphdef, impl), argnums=(0, 1)))
    fwd = jax.jit(lambda s, x, impl=impl: nnx.merge(graphdef, s)(x, impl=impl)[0])
    if not smoke:  # on the timed shape: same parameters, impls agree with ragged_dot
      try:
        y = fwd(state, x)
        if impl == ref_impl:
          ref_y = y
      except Exception:
        traceback.print_exc()
    ms_f, err_f = time_or_error(fwd, state, x, iters=iters)
    ms_fb, err_fb = time_or_error(fb, state, x, g, iters=iters)
    row["times"][impl] = {"fwd_ms": ms_f, "fwdbwd_ms": ms_fb, "errors": [e_ for e_ in (err_f, err_fb) if e_]}
    try:
      row["bytes"][impl] = bc.compiled_bytes(jax.value_and_grad(layer_loss_fn(graphdef, impl),
                                                                argnums=(0, 1)), state, x, g)
    except Exception as err:
      row["bytes"][impl] = f"{type(err).__name__}"
    print(f"   {impl}: {row['times'][impl]}", flush=True)
  if ref_y is not None and not smoke:
    for impl in (i for i in impls if i in DROPLESS_IMPLS and i != ref_impl):
      y = jax.jit(lambda s, x, impl=impl: nnx.merge(graphdef, s)(x, impl=impl)[0])(state, x)
      report(f"{name}/{impl}_vs_{ref_impl}", rel(y, ref_y), TOL[jnp.dtype(dtype).name], checks)

  bare_fb = jax.jit(jax.value_and_grad(with_dispatch, argnums=(0, 1)))
  kern_fb = jax.jit(jax.value_and_grad(kernels_only, argnums=(0, 1)))
  ms1, err1 = time_or_error(bare_fb, params, x, g, routing.indices, routing.weights, iters=iters)
  ms2, err2 = time_or_error(kern_fb, params, rows, g_rows, disp.group_sizes, iters=iters)
  row["times"]["bare_dispatch_gmm"] = {"fwdbwd_ms": ms1, "errors": [e_ for e_ in (err1,) if e_]}
  row["times"]["bare_gmm_only"] = {"fwdbwd_ms": ms2, "errors": [e_ for e_ in (err2,) if e_]}
  print(f"   bare: dispatch+gmm {ms1} ms, gmm only {ms2} ms", flush=True)
  return row


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=bc.RESULTS_DIR,
                  help="results folder: writes OUT/<device>/<date>-layer.json (default experiments/results)")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU via interpret backends")
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--no-check", action="store_true")
  ap.add_argument("--backend", default=None, help="kernels backend for impl=grouped (default: platform)")
  ap.add_argument("--block-size", type=int, default=128, help="block size of impl=blocksparse")
  ap.add_argument("--param-dtypes", default="bfloat16,float32",
                  help="parameter storage dtypes to time (bf16: like the bare kernels; f32: master weights)")
  ap.add_argument("--impls", default=",".join(IMPLS),
                  help=f"comma list of layer impls to check and time, of {IMPLS}")
  ap.add_argument("--no-moa", action="store_true", help="skip the Mixture-of-Attention check")
  ap.add_argument("--no-timing", action="store_true", help="checks only")
  args = ap.parse_args()
  impls = tuple(args.impls.split(","))
  unknown = [i for i in impls if i not in IMPLS]
  if unknown:
    ap.error(f"--impls: unknown {unknown}; allowed: {IMPLS}")

  env = bc.environment()
  print("environment:", env, flush=True)
  if args.smoke:
    shapes, check_shape, backend, iters = SMOKE_SHAPES, SMOKE_CHECK_SHAPE, "triton_interpret", 1
    block_size = 16
  else:
    shapes, check_shape, backend, iters = SHAPES, CHECK_SHAPE, args.backend, args.iters
    block_size = args.block_size
  payload = {"env": env, "backend": backend, "block_size": block_size, "impls": list(impls), "checks": {}, "results": []}
  checks = payload["checks"]

  if not args.no_check:
    # Checks multiply float32 in float32 everywhere (XLA's GPU default for float32 dots is TF32,
    # ~5e-4 relative error, over the 1e-4 float32 budget); bf16 operands are unaffected.
    with jax.default_matmul_precision("highest"):
      for dtype in (jnp.float32, jnp.bfloat16):
        run_checks(check_shape, dtype, backend, block_size, checks, impls)
        if not args.no_moa:
          run_moa_check(dtype, backend, checks)
    bc.write_result(args.out, "layer", payload)

  for name, shape in ({} if args.no_timing else shapes).items():
    for pd in args.param_dtypes.split(","):
      print(f"== {name} {shape} param_dtype={pd}", flush=True)
      row = run_timing(name, shape, jnp.bfloat16, jnp.dtype(pd), backend, block_size, iters, checks,
                       args.smoke, impls)
      payload["results"].append(row)
      bc.write_result(args.out, "layer", payload)

  path = bc.write_result(args.out, "layer", payload)
  print(f"wrote {path}")
  n_fail = sum(1 for c in checks.values() if not c.get("pass"))
  print(f"checks: {len(checks) - n_fail} PASS, {n_fail} FAIL")
  table_rows = []
  for r in payload["results"]:
    bare = r["times"]["bare_gmm_only"].get("fwdbwd_ms")
    bare_d = r["times"]["bare_dispatch_gmm"].get("fwdbwd_ms")
    for impl, t in r["times"].items():
      ms = t.get("fwdbwd_ms")
      table_rows.append({
          "shape": r["shape"], "params": r["param_dtype"], "impl": impl,
          "fwd_ms": t.get("fwd_ms"), "fwdbwd_ms": ms,
          "TFLOP/s": bc.tflops(3 * r["flops_fwd"], ms) if ms else None,
          "vs_gmm_only": bare / ms if ms and bare else None,
          "vs_dispatch_gmm": bare_d / ms if ms and bare_d else None,
          "GiB": (r["bytes"].get(impl) / 2**30 if isinstance(r["bytes"].get(impl), int) else None),
      })
  print(bc.table(table_rows, ["shape", "params", "impl", "fwd_ms", "fwdbwd_ms", "TFLOP/s",
                              "vs_gmm_only", "vs_dispatch_gmm", "GiB"]))


if __name__ == "__main__":
  main()
