"""The fused scatter GLU (kernels.scatter.glu over glu_triton's kernels, interpret mode): forward
and every gradient (x, w_gate, w_up, w_down, gates) against the plain-jnp float32 reference, at
empty experts, one expert taking every token, row counts off the tile grid, k = 1 and k > 1,
bf16 and float32, SwiGLU and GEGLU; the kernels alone at rows past the groups; what the backward
keeps; the products path kept behind `fused=False`; the argument errors; the GPU lowering. The
fused up-projection undifferentiated, the products path differentiated (`fused="forward"`, the
default where the fused kernels run): its undifferentiated forward is the fused path's, its
gradients the reference's and the products path's, its residuals the products path's;
scatter_matmul_backward, the products' backward it runs, is scatter_matmul's VJP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from kernels import activations
from kernels.scatter import (
    FusedGluConfig, TritonScatterConfig, scatter_glu, scatter_glu_reference,
    scatter_matmul_reference, sort_slots)
from kernels.scatter import experts as experts_module, glu_triton
from kernels.scatter.api import scatter_matmul, scatter_matmul_backward

TILES = TritonScatterConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4,
                            num_stages=2)
E, D, F = 5, 24, 40     # D and F off the 16-wide tiles


def _choices(rng, kind: str, t: int, k: int) -> np.ndarray:
  if kind == "empty":   # experts 0 and 3 never chosen
    return np.stack([rng.choice([1, 2, 4], k, replace=False) for _ in range(t)])
  if kind == "one":     # expert 2 takes every token's first choice; with k = 1, every row
    rest = [rng.choice([0, 1, 3, 4], k - 1, replace=False) for _ in range(t)]
    return np.stack([np.concatenate([[2], r]) for r in rest])
  return rng.integers(0, E, (t, k))


def _setup(rng, kind: str, t: int, k: int, dtype, d: int = D, f: int = F):
  routing = sort_slots(jnp.asarray(_choices(rng, kind, t, k), jnp.int32), E)
  x = jnp.asarray(rng.standard_normal((t, d)), dtype)
  ws = (jnp.asarray(rng.standard_normal((E, d, f)) / np.sqrt(d), dtype),
        jnp.asarray(rng.standard_normal((E, d, f)) / np.sqrt(d), dtype),
        jnp.asarray(rng.standard_normal((E, f, d)) / np.sqrt(f), dtype))
  gates = jnp.asarray(rng.random((t, k)) + 0.1, jnp.float32)
  return routing, x, ws, gates


def _value_and_grads(fn, x, ws, gates, probe):
  loss = lambda x, wg, wu, wd, g: jnp.sum(fn(x, wg, wu, wd, g).astype(jnp.float32) * probe)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, *ws, gates)


def _check_against_reference(rng, kind, t, k, dtype, activation, **kw):
  routing, x, ws, gates = _setup(rng, kind, t, k, dtype)
  fused = lambda x, wg, wu, wd, g: scatter_glu(x, wg, wu, wd, routing, g, activation=activation,
                                               backend="triton_interpret", fused=True, **kw)
  act = activations.ACTIVATIONS[activation]
  ref = lambda x, wg, wu, wd, g: scatter_glu_reference(x, wg, wu, wd, *routing, g, act)
  f32 = lambda a: a.astype(jnp.float32)
  y = jax.jit(fused)(x, *ws, gates)
  assert y.dtype == dtype and y.shape == (t, D)
  assert_close(y, ref(f32(x), *map(f32, ws), gates), dtype, name="y")
  probe = jnp.asarray(rng.standard_normal((t, D)), jnp.float32)
  _, got = _value_and_grads(fused, x, ws, gates, probe)
  _, want = _value_and_grads(ref, f32(x), tuple(map(f32, ws)), gates, probe)
  for name, g, w in zip(("dx", "dw_gate", "dw_up", "dw_down", "dgates"), got, want):
    assert g.shape == w.shape
    assert_close(g, w, dtype, factor=2.0, name=name)


@pytest.mark.parametrize("kind,t,k,dtype,activation", [
    ("empty", 19, 2, jnp.float32, "silu"),        # empty experts, 38 rows (off the 16-row tile)
    ("one", 21, 1, jnp.bfloat16, "silu"),         # k = 1: one expert takes every row
    ("one", 13, 3, jnp.float32, "gelu"),          # one expert takes every first choice, GEGLU
    ("random", 23, 4, jnp.bfloat16, "gelu_tanh"),  # GEGLU (tanh), bf16
    ("random", 9, 2, jnp.bfloat16, "relu"),
])
def test_fused_glu_matches_reference(rng, kind, t, k, dtype, activation):
  _check_against_reference(rng, kind, t, k, dtype, activation, config=TILES)


def test_fused_glu_default_config(rng):
  """The backend's default config (128-row tiles: every row tile shared by several experts)."""
  _check_against_reference(rng, "random", 30, 2, jnp.bfloat16, "silu")


def test_per_kernel_config(rng):
  cfg = FusedGluConfig(up=TILES, hidden_grad=TritonScatterConfig(block_m=32, block_n=32,
                                                                 block_k=16, group_m=1),
                       data_grad=TritonScatterConfig(block_m=16, block_n=32, block_k=32),
                       down=TILES)
  _check_against_reference(rng, "empty", 17, 2, jnp.float32, "silu", config=cfg)


def test_backward_keeps_gate_and_up_not_a_or_gathered_x(rng):
  """The VJP's residuals: two (M, f) arrays (g and u), nothing (M, d)."""
  t, k = 19, 2
  routing, x, ws, gates = _setup(rng, "random", t, k, jnp.bfloat16)
  _, vjp = jax.vjp(lambda x, wg, wu, wd, g: scatter_glu(x, wg, wu, wd, routing, g,
                                                        backend="triton_interpret", config=TILES,
                                                        fused=True),
                   x, *ws, gates)
  shapes = [tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(vjp)]
  assert shapes.count((t * k, F)) == 2, shapes
  assert (t * k, D) not in shapes, shapes


def test_products_path_behind_fused_false(rng):
  """fused=False runs the three scatter_matmul products (any activation function); it and the
  fused path agree."""
  routing, x, ws, gates = _setup(rng, "empty", 19, 2, jnp.float32)
  run = lambda **kw: scatter_glu(x, *ws, routing, gates, backend="triton_interpret",
                                 config=TILES, **kw)
  fused = run(fused=True)
  assert_close(run(), fused, jnp.float32, name="default (products) vs fused")
  assert_close(run(fused=False), fused, jnp.float32, name="products vs fused")
  assert_close(run(fused=False, activation=lambda v: jax.nn.silu(v)), fused, jnp.float32,
               name="products path, a lambda")
  xla = scatter_glu(x, *ws, routing, gates, backend="xla")
  assert_close(xla, fused, jnp.float32, name="xla vs fused")


def test_argument_errors(rng):
  routing, x, ws, gates = _setup(rng, "empty", 9, 2, jnp.float32)
  with pytest.raises(ValueError, match="fused: backend 'xla' has no fused GLU kernels"):
    scatter_glu(x, *ws, routing, gates, backend="xla", fused=True)
  with pytest.raises(ValueError, match="activation: the fused GLU kernels compile in one of"):
    scatter_glu(x, *ws, routing, gates, backend="triton_interpret", activation=lambda v: v,
                fused=True)
  with pytest.raises(ValueError, match="activation must be one of"):
    scatter_glu(x, *ws, routing, gates, backend="xla", activation="swish")
  with pytest.raises(ValueError, match="config: a FusedGluConfig configures the fused path"):
    scatter_glu(x, *ws, routing, gates, backend="triton_interpret", fused=False,
                config=FusedGluConfig())
  with pytest.raises(ValueError, match="config must be a kernels.scatter.FusedGluConfig"):
    scatter_glu(x, *ws, routing, gates, backend="triton_interpret", config={"block_m": 16},
                fused=True)
  huge = TritonScatterConfig(block_m=256, block_n=256, block_k=256, num_stages=4)
  with pytest.raises(ValueError, match="config: the fused GLU kernels need config.up"):
    scatter_glu(x, *ws, routing, gates, backend="triton_interpret", config=huge, fused=True)
  with pytest.raises(ValueError, match="config.down must be a TritonScatterConfig or None"):
    FusedGluConfig(down=FusedGluConfig())
  with pytest.raises(ValueError, match="fused must be one of"):
    scatter_glu(x, *ws, routing, gates, fused="yes")
  with pytest.raises(ValueError, match="routing.sorted_flat must be a 1-D int32 array"):
    scatter_glu(x, *ws, routing._replace(sorted_flat=routing.sorted_flat[:, None]), gates)


# ------------------------------------------------- fused="forward": the products path's backward

def _check_fused_forward(rng, kind, t, k, dtype, activation, backend, config=TILES, d=D, f=F,
                         products=True):
  """fused="forward" against the fused path's forward (the same kernels: equal), the float32
  reference (the reference tests' budgets) and, with `products`, the products path's gradients
  (the same backward on the same g and u: a tenth of the reference budget; in the interpreter
  they are equal)."""
  routing, x, ws, gates = _setup(rng, kind, t, k, dtype, d, f)
  run = lambda fused: (lambda x, wg, wu, wd, g: scatter_glu(
      x, wg, wu, wd, routing, g, activation=activation, backend=backend, config=config,
      fused=fused))
  np.testing.assert_array_equal(jax.jit(run("forward"))(x, *ws, gates),
                                jax.jit(run(True))(x, *ws, gates))
  act = activations.ACTIVATIONS[activation]
  ref = lambda x, wg, wu, wd, g: scatter_glu_reference(x, wg, wu, wd, *routing, g, act)
  f32 = lambda a: a.astype(jnp.float32)
  probe = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  y, got = _value_and_grads(run("forward"), x, ws, gates, probe)
  y_ref, want = _value_and_grads(ref, f32(x), tuple(map(f32, ws)), gates, probe)
  assert_close(y, y_ref, dtype, name="loss")
  names = ("dx", "dw_gate", "dw_up", "dw_down", "dgates")
  for name, g, w, operand in zip(names, got, want, (x, *ws, gates)):
    assert g.shape == w.shape and g.dtype == operand.dtype, (name, g.shape, g.dtype)
    assert_close(g, w, dtype, factor=2.0, name=name)
  if products:
    y_products, from_products = _value_and_grads(run(False), x, ws, gates, probe)
    assert_close(y, y_products, dtype, factor=0.1, name="loss vs products")
    for name, g, p in zip(names, got, from_products):
      assert_close(g, p, dtype, factor=0.1, name=f"{name} vs products")


@pytest.mark.parametrize("kind,t,k,dtype,activation", [
    ("empty", 19, 2, jnp.float32, "silu"),   # experts 0 and 3 empty, 38 rows (off the 16-row tile)
    ("one", 21, 1, jnp.bfloat16, "gelu"),    # k = 1: one expert takes every row, exact GELU
])
def test_fused_forward_path_matches_reference_and_products(rng, kind, t, k, dtype, activation):
  _check_fused_forward(rng, kind, t, k, dtype, activation, "triton_interpret")


@pytest.mark.slow
def test_fused_forward_path_on_mosaic_interpret(rng):
  """backend "mosaic" (the GPU's "pallas" at these shapes): the backward's grouped products on
  the Mosaic kernels, at their tiles' multiples (d = f = 128); bf16, experts 0 and 3 empty, 42
  rows. Against the reference only: the Mosaic kernels are slow to interpret in bf16 (about 12 s
  per forward+backward), and the agreement with the products path is checked above."""
  _check_fused_forward(rng, "empty", 21, 2, jnp.bfloat16, "silu", "mosaic_interpret", d=128,
                       f=128, products=False)


def test_fused_forward_path_keeps_the_products_residuals(rng):
  """Differentiated, fused="forward" runs the products path's forward, so the VJP's residuals
  are the products path's: the packed gu (M, 2f) and a (M, f), no (M, d) array (shapes only:
  nothing runs)."""
  t, k = 19, 2
  routing, x, ws, gates = _setup(rng, "random", t, k, jnp.bfloat16)
  fn = lambda x, wg, wu, wd, g: scatter_glu(x, wg, wu, wd, routing, g, backend="triton_interpret",
                                            config=TILES, fused="forward")
  vjp = jax.eval_shape(lambda *args: jax.vjp(fn, *args)[1], x, *ws, gates)
  shapes = [tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(vjp)]
  assert shapes.count((t * k, F)) == 1 and shapes.count((t * k, 2 * F)) == 1, shapes
  assert (t * k, D) not in shapes, shapes


def test_default_is_the_fused_forward_where_it_runs(rng, monkeypatch):
  """fused=None runs fused="forward" on a backend with the fused kernels at a shape they take,
  a named activation, pack_gate_up and no config; the products path otherwise (a products
  config, an unnamed activation, two products, "xla")."""
  calls = []
  real = experts_module.fused_up_scatter_glu
  monkeypatch.setattr(experts_module, "fused_up_scatter_glu",
                      lambda *a, **kw: calls.append(1) or real(*a, **kw))
  routing, x, ws, gates = _setup(rng, "empty", 19, 2, jnp.float32)
  run = lambda **kw: scatter_glu(x, *ws, routing, gates, **kw)
  y = run(backend="triton_interpret")
  assert calls == [1]
  np.testing.assert_array_equal(y, run(backend="triton_interpret", fused="forward"))
  calls.clear()
  run(backend="triton_interpret", config=TILES)
  run(backend="triton_interpret", activation=lambda v: jax.nn.silu(v))
  run(backend="triton_interpret", pack_gate_up=False)
  run(backend="xla")
  assert calls == [], calls


def test_fused_forward_argument_errors(rng):
  routing, x, ws, gates = _setup(rng, "empty", 9, 2, jnp.float32)
  with pytest.raises(ValueError, match="fused: backend 'xla' has no fused GLU kernels"):
    scatter_glu(x, *ws, routing, gates, backend="xla", fused="forward")
  with pytest.raises(ValueError, match=r"fused must be one of \(None, False, True, 'forward'\)"):
    scatter_glu(x, *ws, routing, gates, backend="triton_interpret", fused="backward")
  with pytest.raises(ValueError, match="pack_gate_up: fused='forward' runs the backward of the "
                                       "gate and up projections packed"):
    scatter_glu(x, *ws, routing, gates, backend="triton_interpret", fused="forward",
                pack_gate_up=False)
  with pytest.raises(ValueError, match="activation: the fused GLU kernels compile in one of"):
    scatter_glu(x, *ws, routing, gates, backend="triton_interpret", activation=lambda v: v,
                fused="forward")


@pytest.mark.parametrize("x_grouped,y_grouped,use_gates,parts", [
    (True, False, True, False),    # the down projection: grouped a, gated combine
    (False, True, False, True),    # the gate and up projections: token-order x, a weight pair
])
def test_scatter_matmul_backward_is_the_vjp(rng, x_grouped, y_grouped, use_gates, parts):
  """scatter_matmul_backward(forward's arguments, dy) is jax.vjp of scatter_matmul: the same
  custom_vjp backward, the same values ("xla": nothing interpreted), weight parts split back."""
  t, k = 11, 2
  routing, x, (wg, wu, _), gates = _setup(rng, "empty", t, k, jnp.float32)
  if x_grouped:
    x = jnp.asarray(rng.standard_normal((t * k, D)), jnp.float32)
  w = (wg, wu) if parts else wg
  kw = dict(x_grouped=x_grouped, y_grouped=y_grouped, backend="xla")
  y, vjp = jax.vjp(lambda x, w, g: scatter_matmul(x, w, routing, gates=g, **kw), x, w,
                   gates if use_gates else None)
  dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  want = vjp(dy)
  got = scatter_matmul_backward(x, w, routing, dy, gates=gates if use_gates else None, **kw)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for g, w_ in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(g, w_)
  with pytest.raises(ValueError, match="dy: must have the output's shape"):
    scatter_matmul_backward(x, w, routing, dy[:, 1:], gates=gates if use_gates else None, **kw)


@pytest.mark.parametrize("backend", ["mosaic", "triton"])
def test_fused_forward_path_lowers_for_h100(backend):
  """fused="forward" lowers for an H100: the fused up-projection in the undifferentiated
  forward, and none of the fused kernels under differentiation (the products path's forward
  and backward)."""
  from kernels.common.gpu_lowering import lower_for_gpu

  s = jax.ShapeDtypeStruct
  t, k, e, d, f = 300, 4, 8, 256, 384

  def loss(x, g, wg, wu, wd, choices):
    out = scatter_glu(x, wg, wu, wd, sort_slots(choices, e), g, backend=backend,
                      activation="silu", fused="forward")
    return jnp.sum(out.astype(jnp.float32))

  bf = jnp.bfloat16
  args = (s((t, d), bf), s((t, k), jnp.float32), s((e, d, f), bf), s((e, d, f), bf),
          s((e, f, d), bf), s((t, k), jnp.int32))
  forward = lower_for_gpu(loss, *args)
  assert "jaxmoe_glu_up" in forward
  trained = lower_for_gpu(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)), *args)
  for name in ("jaxmoe_glu_up", "jaxmoe_glu_hidden_grad", "jaxmoe_glu_data_grad"):
    assert name not in trained, name
  assert ("mosaic_gpu" in trained) == (backend == "mosaic")


# ----------------------------------------------------------------------------- the kernels alone

def _tail_setup(rng, dtype=jnp.float32):
  """Group sizes summing to fewer than M rows: rows 37.. belong to no expert."""
  m, t = 48, 24
  sizes = jnp.asarray([10, 0, 20, 7, 0], jnp.int32)
  src = jnp.asarray(rng.integers(0, t, m), jnp.int32)
  x = jnp.asarray(rng.standard_normal((t, D)), dtype)
  w = [jnp.asarray(rng.standard_normal((E, D, F)) / np.sqrt(D), dtype) for _ in range(2)]
  return m, sizes, src, x, w


def test_up_kernel_rows_past_the_groups_are_zero(rng):
  m, sizes, src, x, (wg, wu) = _tail_setup(rng)
  a, g, u = glu_triton.glu_up(x, wg, wu, sizes, src, activation="silu", save_gate_up=True,
                              config=TILES, interpret=True)
  xs = x[src]
  want_g = scatter_matmul_reference(xs, wg, jnp.arange(m, dtype=jnp.int32), sizes,
                                    x_grouped=True, y_grouped=True)
  want_u = scatter_matmul_reference(xs, wu, jnp.arange(m, dtype=jnp.int32), sizes,
                                    x_grouped=True, y_grouped=True)
  assert_close(g, want_g, jnp.float32, name="g")
  assert_close(u, want_u, jnp.float32, name="u")
  assert_close(a, jax.nn.silu(want_g) * want_u, jnp.float32, name="a")
  for out in (a, g, u):
    np.testing.assert_array_equal(np.asarray(out)[37:], 0.0)
  # Without save_gate_up only a is written, the same a.
  a_only = glu_triton.glu_up(x, wg, wu, sizes, src, activation="silu", save_gate_up=False,
                             config=TILES, interpret=True)
  np.testing.assert_array_equal(np.asarray(a_only), np.asarray(a))


def test_backward_kernels_rows_past_the_groups(rng):
  m, sizes, _, _, (wg, wu) = _tail_setup(rng)
  dg, du = (jnp.asarray(rng.standard_normal((m, F)), jnp.float32) for _ in range(2))
  dst = jnp.asarray(rng.permutation(m), jnp.int32)
  got = glu_triton.glu_data_grad(dg, du, wg, wu, sizes, dst, config=TILES, interpret=True)
  rows = jnp.arange(m, dtype=jnp.int32)
  sorted_rows = (scatter_matmul_reference(dg, wg, rows, sizes, x_grouped=True, y_grouped=True,
                                          transpose_w=True)
                 + scatter_matmul_reference(du, wu, rows, sizes, x_grouped=True, y_grouped=True,
                                            transpose_w=True))
  want = jnp.zeros_like(sorted_rows).at[dst].set(sorted_rows)
  assert_close(got, want, jnp.float32, name="dX rows")
  np.testing.assert_array_equal(np.asarray(got)[np.asarray(dst)[37:]], 0.0)
  # hidden_grad: dA' and its epilogue, against the same math in jnp.
  do = jnp.asarray(rng.standard_normal((m, D)), jnp.float32)
  wd = jnp.asarray(rng.standard_normal((E, F, D)) / np.sqrt(F), jnp.float32)
  g, u = (jnp.asarray(rng.standard_normal((m, F)), jnp.float32) for _ in range(2))
  s = jnp.asarray(rng.random(m) + 0.1, jnp.float32)
  dgate, dup, ga, parts = glu_triton.glu_hidden_grad(do, wd, g, u, s, sizes, activation="gelu",
                                                     config=TILES, interpret=True)
  da_ = scatter_matmul_reference(do, wd, rows, sizes, x_grouped=True, y_grouped=True,
                                 transpose_w=True)
  gelu = activations.gelu
  a = gelu(g) * u
  want_dg = jax.vmap(jax.grad(gelu))(g.reshape(-1)).reshape(g.shape) * u * s[:, None] * da_
  valid = (jnp.arange(m) < 37)[:, None]
  assert_close(dgate, jnp.where(valid, want_dg, 0), jnp.float32, name="dG")
  assert_close(dup, jnp.where(valid, gelu(g) * s[:, None] * da_, 0), jnp.float32, name="dU")
  assert_close(ga, jnp.where(valid, s[:, None] * a, 0), jnp.float32, name="gates * a")
  assert parts.shape == (glu_triton.tiling.cdiv(F, TILES.block_n), m)
  assert_close(parts.sum(0), jnp.sum(da_ * a, axis=1), jnp.float32, name="d gates")


def test_search_space_and_defaults_fit():
  from kernels.gmm.shapes import GroupedShape, dtypes

  shape = GroupedShape(327680, 768, 256, 128)
  for dt in (jnp.bfloat16, jnp.float32):
    space = glu_triton.search_space(shape, dtypes(dt))
    assert space[0] == glu_triton.default_config(shape, dtypes(dt))
    assert len(space) > 1 and len(set(space)) == len(space)
    assert all(glu_triton.check(shape, dtypes(dt), c) is None for c in space)


def test_kernel_activations_match_jax_nn():
  x = jnp.linspace(-9.0, 9.0, 4001, dtype=jnp.float32)
  for name, fn in activations.ACTIVATIONS.items():
    kfn = activations.kernel_activation(name)
    assert_close(kfn(x), fn(x), jnp.float32, name=name)
    assert_close(jax.vmap(jax.grad(kfn))(x), jax.vmap(jax.grad(fn))(x), jnp.float32,
                 name=f"{name}'")
  assert activations.activation_name(jax.nn.gelu) == "gelu_tanh"
  assert activations.activation_name(activations.gelu) == "gelu"
  assert activations.activation_name(lambda v: v) is None


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_fused_glu_lowers_for_h100(activation):
  """Forward and backward lower for an H100 with the fused kernels (exact GELU's erfc included)
  and without the products path's separate up projections."""
  from kernels.common.gpu_lowering import lower_for_gpu

  s = jax.ShapeDtypeStruct
  t, k, e, d, f = 300, 4, 8, 256, 384

  def loss(x, g, wg, wu, wd, choices):
    out = scatter_glu(x, wg, wu, wd, sort_slots(choices, e), g, backend="triton",
                      activation=activation, fused=True)
    return jnp.sum(out.astype(jnp.float32))

  bf = jnp.bfloat16
  text = lower_for_gpu(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)), s((t, d), bf),
                       s((t, k), jnp.float32), s((e, d, f), bf), s((e, d, f), bf),
                       s((e, f, d), bf), s((t, k), jnp.int32))
  for name in ("jaxmoe_glu_up", "jaxmoe_glu_hidden_grad", "jaxmoe_glu_data_grad"):
    assert name in text
  # The down projection's forward is the only scatter2scatter product left.
  assert text.count("jaxmoe_scatter2scatter") == text.count("jaxmoe_glu_up")


@pytest.mark.slow
def test_bench_scatter_glu_smoke(tmp_path, monkeypatch):
  """experiments.bench_scatter --smoke --only glu: the three paths timed, the fused path's and
  the unpacked products path's outputs and gradients compared with the products path's, the JSON
  written."""
  import json

  from experiments import bench_scatter

  monkeypatch.setattr("sys.argv", ["bench_scatter", "--smoke", "--only", "glu",
                                   "--out", str(tmp_path)])
  bench_scatter.main()
  (path,) = tmp_path.glob("*/*-scatter-glu.json")
  payload = json.loads(path.read_text())
  (row,) = payload["glu"]
  assert all(row[p]["fwdbwd_ms"] > 0 for p in ("fused", "products", "products-unpacked"))
  assert row["fused"]["residual_bytes"] < row["products"]["residual_bytes"]
  assert len(payload["checks"]) == 12 and all(c["pass"] for c in payload["checks"])
