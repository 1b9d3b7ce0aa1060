"""Checks every backend of every op's registry (kernels.REGISTRIES) against the op's reference.

For each op (grouped_matmul forward and transposed, group_xty, the expert MLPs grouped_mlp and
grouped_glu (output and its gradients of x and the weights), scatter_matmul in its gathering and
its combining layout, the expert GLU scatter_glu (output and its gradients of x, the three
weights and the gates; the fused kernels on every backend but "xla"), the block-sparse sdd / dsd /
dds), each backend name of its registry
("pallas" included: the row says which backend it picked), shapes with an empty group, one group
taking all rows, sizes that are not tile multiples and rows past sum(group_sizes), in bfloat16 and
float32: runs the public op where the backend's `unavailable` gives no reason (else the row
records the reason), and reports the relative error against the float32 reference, whether every
output is finite (the interpreter leaves unwritten rows NaN; the scatter kernel and the fused GLU
kernels also run on output buffers poisoned with NaN, with rows past sum(group_sizes) that must
come out zero) and whether the rows past the groups are zero.

GPU:  python -m experiments.check_kernels --out results.json   (compiled backends, larger shapes)
CPU:  python -m experiments.check_kernels --quick --out /tmp/check.json   (xla + interpret
      backends at small shapes; a few minutes)
Prints a table; writes the rows and the environment as JSON to --out. Exit status 1 on a failure.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from experiments import bench_common
from kernels import blocksparse
from kernels.common import registry
from kernels.common.groups import row_group_ids
from kernels.gmm.shapes import GroupedShape, dtypes as make_dtypes
from kernels.scatter import scatter2scatter, scatter_matmul_reference

# float32: XLA's float32 matmuls on Hopper run at TF32 by default (relative error ~3e-4), the
# Pallas kernels at full float32 (~1e-6).
TOL = {"bfloat16": 1e-2, "float32": 1e-3}
# The compiled Mosaic grouped-matmul kernels' default tiles exceed shared memory with float32
# operands (backend="pallas" picks Triton for float32).
MOSAIC_F32 = "float32 tiles exceed the shared memory (pallas picks triton for float32)"
DTYPES = (jnp.bfloat16, jnp.float32)

# (name, M, K, N, group sizes): edge cases of the grouped ops.
QUICK_SHAPES = [
    ("edge", 100, 128, 256, [30, 0, 50, 5]),          # empty group, 15 rows past the groups
    ("one_group_all", 72, 128, 256, [0, 72, 0, 0]),   # one group takes every row
]
GPU_SHAPES = [
    ("edge", 1000, 1024, 2048, [300, 0, 1, 500, 0, 150, 0, 0]),
    ("one_group_all", 4099, 2048, 1024, [0, 0, 4099, 0]),
    ("ragged", 3001, 768, 3072, [17, 1000, 0, 1333, 600, 0, 40, 0]),
]


def rel_err(got, want) -> float:
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
  if not np.all(np.isfinite(got)):
    return float("inf")
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _rand(key, shape, dtype, scale=1.0):
  return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def _grouped_cases(shapes, dtype) -> list[tuple[str, str, Any, Callable, Callable, int | None]]:
  """(op, shape name, shapes for the registry, call(backend) -> output, () -> reference, tail
  row). References are computed only for the ops a run checks (a scatter reference at the GPU
  shapes holds a per-row weight tensor of tens of GB)."""
  cases = []
  for name, m, k, n, sizes in shapes:
    keys = jax.random.split(jax.random.key(m + k + n), 4)
    gs = jnp.asarray(sizes, jnp.int32)
    used = min(sum(sizes), m)
    lhs, dy = _rand(keys[0], (m, k), dtype), _rand(keys[1], (m, n), dtype)
    w = _rand(keys[2], (len(sizes), k, n), dtype, k ** -0.5)
    wt = _rand(keys[3], (len(sizes), n, k), dtype, k ** -0.5)
    f32 = lambda a: a.astype(jnp.float32)
    shape = GroupedShape(m, k, n, len(sizes))
    cases.append(("grouped_matmul", name, shape,
                  lambda b, lhs=lhs, w=w, gs=gs: kernels.grouped_matmul(lhs, w, gs, backend=b),
                  lambda lhs=lhs, w=w, gs=gs: kernels.gmm_reference(f32(lhs), f32(w), gs), used))
    cases.append(("grouped_matmul(transpose_rhs)", name, shape,
                  lambda b, lhs=lhs, wt=wt, gs=gs: kernels.grouped_matmul(
                      lhs, wt, gs, transpose_rhs=True, backend=b),
                  lambda lhs=lhs, wt=wt, gs=gs: kernels.gmm_reference(f32(lhs), f32(wt), gs,
                                                                      transpose_rhs=True), used))
    cases.append(("group_xty", name, shape,
                  lambda b, lhs=lhs, dy=dy, gs=gs: kernels.group_xty(lhs, dy, gs, backend=b),
                  lambda lhs=lhs, dy=dy, gs=gs: kernels.group_xty_reference(f32(lhs), f32(dy), gs),
                  None))
  return cases


# The plain expert MLP (kernels.grouped_mlp) at the grouped shapes (M rows, d = K, f = N), each
# shape with its activation.
MLP_ACTIVATIONS = {"edge": "gelu_tanh", "one_group_all": "gelu", "ragged": "gelu_tanh"}
MLP_OUTPUTS = ("y", "dx", "dw_in", "dw_out")


def _vjp_outputs(fn, args, probe):
  """fn(*args) and the gradients of <fn(*args), probe> of every argument."""
  y, vjp = jax.vjp(fn, *args)
  return (y, *vjp(probe.astype(y.dtype)))


def _mlp_cases(shapes, dtype):
  """grouped_mlp: one case per output (y and the gradients of <y, probe> of x and both weights);
  each backend's forward and backward run once, for all four. The reference is float32 math."""
  from kernels.activations import ACTIVATIONS

  cases = []
  for name, m, d, f, sizes in shapes:
    act = MLP_ACTIVATIONS.get(name, "silu")
    keys = jax.random.split(jax.random.key(3 * m + f), 4)
    gs = jnp.asarray(sizes, jnp.int32)
    used = min(sum(sizes), m)
    x = _rand(keys[0], (m, d), dtype)
    w_in = _rand(keys[1], (len(sizes), d, f), dtype, d ** -0.5)
    w_out = _rand(keys[2], (len(sizes), f, d), dtype, f ** -0.5)
    probe = jax.random.normal(keys[3], (m, d), jnp.float32)
    f32 = lambda a: a.astype(jnp.float32)

    def ref(x, w_in, w_out, gs=gs, act=act):
      h = ACTIVATIONS[act](kernels.gmm_reference(x, w_in, gs, out_dtype=jnp.float32))
      return kernels.gmm_reference(h, w_out, gs, out_dtype=jnp.float32)

    want = functools.lru_cache(maxsize=None)(
        lambda ref=ref, args=(f32(x), f32(w_in), f32(w_out)), probe=probe: _vjp_outputs(
            ref, args, probe))

    @functools.lru_cache(maxsize=None)
    def got(backend, gs=gs, act=act, args=(x, w_in, w_out), probe=probe):
      mlp = lambda x, w_in, w_out: kernels.grouped_mlp(x, w_in, w_out, gs, activation=act,
                                                       backend=backend)
      return jax.block_until_ready(jax.jit(functools.partial(_vjp_outputs, mlp))(args, probe))

    shape = GroupedShape(m, d, f, len(sizes))
    for i, which in enumerate(MLP_OUTPUTS):
      op = "grouped_mlp" if which == "y" else f"grouped_mlp({which})"
      cases.append((op, f"{name}_{act}", shape, lambda b, i=i, got=got: got(b)[i],
                    lambda i=i, want=want: want()[i], used if which in ("y", "dx") else None))

    # The SwiGLU expert (grouped_glu) at the same shape, with w_in as the gate weights.
    w_up = _rand(jax.random.key(m + f), (len(sizes), d, f), dtype, d ** -0.5)

    def glu_ref(x, w_gate, w_up, w_out, gs=gs):
      g = kernels.gmm_reference(x, w_gate, gs, out_dtype=jnp.float32)
      u = kernels.gmm_reference(x, w_up, gs, out_dtype=jnp.float32)
      return kernels.gmm_reference(jax.nn.silu(g) * u, w_out, gs, out_dtype=jnp.float32)

    glu_want = functools.lru_cache(maxsize=None)(
        lambda args=(f32(x), f32(w_in), f32(w_up), f32(w_out)), probe=probe, ref=glu_ref:
        _vjp_outputs(ref, args, probe))

    @functools.lru_cache(maxsize=None)
    def glu_got(backend, gs=gs, args=(x, w_in, w_up, w_out), probe=probe):
      glu = lambda x, wg, wu, wo: kernels.grouped_glu(x, wg, wu, wo, gs, activation="silu",
                                                      backend=backend)
      return jax.block_until_ready(jax.jit(functools.partial(_vjp_outputs, glu))(args, probe))

    for i, which in enumerate(GLU_OUTPUTS[:5]):   # y and the four gradients (no gates)
      op = "grouped_glu" if which == "y" else f"grouped_glu({which})"
      cases.append((op, f"{name}_silu", shape, lambda b, i=i, got=glu_got: got(b)[i],
                    lambda i=i, want=glu_want: want()[i], used if which in ("y", "dx") else None))
  return cases


def _scatter_cases(shapes, dtype):
  cases = []
  for name, m, k, n, sizes in shapes:
    e, top = len(sizes), 2
    t = m // top
    keys = jax.random.split(jax.random.key(7 * m + n), 5)
    # Expert choices drawn to follow `sizes` roughly: unused experts stay empty.
    probs = np.asarray(sizes, np.float64) + 1e-9
    idx = np.random.default_rng(m).choice(e, size=(t, top), p=probs / probs.sum())
    routing = kernels.sort_slots(jnp.asarray(idx, jnp.int32), e)
    x, h = _rand(keys[0], (t, k), dtype), _rand(keys[1], (t * top, k), dtype)
    w = _rand(keys[2], (e, k, n), dtype, k ** -0.5)
    gates = jax.random.uniform(keys[3], (t, top), jnp.float32)
    f32 = lambda a: a.astype(jnp.float32)
    shape = GroupedShape(t * top, k, n, e)
    cases.append(("scatter_matmul(gather)", name, shape,
                  lambda b, x=x, w=w, r=routing: kernels.scatter_matmul(x, w, r, y_grouped=True,
                                                                        backend=b),
                  lambda x=x, w=w, r=routing: scatter_matmul_reference(f32(x), f32(w), *r,
                                                                       y_grouped=True), None))
    cases.append(("scatter_matmul(combine)", name, shape,
                  lambda b, h=h, w=w, r=routing, g=gates: kernels.scatter_matmul(
                      h, w, r, x_grouped=True, gates=g, backend=b),
                  lambda h=h, w=w, r=routing, g=gates: scatter_matmul_reference(
                      f32(h), f32(w), *r, x_grouped=True, gates=g), None))
  return cases


# (name, T, k, d, f, expert weights of the routing draw (0: an empty expert), activation): the
# expert GLU at empty experts, one expert taking every token, sizes off the tiles, fine-grained
# experts (f = 256, k = 8 and 16).
GLU_QUICK_SHAPES = [
    ("edge", 50, 2, 128, 128, [30, 0, 50, 5], "silu"),      # fits the Mosaic tiles
    ("one_expert_all", 37, 1, 40, 72, [0, 1, 0, 0], "gelu"),
]
GLU_GPU_SHAPES = [
    ("edge", 1500, 2, 1024, 2048, [300, 0, 1, 500, 0, 150, 0, 0], "silu"),
    ("one_expert_all", 4099, 1, 2048, 1024, [0, 0, 1, 0], "gelu"),
    ("ragged", 3001, 2, 1000, 1400, [17, 1000, 0, 1333, 600, 0, 40, 0], "gelu_tanh"),
    ("fine_k8", 3001, 8, 768, 256, [0 if i % 4 == 3 else 1 + i % 5 for i in range(128)], "silu"),
    ("fine_k16", 1021, 16, 4096, 256, [0 if i % 8 == 5 else 1 for i in range(256)], "silu"),
]
GLU_OUTPUTS = ("y", "dx", "dw_gate", "dw_up", "dw_down", "dgates", "y_undifferentiated")


def _glu_outputs(fn, x, ws, gates, probe):
  """fn's output and the gradients of <output, probe> of x, the three weights and the gates,
  then fn's output undifferentiated (a custom_vjp's primal, which may run other kernels than
  its fwd rule: scatter_glu's fused="forward")."""
  y, vjp = jax.vjp(fn, x, *ws, gates)
  return (y, *vjp(probe.astype(y.dtype)), fn(x, *ws, gates))


def _glu_cases(shapes, dtype):
  """The expert GLU: one case per output (y and the gradients of <y, probe>); each backend's
  forward and backward run once, for all six."""
  from kernels.activations import ACTIVATIONS
  from kernels.scatter import scatter_glu_reference

  cases = []
  for name, t, top, d, f, weights, act in shapes:
    e = len(weights)
    keys = jax.random.split(jax.random.key(5 * t + f), 6)
    probs = np.asarray(weights, np.float64) + 1e-12
    rng = np.random.default_rng(t)
    idx = np.stack([rng.choice(e, size=top, replace=False, p=probs / probs.sum())
                    for _ in range(t)]) if top <= np.count_nonzero(weights) else None
    if idx is None:   # fewer used experts than k: repeats allowed
      idx = rng.choice(e, size=(t, top), p=probs / probs.sum())
    routing = kernels.sort_slots(jnp.asarray(idx, jnp.int32), e)
    x = _rand(keys[0], (t, d), dtype)
    ws = (_rand(keys[1], (e, d, f), dtype, d ** -0.5), _rand(keys[2], (e, d, f), dtype, d ** -0.5),
          _rand(keys[3], (e, f, d), dtype, f ** -0.5))
    gates = jax.random.uniform(keys[4], (t, top), jnp.float32, 0.1, 1.0)
    probe = jax.random.normal(keys[5], (t, d), jnp.float32)

    f32 = lambda a: a.astype(jnp.float32)
    ref = lambda x, wg, wu, wd, g, r=routing, act=act: scatter_glu_reference(
        x, wg, wu, wd, *r, g, ACTIVATIONS[act])
    want = functools.lru_cache(maxsize=None)(
        lambda ref=ref, args=(f32(x), tuple(map(f32, ws)), gates, probe): _glu_outputs(ref, *args))

    @functools.lru_cache(maxsize=None)
    def got(backend, fused, r=routing, act=act, args=(x, ws, gates, probe)):
      glu = lambda x, wg, wu, wd, g: kernels.scatter_glu(
          x, wg, wu, wd, r, g, activation=act, backend=backend, fused=fused)
      # The arrays are arguments, not constants folded into the compiled program.
      return jax.block_until_ready(jax.jit(functools.partial(_glu_outputs, glu))(*args))

    shape = GroupedShape(t * top, d, f, e)
    # The paths: the products path first, then the fused kernels and the fused forward with the
    # products path's backward (every backend but "xla"; the GPU's default).
    for path, fused in (("products", False), ("fused", True), ("fusedfwd", "forward")):
      label = f"{name}_k{top}_{act}_{path}"
      for i, which in enumerate(GLU_OUTPUTS):
        if which == "y_undifferentiated" and path == "products":
          continue   # the products path has no primal of its own: y above
        op = "scatter_glu" if which == "y" else f"scatter_glu({which})"
        cases.append((op, label, shape,
                      lambda b, i=i, got=got, fused=fused: got(b, fused)[i],
                      lambda i=i, want=want: want()[i], None))
  return cases


def _glu_poison_check(dtype, interpret: bool) -> float:
  """The three fused GLU kernels writing into NaN-poisoned outputs, with rows past
  sum(group_sizes): the largest rel_err of their outputs against the float32 reference (inf if a
  row was left unwritten or a tail row is not zero)."""
  from kernels.activations import ACTIVATIONS
  from kernels.hidden import glu_math_grad
  from kernels.scatter import glu_triton

  m, t, d, f, e = (96, 48, 64, 48, 4) if interpret else (4000, 2000, 768, 256, 8)
  sizes = jnp.asarray([m // 4, 0, m // 2, m // 8], jnp.int32) if e == 4 else jnp.asarray(
      [m // 8, 0, m // 4, 1, 0, m // 4, m // 8, 7], jnp.int32)
  used = int(sizes.sum())
  keys = jax.random.split(jax.random.key(13), 8)
  src = jax.random.randint(keys[0], (m,), 0, t)
  dst = jax.random.permutation(keys[1], m).astype(jnp.int32)
  x = _rand(keys[2], (t, d), dtype)
  wg, wu = (_rand(k, (e, d, f), dtype, d ** -0.5) for k in keys[3:5])
  wd = _rand(keys[5], (e, f, d), dtype, f ** -0.5)
  do = _rand(keys[6], (m, d), dtype)
  scale = jax.random.uniform(keys[7], (m,), jnp.float32, 0.1, 1.0)
  f32 = lambda a: a.astype(jnp.float32)
  gids = row_group_ids(sizes, m)
  valid = (gids < e)[:, None]
  errs = []

  def err(got, want, tail_rows):
    got32 = np.asarray(f32(got))
    if not np.all(got32[tail_rows] == 0):
      return float("inf")
    return rel_err(got, want)

  a, g, u = glu_triton.glu_up(x, wg, wu, sizes, src, activation="silu", save_gate_up=True,
                              interpret=interpret, poison=True)
  xs = f32(x)[src]
  want_g = kernels.gmm_reference(xs, f32(wg), sizes, out_dtype=jnp.float32)
  want_u = kernels.gmm_reference(xs, f32(wu), sizes, out_dtype=jnp.float32)
  tail = np.arange(used, m)
  errs += [err(g, want_g, tail), err(u, want_u, tail),
           err(a, ACTIVATIONS["silu"](want_g) * want_u, tail)]
  dg, du, ga, parts = glu_triton.glu_hidden_grad(do, wd, g, u, scale, sizes, activation="silu",
                                                 interpret=interpret, poison=True)
  da_ = kernels.gmm_reference(f32(do), f32(wd), sizes, transpose_rhs=True, out_dtype=jnp.float32)
  a32, want_dg, want_du = glu_math_grad(ACTIVATIONS["silu"], g, u, scale[:, None] * da_)
  a_q = f32(a32.astype(dtype))
  errs += [err(dg, jnp.where(valid, want_dg, 0), tail), err(du, jnp.where(valid, want_du, 0), tail),
           err(ga, jnp.where(valid, scale[:, None] * a_q, 0), tail),
           err(parts.sum(0)[:, None], jnp.sum(da_ * a_q, axis=1)[:, None], tail)]
  dx = glu_triton.glu_data_grad(dg, du, wg, wu, sizes, dst, interpret=interpret, poison=True)
  want_rows = (kernels.gmm_reference(f32(dg), f32(wg), sizes, transpose_rhs=True,
                                     out_dtype=jnp.float32)
               + kernels.gmm_reference(f32(du), f32(wu), sizes, transpose_rhs=True,
                                       out_dtype=jnp.float32))
  errs.append(err(dx, jnp.zeros_like(want_rows).at[dst].set(want_rows), np.asarray(dst)[used:]))
  return max(errs)


def _blocksparse_dims(quick: bool) -> tuple[int, int, int, int]:
  """(block size, ffn size, contracting size, rows) of the block-sparse cases."""
  return (16, 32, 40, 48) if quick else (128, 1024, 1000, 3000)


def _blocksparse_name(quick: bool) -> str:
  b, f, _, m = _blocksparse_dims(quick)
  return f"b{b}_f{f}_m{m}"


def _blocksparse_cases(quick: bool, dtype):
  b, f, kd, m = _blocksparse_dims(quick)
  sizes = [5, 0, 40, 3] if quick else [1000, 0, 1999, 1]
  topo = blocksparse.make_topology(jnp.asarray(sizes, jnp.int32), m, ffn_size=f, block_size=b)
  p, ns = topo.sparse_shape
  keys = jax.random.split(jax.random.key(3), 4)
  a, w = _rand(keys[0], (p, kd), dtype), _rand(keys[1], (kd, ns), dtype, kd ** -0.5)
  data = blocksparse.sdd_reference(a, w, topo).astype(dtype)
  dense, lhs = _rand(keys[2], (ns, kd), dtype), _rand(keys[3], (kd, p), dtype)
  f32 = lambda v: v.astype(jnp.float32)
  name = _blocksparse_name(quick)
  return [
      ("blocksparse.sdd", name, None, lambda bk: blocksparse.sdd(a, w, topo, backend=bk),
       lambda: blocksparse.sdd_reference(f32(a), f32(w), topo), None),
      ("blocksparse.dsd", name, None, lambda bk: blocksparse.dsd(data, dense, topo, backend=bk),
       lambda: blocksparse.dsd_reference(f32(data), f32(dense), topo), None),
      ("blocksparse.dds", name, None, lambda bk: blocksparse.dds(lhs, data, topo, backend=bk),
       lambda: blocksparse.dds_reference(f32(lhs), f32(data), topo), None),
  ]


def _registry_of(op: str) -> registry.Registry:
  if op.startswith(("grouped_matmul", "grouped_mlp", "grouped_glu")):
    return kernels.GMM_BACKENDS
  if op.startswith("scatter_matmul"):
    return kernels.SCATTER_BACKENDS
  if op.startswith("scatter_glu"):
    return kernels.GLU_BACKENDS
  if op.startswith("blocksparse"):
    return kernels.BLOCKSPARSE_BACKENDS
  return kernels.REGISTRIES[op]


def _poison_check(shape: GroupedShape, dtype, interpret: bool) -> float:
  """The scatter kernel writing into a NaN-poisoned (M, N) buffer: rel_err against the reference
  (inf if a row was left unwritten)."""
  m, k, n, e = shape
  keys = jax.random.split(jax.random.key(11), 3)
  x = _rand(keys[0], (m, k), dtype)
  w = _rand(keys[1], (e, k, n), dtype, k ** -0.5)
  idx = jax.random.randint(keys[2], (m,), 0, e - 1)
  routing = kernels.sort_slots(idx[:, None], e)
  poison = jnp.full((m, n), jnp.nan, dtype)
  got = scatter2scatter(x, w, routing.group_sizes, routing.sorted_flat, None, None, m=m,
                        transpose_w=False, out_dtype=dtype, interpret=interpret, poison=poison)
  want = scatter_matmul_reference(x.astype(jnp.float32), w.astype(jnp.float32), *routing,
                                  y_grouped=True)
  return rel_err(got, want)


def run(quick: bool, ops: tuple[str, ...] = (), dtypes_wanted: tuple[str, ...] = (),
        backends: tuple[str, ...] = (), shapes_wanted: tuple[str, ...] = ()) -> list[dict[str, Any]]:
  """The check rows; `ops` / `dtypes_wanted` / `backends` / `shapes_wanted` (names) restrict the
  ops, dtypes, registry names and shapes checked (empty: all; a shape name matches the case
  labels that start with it, e.g. "fine_k8" the GLU's fine_k8_k8_silu_fused)."""
  shapes = QUICK_SHAPES if quick else GPU_SHAPES
  rows = []
  for dtype in DTYPES:
    if dtypes_wanted and jnp.dtype(dtype).name not in dtypes_wanted:
      continue
    dn = jnp.dtype(dtype).name
    dtypes = make_dtypes(dtype)
    wanted = lambda *names: not ops or any(o in ops for o in names)
    cases = ((_grouped_cases(shapes, dtype) if wanted("grouped_matmul", "group_xty") else [])
             + (_mlp_cases(shapes, dtype) if wanted("grouped_mlp", "grouped_glu") else [])
             + (_scatter_cases(shapes, dtype) if wanted("scatter_matmul") else [])
             + (_glu_cases(GLU_QUICK_SHAPES if quick else GLU_GPU_SHAPES, dtype)
                if wanted("scatter_glu") else [])
             + (_blocksparse_cases(quick, dtype) if not ops or any(
                 o.startswith("blocksparse") for o in ops) else []))
    for op, shape_name, shape, call, want_fn, tail in cases:
      if shapes_wanted and not shape_name.startswith(shapes_wanted):
        continue
      want_fn = functools.lru_cache(maxsize=None)(want_fn)   # once per case, for every backend
      if ops and op.split("(")[0] not in ops:
        continue
      reg = _registry_of(op)
      reg_dtypes = (jnp.dtype(dtype),) if reg is kernels.BLOCKSPARSE_BACKENDS else dtypes
      for name in reg.names:
        if backends and name not in backends:
          continue
        row: dict[str, Any] = {"op": op, "backend": name, "shape": shape_name, "dtype": dn}
        resolved = reg.select(name, shape, reg_dtypes)
        row["runs_on"] = resolved.name
        # Compiled backends on the GPU; interpreted ones (and xla) in --quick mode on CPU.
        if (op.startswith("scatter_glu") and shape_name.endswith(("_fused", "_fusedfwd"))
            and resolved.fn is None):
          row.update(status="skipped", reason="no fused GLU kernels (the products path is checked)")
        elif resolved.interpret and not quick:
          row.update(status="skipped", reason="interpret backend (use --quick)")
        elif (resolved.name == "mosaic" and dn == "float32"
              and (op.startswith(("grouped_matmul", "grouped_mlp", "grouped_glu", "scatter_glu"))
                   or op == "group_xty")):
          # (scatter_glu's down projection and weight gradients run on those kernels)
          row.update(status="skipped", reason=MOSAIC_F32)
        else:
          row["reason"] = resolved.unavailable(shape, reg_dtypes)
          row["status"] = "skipped" if row["reason"] else None
        if row["status"] is None:
          # Named before it runs, so that a kernel that hangs shows where.
          print(f"  .. {op} {name} {shape_name} {dn}", flush=True)
          try:
            got = jax.block_until_ready(call(name))
            err = rel_err(got, want_fn())
            ok = err <= TOL[dn]
            if tail is not None:
              row["tail_zero"] = bool(np.all(np.asarray(got[tail:], np.float32) == 0))
              ok = ok and row["tail_zero"]
            row.update(rel_err=err, status="ok" if ok else "FAIL")
          except Exception as e:  # a kernel that fails to lower/compile/run is a failure row
            row.update(status="FAIL", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                       if str(e) else type(e).__name__)
            traceback.print_exc(limit=2)
        rows.append(row)
        detail = f"{row['rel_err']:.3g}" if "rel_err" in row else (row.get("reason") or "")
        print(f"  {op:30s} {name:17s} -> {row['runs_on']:17s} {shape_name:14s} {dn:9s} "
              f"{row['status']:8s} {detail}", flush=True)
    # Poisoned output buffer: the scatter kernel must write every row.
    shape = GroupedShape(96 if quick else 4000, 128, 256, 4)
    for name, interpret in (("triton_interpret", True),) if quick else (("triton", False),):
      if (not interpret and not registry.on_gpu()) or (backends and name not in backends) or (
          ops and "scatter_matmul" not in ops):
        continue
      err = _poison_check(shape, dtype, interpret)
      rows.append({"op": "scatter2scatter(poisoned)", "backend": name, "runs_on": name,
                   "shape": f"m{shape.m}", "dtype": dn, "rel_err": err,
                   "status": "ok" if err <= TOL[dn] else "FAIL"})
      print(f"  scatter2scatter(poisoned)      {name:17s} {dn:9s} {rows[-1]['status']} {err:.3g}")
    # The fused GLU kernels on poisoned outputs, rows past the groups included.
    for name, interpret in (("triton_interpret", True),) if quick else (("triton", False),):
      if (not interpret and not registry.on_gpu()) or (backends and name not in backends) or (
          ops and "scatter_glu" not in ops):
        continue
      err = _glu_poison_check(dtype, interpret)
      rows.append({"op": "glu kernels(poisoned)", "backend": name, "runs_on": name,
                   "shape": "tail", "dtype": dn, "rel_err": err,
                   "status": "ok" if err <= TOL[dn] else "FAIL"})
      print(f"  glu kernels(poisoned)          {name:17s} {dn:9s} {rows[-1]['status']} {err:.3g}")
  return rows


def table(rows: list[dict[str, Any]]) -> str:
  cols = ["op", "backend", "runs_on", "shape", "dtype", "status", "rel_err", "reason"]
  cell = lambda r, c: (f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c) or ""))
  width = {c: max(len(c), *(len(cell(r, c)) for r in rows)) for c in cols}
  lines = ["  ".join(c.ljust(width[c]) for c in cols)]
  lines += ["  ".join(cell(r, c).ljust(width[c]) for c in cols) for r in rows]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true",
                  help="small shapes, xla and interpret backends (for CPU)")
  ap.add_argument("--out", required=True, help="JSON file for the rows and the environment")
  ap.add_argument("--ops", default="", help="comma-separated op names (default: all), e.g. "
                  "grouped_matmul,group_xty,grouped_mlp,grouped_glu,scatter_matmul,scatter_glu")
  ap.add_argument("--dtypes", default="", help="comma-separated: bfloat16,float32 (default both)")
  ap.add_argument("--backends", default="", help="comma-separated registry names (default: all), "
                  "e.g. mosaic")
  ap.add_argument("--shapes", default="", help="comma-separated shape names (default: all), e.g. "
                  "fine_k8,ragged; a name selects the cases whose label starts with it")
  args = ap.parse_args(argv)
  known = [c[0] for c in QUICK_SHAPES + GPU_SHAPES + GLU_QUICK_SHAPES + GLU_GPU_SHAPES] + [
      _blocksparse_name(quick) for quick in (True, False)]
  unknown = [n for n in filter(None, args.shapes.split(",")) if not any(
      k.startswith(n) or n.startswith(k) for k in known)]
  if unknown:
    ap.error(f"--shapes: unknown {unknown}; known: {sorted(set(known))}")
  rows = run(args.quick, tuple(filter(None, args.ops.split(","))),
             tuple(filter(None, args.dtypes.split(","))),
             tuple(filter(None, args.backends.split(","))),
             tuple(filter(None, args.shapes.split(","))))
  print(table(rows))
  env = {**bench_common.environment(), "quick": args.quick}
  with open(args.out, "w") as f:
    json.dump({"env": env, "rows": rows}, f, indent=1)
  fails = [r for r in rows if r["status"] == "FAIL"]
  print(f"{len(rows)} rows, {len(fails)} failures; written to {args.out}")
  return 1 if fails else 0


if __name__ == "__main__":
  sys.exit(main())
