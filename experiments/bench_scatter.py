"""ScatterMoE scatter matmul: GPU correctness check and benchmark.

In ONE run:
  1. checks: every layout of kernels.scatter_matmul (token->grouped, token->flat with (E,N,K)
     weights, token->combined with gates, grouped->grouped, grouped->combined) against the float32
     reference at an edge shape (rows and K/N not multiples of the tiles, empty experts, one heavy
     expert), forward and gradients (x, w, gates); the raw kernel with a NaN-poisoned output buffer
     and rows past the routed ones (must come out exactly zero); at the timed shapes, the kernel
     against kernels.grouped_matmul on the gathered rows; the expert GLU against the grouped path.
     PASS/FAIL lines.
  2. op timings at Mixtral-like (T*k=32768, K 4096, N 14336, E 8, k 2), OLMoE-like (65536, 2048,
     1024, 64, 8), fine-grained (65536, 2048, 2048, 32, k 4): scatter_matmul forward and
     forward+backward for the first layer (token order -> grouped) and the last (grouped -> gated
     combine), against gather + kernels.grouped_matmul and jax.lax.ragged_dot of the same FLOPs.
  3. the expert SwiGLU (and, with --mlp-kinds, the plain MLP) forward+backward at T=16384 tokens:
     Mixtral-like (d 4096, f 14336, E 8, k 2), OLMoE-like (2048, 1024, 64, 8), fine-grained (2048,
     1408, 64, 6): scatter vs the grouped path (sort + gather + kernels.grouped_matmul + unsort/
     combine) vs the same with jax.lax.ragged_dot vs torch._grouped_mm (when torch imports with
     CUDA): time, TFLOP/s, memory (JAX: compiled plan arg+out+temp and device peak; torch:
     max_memory_allocated).
  4. with --only glu (not part of "all"): the expert SwiGLU's fused path (kernels.scatter.glu)
     against its products path (scatter_glu fused=False; gate and up as one product of width 2f,
     and as two: pack_gate_up=False) on the same backend, at SonicMoE's
     fine-grained configurations (T 40960, d 768, f 256, E 128, k 8; T 32768, d 4096, f 256,
     E 256, k 16): forward and forward+backward (jax.value_and_grad) times, TFLOP/s with SonicMoE's
     count (6 T k d f forward, twice that backward), the backward's residual bytes and XLA's
     planned temporaries; the two paths' outputs and gradients compared; --profile adds each
     one's top GPU kernels.
  5. JSON (run record and all numbers) to OUT/<device>/<date>-scatter.json (--only glu:
     <date>-scatter-glu.json), compact tables last.

GPU:        python -m experiments.bench_scatter [--out DIR] [--block-m 128 --block-n 128
            --block-k 64 --group-m 8 --num-warps 8 --num-stages 3 --shapes mixtral,olmoe]
            python -m experiments.bench_scatter --only glu [--glu-shapes NAME,...] [--profile]
            [--out DIR]
CPU smoke:  python -m experiments.bench_scatter --smoke --out /tmp/x   (tiny shapes, interpret)
            python -m experiments.bench_scatter --smoke --only glu --out /tmp/x
"""

from __future__ import annotations

import argparse
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as bc
from kernels import grouped_matmul
from kernels.scatter import scatter_glu, scatter_mlp
from kernels.scatter import sort_slots, scatter_matmul
from kernels.scatter import scatter_matmul_reference
from kernels.scatter import TritonScatterConfig, scatter2scatter
from kernels.common.groups import row_group_ids

OP_SHAPES = {  # name: (rows M = T*k, K, N, E, k)
    "mixtral": (32768, 4096, 14336, 8, 2),
    "olmoe": (65536, 2048, 1024, 64, 8),
    "finegrained": (65536, 2048, 2048, 32, 4),
}
MLP_SHAPES = {  # name: (tokens T, d, f, E, k)
    "mixtral": (16384, 4096, 14336, 8, 2),
    "olmoe": (16384, 2048, 1024, 64, 8),
    "finegrained": (16384, 2048, 1408, 64, 6),
}
GLU_SHAPES = {  # name: (tokens T, d, f, E, k): SonicMoE's (Figure 14) fine-grained layers
    "T40960-d768-f256-E128-k8": (40960, 768, 256, 128, 8),
    "T32768-d4096-f256-E256-k16": (32768, 4096, 256, 256, 16),
    "T32768-d4096-f512-E256-k16": (32768, 4096, 512, 256, 16),   # the 120B one
}
SMOKE_GLU = {"smoke": (40, 32, 48, 4, 2)}
EDGE = (523, 2, 6, 200, 300)        # T, k, E, K, N
SMOKE_OP = {"smoke": (48, 32, 48, 4, 2)}
SMOKE_MLP = {"smoke": (24, 32, 48, 4, 2)}
SMOKE_EDGE = (21, 2, 5, 24, 40)

LAYOUTS = {  # name: (x_grouped, y_grouped, gates, transpose_w)
    "token->grouped": (False, True, False, False),
    "token->flat (E,N,K)": (False, False, False, True),
    "token->combined": (False, False, True, False),
    "grouped->grouped (E,N,K)": (True, True, False, True),
    "grouped->combined": (True, False, True, False),
}


rel = bc.rel_err  # ||got - want|| / ||want||; inf on NaN/inf


def report(checks: list, name: str, err: float, tol: float = 1e-2, extra: bool = True) -> None:
  ok = err <= tol and extra
  checks.append({"name": name, "err": err, "pass": ok})
  print(f"{'PASS' if ok else 'FAIL'} {name}: rel err {err:.2e}"
        + ("" if extra else " (extra check failed)"), flush=True)


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


def normal(key, shape, dtype, scale=1.0):
  return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def top_k_routing(key, t: int, e: int, k: int, dtype):
  """Random softmax top-k routing (near-balanced, like a trained router's noise)."""
  logits = jax.random.normal(key, (t, e), jnp.float32)
  gates, idx = jax.lax.top_k(jax.nn.softmax(logits), k)
  return idx.astype(jnp.int32), gates.astype(dtype)


# ---------------------------------------------------------------------------- checks -------------

def check_edge(checks, edge, backend, cfg):
  """Every layout against the float32 reference, forward and gradients, bf16 operands."""
  t, k, e, kin, n = edge
  m = t * k
  rng = np.random.default_rng(0)
  # Experts 0 and 3 empty, expert 1 takes half of the first choices.
  pool = np.array([i for i in range(e) if i not in (0, 3)])
  choices = np.stack([rng.choice(pool, k, replace=False) for _ in range(t)])
  choices[: t // 2, 0] = 1
  choices[: t // 2, 1:] = rng.choice([2, 4], (t // 2, k - 1)) if k > 1 else choices[: t // 2, 1:]
  routing = sort_slots(jnp.asarray(choices, jnp.int32), e)
  ks = jax.random.split(jax.random.key(1), 6)
  dt = jnp.bfloat16
  gates = jax.random.uniform(ks[0], (t, k), jnp.float32, 0.1, 1.0)
  for name, (xg, yg, use_g, tw) in LAYOUTS.items():
    x = normal(ks[1], (m if xg else t, kin), dt)
    w = normal(ks[2], (e, n, kin) if tw else (e, kin, n), dt, kin ** -0.5)
    g = gates if use_g else None

    def op(x, w, g=None, *, xg=xg, yg=yg, tw=tw):
      return scatter_matmul(x, w, routing, gates=g, x_grouped=xg, y_grouped=yg, transpose_w=tw,
                            backend=backend, config=cfg)

    def ref(x, w, g=None, *, xg=xg, yg=yg, tw=tw):
      return scatter_matmul_reference(x, w, routing.sorted_flat, routing.group_sizes, gates=g,
                                      x_grouped=xg, y_grouped=yg, transpose_w=tw)

    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    want = ref(x32, w32, g)
    report(checks, f"edge/{backend}/{name} fwd", rel(jax.jit(op)(x, w, g), want))
    ct = normal(ks[3], want.shape, jnp.float32)
    extra = (g,) if use_g else ()
    argnums = tuple(range(2 + len(extra)))
    got = jax.jit(jax.grad(lambda *a: jnp.sum(op(*a).astype(jnp.float32) * ct), argnums))(
        x, w, *extra)
    exp = jax.grad(lambda *a: jnp.sum(ref(*a) * ct), argnums)(x32, w32, *extra)
    for which, gg, ww in zip(("dx", "dw", "dgates"), got, exp):
      report(checks, f"edge/{backend}/{name} {which}", rel(gg, ww))
  # The raw kernel: output poisoned with NaN, 1/4 of the sorted rows past the routed ones.
  sizes = np.array(routing.group_sizes)
  drop = m // 4
  for i in reversed(range(e)):  # take the dropped rows from the last experts
    cut = min(drop, sizes[i])
    sizes[i] -= cut
    drop -= cut
  gs = jnp.asarray(sizes, jnp.int32)
  perm = routing.sorted_flat
  x = normal(ks[4], (t, kin), dt)
  w = normal(ks[5], (e, kin, n), dt, kin ** -0.5)
  out = jax.jit(lambda x, w, poison: scatter2scatter(
      x, w, gs, perm // k, perm, None, m=m, transpose_w=False, out_dtype=dt, config=cfg,
      interpret=backend == "triton_interpret", poison=poison))(x, w, jnp.full((m, n), jnp.nan, dt))
  gid = row_group_ids(gs, m)
  want = scatter_matmul_reference(x.astype(jnp.float32), w.astype(jnp.float32), perm, gs)
  tail_rows = perm[gid == e]
  tail_zero = bool(jnp.all(out[tail_rows] == 0))
  report(checks, f"edge/{backend}/kernel poisoned, {int(tail_rows.shape[0])} unrouted rows zero",
         rel(out, want), extra=tail_zero)


# ---------------------------------------------------------------------------- op benchmarks ------

def bench_ops(name, shape, backend, gmm_backend, cfg, iters, checks, smoke):
  m, kin, n, e, k = shape
  t = m // k
  dt = jnp.bfloat16
  ks = jax.random.split(jax.random.key(0), 6)
  idx, gates = top_k_routing(ks[0], t, e, k, jnp.float32)
  routing = sort_slots(idx, e)
  gs = routing.group_sizes
  x_tok = normal(ks[1], (t, kin), dt)
  w = normal(ks[2], (e, kin, n), dt, kin ** -0.5)
  h = normal(ks[3], (m, n), dt)                        # grouped hidden rows (last-layer input)
  w2 = normal(ks[4], (e, n, kin), dt, n ** -0.5)
  kw = dict(backend=backend, config=cfg)
  row = {"shape": name, "M": m, "K": kin, "N": n, "E": e, "k": k, "flops": 2.0 * m * kin * n,
         "group_sizes": np.asarray(gs).tolist()}
  print(f"== ops {name}: M={m} K={kin} N={n} E={e} k={k}", flush=True)
  first = lambda x, w: scatter_matmul(x, w, routing, y_grouped=True, **kw)
  last = lambda h, w, g: scatter_matmul(h, w, routing, x_grouped=True, gates=g, **kw)
  gmm = lambda a, w: grouped_matmul(a, w, gs, backend=gmm_backend)
  gather_gmm = lambda x, w: gmm(jnp.take(x, routing.sorted_flat // k, axis=0), w)

  def gmm_combine(h, w, g):
    ys = gmm(h, w)
    flat = jnp.zeros_like(ys).at[routing.sorted_flat].set(ys).reshape(t, k, -1)
    return jnp.einsum("tk,tkd->td", g, flat.astype(jnp.float32)).astype(h.dtype)

  def checks_at_shape():
    got = jax.jit(first)(x_tok, w)
    report(checks, f"{name}/token->grouped vs gather+grouped_matmul",
           rel(got, jax.jit(gather_gmm)(x_tok, w)))
    report(checks, f"{name}/grouped->combined vs grouped_matmul+combine",
           rel(jax.jit(last)(h, w2, gates), jax.jit(gmm_combine)(h, w2, gates)))

  guarded(checks, f"{name}/checks", checks_at_shape)
  ct_first = normal(ks[5], (m, n), jnp.float32)
  ct_last = normal(ks[5], (t, kin), jnp.float32)

  def fb(fn, ct, argnums):
    return jax.jit(jax.value_and_grad(
        lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * ct), argnums))

  res = {}
  for label, fn, args, ct, argnums in [
      ("scatter token->grouped", first, (x_tok, w), ct_first, (0, 1)),
      ("gather+gmm", gather_gmm, (x_tok, w), ct_first, (0, 1)),
      ("gather+ragged_dot", lambda x, w: jax.lax.ragged_dot(
          jnp.take(x, routing.sorted_flat // k, axis=0), w, gs), (x_tok, w), ct_first, (0, 1)),
      ("scatter grouped->combined", last, (h, w2, gates), ct_last, (0, 1, 2)),
      ("gmm+unsort+combine", gmm_combine, (h, w2, gates), ct_last, (0, 1, 2)),
  ]:
    r = {}
    r["fwd_ms"], e1 = time_or_error(jax.jit(fn), *args, iters=iters)
    r["fwdbwd_ms"], e2 = time_or_error(fb(fn, ct, argnums), *args, iters=iters)
    if e1 or e2:
      r["errors"] = [x for x in (e1, e2) if x]
    res[label] = r
  row["ms"] = res
  print(f"   ms: {res}", flush=True)
  return row


# ---------------------------------------------------------------------------- full MLP -----------

def grouped_mlp(x, idx, gates, ws, matmul, act):
  """Sort + gather + grouped matmuls (GLU if 3 weights) + unsort/combine."""
  t, k = idx.shape
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  gs = jnp.bincount(flat, length=ws[0].shape[0]).astype(jnp.int32)
  xs = x[order // k]
  a = act(matmul(xs, ws[0], gs).astype(jnp.float32))
  if len(ws) == 3:
    a = a * matmul(xs, ws[1], gs).astype(jnp.float32)
  ys = matmul(a.astype(x.dtype), ws[-1], gs)
  y = jnp.zeros((t * k, x.shape[1]), ys.dtype).at[order].set(ys).reshape(t, k, -1)
  return jnp.einsum("tk,tkd->td", gates.astype(jnp.float32), y.astype(jnp.float32)).astype(x.dtype)


def torch_mlp(x, idx, gates, ws, ct, act_name, iters):
  """The grouped path in PyTorch with torch._grouped_mm: fwd+bwd ms and peak bytes."""
  import torch

  dev = "cuda"
  tx = torch.as_tensor(np.asarray(x.astype(jnp.float32)), device=dev).to(torch.bfloat16)
  tx.requires_grad_(True)
  tidx = torch.as_tensor(np.asarray(idx), device=dev).long()
  tg = torch.as_tensor(np.asarray(gates, np.float32), device=dev).requires_grad_(True)
  # _grouped_mm wants the (K, N) operand column-major: store (E, N, K), use its transpose view.
  tws = [torch.as_tensor(np.asarray(w.astype(jnp.float32)), device=dev).to(torch.bfloat16)
         .transpose(-2, -1).contiguous().requires_grad_(True) for w in ws]
  tct = torch.as_tensor(np.asarray(ct), device=dev)
  act = torch.nn.functional.silu if act_name == "silu" else torch.nn.functional.gelu
  t, k = tidx.shape
  e = tws[0].shape[0]

  def step():
    flat = tidx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=e), 0).to(torch.int32)
    xs = tx[order // k]
    mm = lambda a, w: torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)
    a = act(mm(xs, tws[0]).float())
    if len(tws) == 3:
      a = a * mm(xs, tws[1]).float()
    ys = mm(a.to(torch.bfloat16), tws[-1])
    y = torch.empty_like(ys)
    y[order] = ys
    out = torch.einsum("tk,tkd->td", tg, y.reshape(t, k, -1).float())
    loss = (out * tct).sum()
    loss.backward()
    for p in [tx, tg, *tws]:
      p.grad = None

  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  ms = bc.time_torch(step, iters=iters)
  return ms, torch.cuda.max_memory_allocated()


def bench_mlp(name, shape, kind, backend, mixed_backend, gmm_backend, cfg, iters, checks, smoke,
              use_torch, ragged=True):
  t, d, f, e, k = shape
  dt = jnp.bfloat16
  ks = jax.random.split(jax.random.key(2), 7)
  x = normal(ks[0], (t, d), dt)
  idx, gates = top_k_routing(ks[1], t, e, k, jnp.float32)
  routing = sort_slots(idx, e)
  glu = kind == "glu"
  act = jax.nn.silu if glu else jax.nn.gelu
  ws = [normal(ks[2], (e, d, f), dt, d ** -0.5)]
  if glu:
    ws.append(normal(ks[3], (e, d, f), dt, d ** -0.5))
  ws.append(normal(ks[4], (e, f, d), dt, f ** -0.5))
  ct = normal(ks[5], (t, d), jnp.float32)
  def scatter_impl(be):
    kw = dict(activation=act, backend=be, config=cfg)
    return ((lambda x, g, *ws: scatter_glu(x, *ws, routing, g, **kw)) if glu
            else (lambda x, g, *ws: scatter_mlp(x, *ws, routing, g, **kw)))

  # "scatter": the default GPU backend ("pallas": gathers in the Triton scatter kernel, grouped
  # inputs on the Mosaic grouped kernels); "scatter_triton": every product in the scatter kernel.
  impls = {
      "scatter": scatter_impl(mixed_backend),
      **({"scatter_triton": scatter_impl(backend)} if mixed_backend != backend else {}),
      "grouped": lambda x, g, *ws: grouped_mlp(
          x, idx, g, ws, lambda a, w, s: grouped_matmul(a, w, s, backend=gmm_backend), act),
      "ragged_dot": lambda x, g, *ws: grouped_mlp(x, idx, g, ws, jax.lax.ragged_dot, act),
  }
  if not ragged:   # --no-ragged-dot: its f+b takes seconds at the 64-expert shapes
    del impls["ragged_dot"]
  flops = 6.0 * t * k * d * f * len(ws)      # each product: 2*M*d*f forward, 2x that backward
  row = {"shape": name, "kind": kind, "T": t, "d": d, "f": f, "E": e, "k": k,
         "flops_fwdbwd": flops}
  print(f"== mlp {name} ({kind}): T={t} d={d} f={f} E={e} k={k}", flush=True)
  args = (x, gates, *ws)

  def check():
    ref = jax.jit(impls["grouped"])(*args)
    g_g = jax.jit(jax.grad(lambda *a: jnp.sum(impls["grouped"](*a).astype(jnp.float32) * ct),
                           argnums=(0, 1, 2)))(*args)
    for impl in [i for i in impls if i.startswith("scatter")]:
      report(checks, f"mlp/{name}/{kind} {impl} vs grouped fwd",
             rel(jax.jit(impls[impl])(*args), ref))
      g_s = jax.jit(jax.grad(lambda *a: jnp.sum(impls[impl](*a).astype(jnp.float32) * ct),
                             argnums=(0, 1, 2)))(*args)
      for which, a_, b_ in zip(("dx", "dgates", "dw_first"), g_s, g_g):
        report(checks, f"mlp/{name}/{kind} {impl} vs grouped {which}", rel(a_, b_), tol=2e-2)

  guarded(checks, f"mlp/{name}/{kind}/check", check)
  for impl, fn in impls.items():
    step = jax.value_and_grad(lambda *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32) * ct),
                              argnums=tuple(range(len(args))))
    res = {}
    try:
      res["compiled_bytes"] = bc.compiled_bytes(step, *args)
    except Exception as ex:
      res["compiled_bytes_error"] = f"{type(ex).__name__}: {ex}"[:300]
    res["ms"], err = time_or_error(jax.jit(step), *args, iters=iters)
    res["device_peak_bytes_so_far"] = bc.peak_bytes()   # cumulative over the process
    if err:
      res["error"] = err
    if res["ms"]:
      res["tflops"] = bc.tflops(flops, res["ms"])
    row[impl] = res
    print(f"   {impl}: {res}", flush=True)
  if use_torch:
    res = {}
    try:
      res["ms"], res["peak_bytes"] = torch_mlp(x, idx, gates, ws, ct, "silu" if glu else "gelu",
                                               iters)
      res["tflops"] = bc.tflops(flops, res["ms"])
    except Exception as ex:
      res["error"] = f"{type(ex).__name__}: {ex}"[:300]
    row["torch_grouped_mm"] = res
    print(f"   torch._grouped_mm: {res}", flush=True)
  return row


# ---------------------------------------------------------------------------- fused GLU ---------

# (name, scatter_glu's fused, pack_gate_up): the fused kernels, the products path (gate and up as
# one product of width 2f: its default) and the products path with two up products.
GLU_PATHS = (("fused", True, True), ("products", False, True), ("products-unpacked", False, False))

def glu_costs(forward, params, x, ct, routing, iters):
  """bc.layer_costs for forward(params, x, routing) with the loss <forward, ct>: ct and the
  routing are arguments of the compiled programs (closed over, XLA would fold them into the
  program as constants: 512 MiB of ct at T 32768, d 4096). Returns (row, y, fwd, fwdbwd)."""
  loss = lambda p, x, ct, r: jnp.sum(forward(p, x, r).astype(jnp.float32) * ct)
  fwd = jax.jit(forward).lower(params, x, routing).compile()
  fwdbwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x, ct, routing).compile()
  y = fwd(params, x, routing)
  row = {"finite": bool(jnp.all(jnp.isfinite(y)))}
  row["fwd_ms"] = bc.time_jax(fwd, params, x, routing, iters=iters)
  row["fwdbwd_ms"] = bc.time_jax(fwdbwd, params, x, ct, routing, iters=iters)
  vjp_fn = jax.eval_shape(lambda p, x: jax.vjp(lambda p, x: forward(p, x, routing), p, x)[1],
                          params, x)
  row["residual_bytes"] = max(0, bc.tree_bytes(vjp_fn) - bc.tree_bytes(params)
                              - bc.tree_bytes(x) - bc.tree_bytes(routing))
  for key, compiled in (("temp_bytes", fwdbwd), ("fwd_temp_bytes", fwd)):
    analysis = compiled.memory_analysis()
    row[key] = None if analysis is None else int(analysis.temp_size_in_bytes)
  return row, y, fwd, fwdbwd


def bench_glu(name, shape, backend, iters, checks, profile):
  """scatter_glu's fused path against its products path (fused=False) on `backend`, each with
  its default configs: forward, forward+backward, residual and temporary bytes (glu_costs),
  TFLOP/s with SonicMoE's count; the products path's outputs and gradients as the comparison."""
  t, d, f, e, k = shape
  dt = jnp.bfloat16
  ks = jax.random.split(jax.random.key(3), 6)
  x = normal(ks[0], (t, d), dt)
  idx, gates = top_k_routing(ks[1], t, e, k, jnp.float32)
  routing = sort_slots(idx, e)
  params = (normal(ks[2], (e, d, f), dt, d ** -0.5), normal(ks[3], (e, d, f), dt, d ** -0.5),
            normal(ks[4], (e, f, d), dt, f ** -0.5), gates)
  ct = normal(ks[5], (t, d), jnp.float32)
  fwd_flops = 6.0 * t * k * d * f
  row = {"shape": name, "T": t, "d": d, "f": f, "E": e, "k": k, "backend": backend,
         "flops_fwd": fwd_flops, "flops_bwd": 2 * fwd_flops,
         "group_sizes_max": int(jnp.max(routing.group_sizes)),
         "group_sizes_min": int(jnp.min(routing.group_sizes))}
  print(f"== glu {name}: T={t} d={d} f={f} E={e} k={k} backend={backend}", flush=True)
  outs = {}
  for path, fused, pack in GLU_PATHS:
    def forward(p, x, r, fused=fused, pack=pack):
      wg, wu, wd, g = p
      return scatter_glu(x, wg, wu, wd, r, g, activation="silu", backend=backend, fused=fused,
                         pack_gate_up=pack)

    res = {}
    try:
      costs, y, fwd, fwdbwd = glu_costs(forward, params, x, ct, routing, iters)
      res.update(costs)
      res["bwd_ms"] = res["fwdbwd_ms"] - res["fwd_ms"]
      res["fwd_tflops"] = bc.tflops(fwd_flops, res["fwd_ms"])
      res["bwd_tflops"] = bc.tflops(2 * fwd_flops, res["bwd_ms"]) if res["bwd_ms"] > 0 else None
      res["fwdbwd_tflops"] = bc.tflops(3 * fwd_flops, res["fwdbwd_ms"])
      _, (dp, dx) = fwdbwd(params, x, ct, routing)
      outs[path] = (y, dx, *dp)
      if profile:
        res["profile_fwd"] = bc.kernel_profile(fwd, params, x, routing)
        res["profile_fwdbwd"] = bc.kernel_profile(fwdbwd, params, x, ct, routing)
    except Exception as ex:
      traceback.print_exc()
      res["error"] = f"{type(ex).__name__}: {ex}"[:400]
    row[path] = res
    print(f"   {path}: { {k_: v for k_, v in res.items() if not k_.startswith('profile')} }",
          flush=True)
    bc.print_profiles(res)
  for other in ("fused", "products-unpacked"):
    if other in outs and "products" in outs:
      for which, a_, b_ in zip(("y", "dx", "dw_gate", "dw_up", "dw_down", "dgates"),
                               outs[other], outs["products"]):
        report(checks, f"glu/{name}/{backend} {other} vs products {which}", rel(a_, b_),
               tol=2e-2)
  if row["fused"].get("fwdbwd_ms") and row["products"].get("fwdbwd_ms"):
    row["speedup_fwd"] = row["products"]["fwd_ms"] / row["fused"]["fwd_ms"]
    row["speedup_fwdbwd"] = row["products"]["fwdbwd_ms"] / row["fused"]["fwdbwd_ms"]
  return row


def torch_available() -> bool:
  try:
    import torch

    return bool(torch.cuda.is_available()) and hasattr(torch, "_grouped_mm")
  except Exception:
    return False


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=bc.RESULTS_DIR,
                  help="results folder: writes OUT/<device>/<date>-scatter.json (default experiments/results)")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU via triton_interpret")
  ap.add_argument("--shapes", default=",".join(OP_SHAPES))
  ap.add_argument("--only", choices=["ops", "mlp", "all", "glu"], default="all",
                  help="glu: only the fused expert GLU against its products path (see item 4)")
  ap.add_argument("--glu-shapes", default=",".join(GLU_SHAPES),
                  help=f"--only glu: comma-separated, of {list(GLU_SHAPES)}")
  ap.add_argument("--glu-backend", default="pallas",
                  help="--only glu: the scatter_glu backend both paths run on (default pallas)")
  ap.add_argument("--profile", action="store_true",
                  help="--only glu: also record each path's top GPU kernels (one traced call)")
  ap.add_argument("--mlp-kinds", default="glu", help="comma list of glu, mlp")
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--block-m", type=int, default=128)
  ap.add_argument("--block-n", type=int, default=128)
  ap.add_argument("--block-k", type=int, default=64)
  ap.add_argument("--group-m", type=int, default=8)
  ap.add_argument("--num-warps", type=int, default=8)
  ap.add_argument("--num-stages", type=int, default=3)
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--no-edge", action="store_true", help="skip the edge-shape checks")
  ap.add_argument("--no-ragged-dot", action="store_true",
                  help="MLP: do not time jax.lax.ragged_dot (its f+b takes seconds at 64 experts)")
  args = ap.parse_args()

  env = bc.environment()
  print("environment:", env, flush=True)
  if args.smoke:
    backend, gmm_backend, iters = "triton_interpret", "xla", 1
    mixed_backend = backend    # the Mosaic kernels' tiles do not fit the smoke shapes
    cfg = TritonScatterConfig(block_m=16, block_n=16, block_k=16, group_m=2)
    op_shapes, mlp_shapes, edge = SMOKE_OP, SMOKE_MLP, SMOKE_EDGE
  else:
    backend, gmm_backend, iters = "triton", None, args.iters
    mixed_backend = "pallas"
    cfg = TritonScatterConfig(block_m=args.block_m, block_n=args.block_n, block_k=args.block_k,
                              group_m=args.group_m, num_warps=args.num_warps,
                              num_stages=args.num_stages)
    names = args.shapes.split(",")
    op_shapes = {n: OP_SHAPES[n] for n in names}
    mlp_shapes = {n: MLP_SHAPES[n] for n in names}
    edge = EDGE
  use_torch = not args.no_torch and not args.smoke and torch_available()
  payload = {"env": env, "config": {"backend": backend, "mixed_backend": mixed_backend,
                                    **cfg.__dict__}, "torch": use_torch,
             "checks": [], "ops": [], "mlp": []}
  checks = payload["checks"]
  if args.only == "glu":
    run_glu(args, env, payload)
    return
  out = lambda: bc.write_result(args.out, "scatter", payload)

  for be in dict.fromkeys((backend, mixed_backend)) if not args.no_edge else ():
    guarded(checks, f"edge/{be}", lambda be=be: check_edge(checks, edge, be, cfg))
  out()
  if args.only in ("ops", "all"):
    for name, shape in op_shapes.items():
      payload["ops"].append(bench_ops(name, shape, backend, gmm_backend, cfg, iters, checks,
                                      args.smoke))
      out()
  if args.only in ("mlp", "all"):
    for name, shape in mlp_shapes.items():
      for kind in args.mlp_kinds.split(","):
        payload["mlp"].append(bench_mlp(name, shape, kind, backend, mixed_backend, gmm_backend,
                                        cfg, iters, checks, args.smoke, use_torch,
                                        ragged=not args.no_ragged_dot))
        out()
  print(f"wrote {out()}")

  rows = []
  for r in payload["ops"]:
    for label, res in r["ms"].items():
      fwd, fb = res.get("fwd_ms"), res.get("fwdbwd_ms")
      rows.append({"shape": r["shape"], "op": label, "fwd ms": fwd,
                   "fwd TF/s": bc.tflops(r["flops"], fwd) if fwd else None,
                   "f+b ms": fb, "f+b TF/s": bc.tflops(3 * r["flops"], fb) if fb else None})
  if rows:
    print("scatter_matmul ops, bf16 (TFLOP/s of 2*M*K*N; f+b counts 3x), " + env["device"]
          + ", jax " + env["jax"])
    print(bc.table(rows, list(rows[0])))
  rows = []
  mib = lambda v: v / 2 ** 20 if v else None
  for r in payload["mlp"]:
    for impl in ("scatter", "grouped", "ragged_dot", "torch_grouped_mm"):
      res = r.get(impl)
      if res is None:
        continue
      g_ms = r["grouped"].get("ms")
      rows.append({"shape": r["shape"], "kind": r["kind"], "impl": impl, "ms": res.get("ms"),
                   "TFLOP/s": res.get("tflops"),
                   "plan MiB": mib(res.get("compiled_bytes") or res.get("peak_bytes")),
                   "grouped/this": g_ms / res["ms"] if res.get("ms") and g_ms else None,
                   "error": (res.get("error") or "")[:40]})
  if rows:
    print("expert MLP fwd+bwd, T=16384 (grouped/this >= 0.91 is the target for scatter; torch "
          "memory = max_memory_allocated)")
    print(bc.table(rows, list(rows[0])))
  fails = [c["name"] for c in checks if not c.get("pass")]
  print("CHECKS:", "ALL PASS" if not fails else f"{len(fails)} FAIL: {fails}")


def run_glu(args, env, payload) -> None:
  """--only glu: bench_glu at each shape, JSON after each, a table last."""
  if args.smoke:
    shapes, backend, iters = SMOKE_GLU, "triton_interpret", 1
  else:
    unknown = [n for n in args.glu_shapes.split(",") if n not in GLU_SHAPES]
    if unknown:
      raise SystemExit(f"--glu-shapes: unknown {unknown}; known: {list(GLU_SHAPES)}")
    shapes = {n: GLU_SHAPES[n] for n in args.glu_shapes.split(",")}
    backend, iters = args.glu_backend, args.iters
  payload.update(config={"glu_backend": backend, "configs": "the registry defaults"}, glu=[])
  del payload["ops"], payload["mlp"]
  out = lambda: bc.write_result(args.out, "scatter-glu", payload)
  for name, shape in shapes.items():
    payload["glu"].append(bench_glu(name, shape, backend, iters, payload["checks"], args.profile))
    out()
  print(f"wrote {out()}")
  rows = []
  mib = lambda v: v / 2 ** 20 if v is not None else None
  for r in payload["glu"]:
    for path, _, _ in GLU_PATHS:
      res = r.get(path, {})
      rows.append({"shape": r["shape"], "path": path, "fwd ms": res.get("fwd_ms"),
                   "bwd ms": res.get("bwd_ms"), "fwd TF/s": res.get("fwd_tflops"),
                   "bwd TF/s": res.get("bwd_tflops"), "resid MiB": mib(res.get("residual_bytes")),
                   "temp MiB": mib(res.get("temp_bytes")),
                   "error": (res.get("error") or "")[:40]})
  print(f"expert SwiGLU, bf16, backend {backend}: fused vs products (scatter_glu fused=False); "
        f"SonicMoE's FLOP count; {env['device']}, jax {env['jax']}")
  print(bc.table(rows, list(rows[0])))
  for r in payload["glu"]:
    if "speedup_fwdbwd" in r:
      print(f"{r['shape']}: fused is {r['speedup_fwd']:.2f}x (forward) and "
            f"{r['speedup_fwdbwd']:.2f}x (forward+backward) the products path's speed")
    if r.get("products", {}).get("fwdbwd_ms") and r.get("products-unpacked", {}).get("fwdbwd_ms"):
      p, u = r["products"], r["products-unpacked"]
      print(f"{r['shape']}: gate and up as one product is {u['fwd_ms'] / p['fwd_ms']:.2f}x "
            f"(forward) and {u['fwdbwd_ms'] / p['fwdbwd_ms']:.2f}x (forward+backward) the speed "
            f"of two")
  fails = [c["name"] for c in payload["checks"] if not c.get("pass")]
  print("CHECKS:", "ALL PASS" if not fails else f"{len(fails)} FAIL: {fails}")


if __name__ == "__main__":
  main()
