"""scatter_matmul (ScatterMoE ParallelLinear): every layout against the reference, forward and
gradients, xla and the Triton kernel in interpret mode, fp32 and bf16, awkward routings."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from kernels.scatter import triton as scatter_triton
from kernels.common.groups import row_group_ids
from kernels.scatter import SortedSlots, sort_slots, scatter_matmul
from kernels.scatter import scatter_matmul_reference

# Small tiles so a few dozen rows span several tiles and tiles shared by two experts.
SMALL = scatter_triton.TritonScatterConfig(block_m=16, block_n=16, block_k=16, group_m=2)


def expert_choices(rng, t: int, k: int, e: int, kind: str) -> np.ndarray:
  """(T, k) distinct experts per token. "empty": experts 0, 2 and the last get no rows;
  "one": every token's choices are experts 0..k-1 (expert 0 takes all first choices)."""
  if kind == "one":
    return np.tile(np.arange(k, dtype=np.int32), (t, 1))
  pool = np.array([i for i in range(e) if i not in (0, 2, e - 1)]) if kind == "empty" else np.arange(e)
  return np.stack([rng.choice(pool, k, replace=False) for _ in range(t)]).astype(np.int32)


def make_inputs(rng, *, t=21, k=2, e=6, kin=24, n=40, kind="empty", dtype=jnp.float32,
                transpose_w=False):
  choices = expert_choices(rng, t, k, e, kind)
  routing = sort_slots(jnp.asarray(choices), e)
  x = jnp.asarray(rng.standard_normal((t, kin)), dtype)
  wshape = (e, n, kin) if transpose_w else (e, kin, n)
  w = jnp.asarray(rng.standard_normal(wshape) / np.sqrt(kin), dtype)
  gates = jnp.asarray(rng.random((t, k)) + 0.1, jnp.float32)
  return choices, routing, x, w, gates


def test_make_routing_is_a_stable_sort(rng):
  choices = expert_choices(rng, 13, 3, 7, "empty")
  sorted_flat, group_sizes = sort_slots(jnp.asarray(choices), 7)
  flat = choices.reshape(-1)
  np.testing.assert_array_equal(np.asarray(sorted_flat), np.argsort(flat, kind="stable"))
  np.testing.assert_array_equal(np.asarray(group_sizes), np.bincount(flat, minlength=7))
  assert int(group_sizes[0]) == 0 and int(group_sizes[2]) == 0


# (x_grouped, y_grouped, use_gates, transpose_w): every layout the op supports.
LAYOUTS = [
    (False, True, False, False),   # token order -> grouped (first MLP layer)
    (False, False, False, True),   # token order -> flat order, (E, N, K) weights
    (False, False, True, False),   # token order -> combined (T, N)
    (True, True, False, True),     # grouped -> grouped
    (True, False, True, False),    # grouped -> combined (last MLP layer)
]


def _call(x, w, routing, gates, layout, backend, config=None):
  x_grouped, y_grouped, use_gates, transpose_w = layout
  return scatter_matmul(x, w, routing, gates=gates if use_gates else None, x_grouped=x_grouped,
                        y_grouped=y_grouped, transpose_w=transpose_w, backend=backend,
                        config=config)


def _ref(x, w, routing, gates, layout):
  x_grouped, y_grouped, use_gates, transpose_w = layout
  return scatter_matmul_reference(x, w, routing.sorted_flat, routing.group_sizes,
                                  gates=gates if use_gates else None, x_grouped=x_grouped,
                                  y_grouped=y_grouped, transpose_w=transpose_w)


def _layout_inputs(rng, layout, kind="empty", dtype=jnp.float32):
  choices, routing, x, w, gates = make_inputs(rng, kind=kind, dtype=dtype, transpose_w=layout[3])
  if layout[0]:  # grouped input: M rows
    x = jnp.asarray(rng.standard_normal((routing.sorted_flat.shape[0], x.shape[1])), dtype)
  return routing, x, w, gates


def _check_grads(x, w, gates, routing, layout, backend, dtype, factor):
  """jax.grad through the custom_vjp against jax.grad of the float32 reference."""
  use_gates = layout[2]
  out_shape = jax.eval_shape(lambda: _ref(x, w, routing, gates, layout)).shape
  probe = jnp.asarray(np.random.default_rng(1).standard_normal(out_shape), jnp.float32)

  def loss(fn, x, w, g):
    return jnp.sum(fn(x, w, g).astype(jnp.float32) * probe)

  got = jax.grad(lambda *a: loss(lambda x, w, g: _call(x, w, routing, g, layout, backend, SMALL),
                                 *a), argnums=(0, 1, 2))(x, w, gates)
  want = jax.grad(lambda *a: loss(lambda x, w, g: _ref(x, w, routing, g, layout), *a),
                  argnums=(0, 1, 2))(x.astype(jnp.float32), w.astype(jnp.float32), gates)
  assert_close(got[0], want[0], dtype, factor=factor, name="dx")
  assert_close(got[1], want[1], dtype, factor=factor, name="dw")
  if use_gates:
    assert_close(got[2], want[2], dtype, factor=factor, name="dgates")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_xla_forward_and_grads(rng, layout):
  routing, x, w, gates = _layout_inputs(rng, layout)
  got = _call(x, w, routing, gates, layout, "xla")
  assert_close(got, _ref(x, w, routing, gates, layout), jnp.float32, name="out")
  _check_grads(x, w, gates, routing, layout, "xla", jnp.float32, 1.0)


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[1], LAYOUTS[4]])
def test_triton_interpret_forward_and_grads(rng, layout):
  routing, x, w, gates = _layout_inputs(rng, layout)
  # Interpret mode leaves unwritten output rows NaN: finite output = every row was written.
  got = _call(x, w, routing, gates, layout, "triton_interpret", SMALL)
  chex.assert_tree_all_finite(got)
  assert_close(got, _ref(x, w, routing, gates, layout), jnp.float32, name="out")
  _check_grads(x, w, gates, routing, layout, "triton_interpret", jnp.float32, 1.0)


@pytest.mark.parametrize("kind", ["one"])
@pytest.mark.parametrize("layout", [LAYOUTS[2], LAYOUTS[3]])
def test_triton_interpret_one_expert_takes_all(rng, layout, kind):
  routing, x, w, gates = _layout_inputs(rng, layout, kind=kind)
  got = _call(x, w, routing, gates, layout, "triton_interpret", SMALL)
  chex.assert_tree_all_finite(got)
  assert_close(got, _ref(x, w, routing, gates, layout), jnp.float32, name="out")


def test_bf16_triton_interpret_forward_and_grads(rng):
  layout = LAYOUTS[2]
  routing, x, w, gates = _layout_inputs(rng, layout, dtype=jnp.bfloat16)
  got = _call(x, w, routing, gates, layout, "triton_interpret", SMALL)
  assert got.dtype == jnp.bfloat16
  want = _ref(x.astype(jnp.float32), w.astype(jnp.float32), routing, gates, layout)
  assert_close(got, want, jnp.bfloat16, name="out")
  _check_grads(x, w, gates, routing, layout, "triton_interpret", jnp.bfloat16, 1.0)


def test_bf16_xla_grads(rng):
  layout = LAYOUTS[4]
  routing, x, w, gates = _layout_inputs(rng, layout, dtype=jnp.bfloat16)
  _check_grads(x, w, gates, routing, layout, "xla", jnp.bfloat16, 1.0)


def test_kernel_rows_past_the_groups_are_zero(rng):
  """Sorted rows at or past sum(group_sizes) must be written as zeros at their scattered rows;
  the output starts as NaN (the poison buffer), so a missed row shows up too."""
  m, kin, n, e = 37, 24, 20, 3
  group_sizes = jnp.asarray([9, 0, 17], jnp.int32)       # 26 of 37 rows routed
  perm = jnp.asarray(rng.permutation(m), jnp.int32)
  x = jnp.asarray(rng.standard_normal((m, kin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((e, kin, n)), jnp.float32)
  out = scatter_triton.scatter2scatter(x, w, group_sizes, perm, perm, None, m=m,
                                       transpose_w=False, out_dtype=jnp.float32, config=SMALL,
                                       interpret=True,
                                       poison=jnp.full((m, n), jnp.nan, jnp.float32))
  chex.assert_tree_all_finite(out)
  gid = np.asarray(row_group_ids(group_sizes, m))
  want = np.zeros((m, n), np.float32)
  for p in range(m):
    if gid[p] < e:
      want[int(perm[p])] = np.asarray(x)[int(perm[p])] @ np.asarray(w)[gid[p]]
  tail = np.asarray(perm)[gid == e]
  assert tail.size == 11 and np.all(np.asarray(out)[tail] == 0.0)
  assert_close(out, want, jnp.float32, name="out")


def test_jit_and_shapes(rng):
  routing, x, w, gates = _layout_inputs(rng, LAYOUTS[2])
  fn = jax.jit(lambda x, w, r, g: scatter_matmul(x, w, r, gates=g))
  out = fn(x, w, routing, gates)
  chex.assert_shape(out, (x.shape[0], w.shape[2]))


def test_validation_names_the_argument(rng):
  routing, x, w, gates = _layout_inputs(rng, LAYOUTS[0])
  with pytest.raises(ValueError, match="backend"):
    scatter_matmul(x, w, routing, backend="cuda")
  with pytest.raises(ValueError, match="w: contracting"):
    scatter_matmul(x, w[:, :-1], routing)
  with pytest.raises(ValueError, match="operands must share one dtype"):
    scatter_matmul(x.astype(jnp.bfloat16), w, routing)
  with pytest.raises(ValueError, match="routing"):
    scatter_matmul(x, w, tuple(routing))
  with pytest.raises(ValueError, match="x: with x_grouped"):
    scatter_matmul(x, w, routing, x_grouped=True)
  with pytest.raises(ValueError, match="gates"):
    scatter_matmul(x, w, routing, gates=gates, y_grouped=True)
  with pytest.raises(ValueError, match="gates"):
    scatter_matmul(x, w, routing, gates=gates[:, :1])
  with pytest.raises(ValueError, match="group_sizes"):
    scatter_matmul(x, w, SortedSlots(routing.sorted_flat, routing.group_sizes[:-1]))
  with pytest.raises(ValueError, match="config"):
    scatter_matmul(x, w, routing, config={"block_m": 64})
  with pytest.raises(ValueError, match="block_m"):
    scatter_triton.TritonScatterConfig(block_m=48)
  with pytest.raises(ValueError, match="expert_idx"):
    sort_slots(jnp.zeros((4,), jnp.int32), 3)


# Layout 2 (token order -> combined) runs no Mosaic path of its own: its data gradient is layout
# 1's (grouped kernels, rows put in flat order), its gate gradient the XLA code the other
# backends' tests cover. The Mosaic interpreter (with race detection) takes 10-40 s a layout.
@pytest.mark.slow
@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[1], LAYOUTS[3], LAYOUTS[4]])
def test_mosaic_interpret_grouped_products_forward_and_grads(rng, layout):
  """backend="mosaic_interpret": gathering products in the Triton scatter kernel, grouped-input
  products (forward of a grouped x, every data gradient) on the Mosaic grouped kernels, their rows
  put in flat order by a gather. bf16 operands at tile-friendly K=128, N=256 (the Mosaic tiles),
  experts 0, 2 and 5 empty."""
  choices, routing, x, w, gates = make_inputs(rng, t=40, k=2, e=6, kin=128, n=256,
                                              dtype=jnp.bfloat16, transpose_w=layout[3])
  if layout[0]:
    x = jnp.asarray(rng.standard_normal((routing.sorted_flat.shape[0], 128)), jnp.bfloat16)
  got = _call(x, w, routing, gates, layout, "mosaic_interpret", SMALL)
  chex.assert_tree_all_finite(got)
  want = _ref(x.astype(jnp.float32), w.astype(jnp.float32), routing, gates, layout)
  assert_close(got, want, jnp.bfloat16, name="out")
  _check_grads(x, w, gates, routing, layout, "mosaic_interpret", jnp.bfloat16, 1.0)


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[4]])
def test_mosaic_grouped_products_lower_for_h100(layout):
  """The mixed backend's gradient lowers for an H100: the token-order products keep the Triton
  scatter kernel, the grouped-input ones are Mosaic GPU kernels (no GPU needed)."""
  from kernels.common.gpu_lowering import lower_for_gpu

  s = jax.ShapeDtypeStruct
  t, k, e, kin, n = 300, 2, 4, 256, 512
  x_grouped, _, use_gates, transpose_w = layout

  def loss(x, w, g, choices):
    out = _call(x, w, sort_slots(choices, e), g, layout, "mosaic")
    return jnp.sum(out.astype(jnp.float32))

  x = s((t * k if x_grouped else t, kin), jnp.bfloat16)
  w = s((e, n, kin) if transpose_w else (e, kin, n), jnp.bfloat16)
  text = lower_for_gpu(jax.grad(loss, argnums=(0, 1, 2) if use_gates else (0, 1)), x, w,
                       s((t, k), jnp.float32), s((t, k), jnp.int32))
  # The kernel's name appears twice per call in the module text (as in the all-Triton lowering:
  # 4 for its forward + data gradient): here only the gathering forward of token-order x.
  assert text.count("jaxmoe_scatter2scatter") == (0 if x_grouped else 2)
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("layout", [LAYOUTS[1], LAYOUTS[2], LAYOUTS[4]])
def test_gradient_lowers_for_h100(layout):
  """The Triton kernels (gathers, scatters, gate epilogue) lower for an H100 at the default
  128x128x64 tiles, forward and backward; no GPU needed (kernels.common.gpu_lowering)."""
  from kernels.common.gpu_lowering import lower_for_gpu

  s = jax.ShapeDtypeStruct
  t, k, e, kin, n = 300, 2, 4, 256, 384
  x_grouped, _, use_gates, transpose_w = layout

  def loss(x, w, g, choices):
    routing = sort_slots(choices, e)
    out = _call(x, w, routing, g, layout, "triton")
    return jnp.sum(out.astype(jnp.float32))

  x = s((t * k if x_grouped else t, kin), jnp.bfloat16)
  w = s((e, n, kin) if transpose_w else (e, kin, n), jnp.bfloat16)
  text = lower_for_gpu(jax.grad(loss, argnums=(0, 1, 2) if use_gates else (0, 1)), x, w,
                       s((t, k), jnp.float32), s((t, k), jnp.int32))
  assert text.count("jaxmoe_scatter2scatter") >= 2   # forward and data gradient
  assert "jaxmoe_group_xty" in text                  # weight gradient


@pytest.mark.parametrize("backend", ["xla", "triton_interpret"])
@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[1]])
def test_weight_tuple_is_the_concatenated_weight(rng, layout, backend):
  """w = (w_1, w_2): the output of the weight concatenated along N, and the concatenated weight's
  gradient split back into the parts; the parts' N may differ."""
  transpose_w = layout[3]
  routing, x, w, gates = _layout_inputs(rng, layout)
  axis = 1 if transpose_w else 2
  parts = tuple(jnp.split(w, [16], axis=axis))                 # N 40 -> 16 + 24
  probe = jnp.asarray(rng.standard_normal(
      jax.eval_shape(lambda: _call(x, w, routing, gates, layout, backend, SMALL)).shape),
      jnp.float32)
  loss = lambda x, w: jnp.sum(_call(x, w, routing, gates, layout, backend, SMALL) * probe)
  got, got_grads = jax.value_and_grad(loss, argnums=(0, 1))(x, parts)
  want, want_grads = jax.value_and_grad(loss, argnums=(0, 1))(x, w)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert isinstance(got_grads[1], tuple) and len(got_grads[1]) == 2
  np.testing.assert_allclose(got_grads[0], want_grads[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jnp.concatenate(got_grads[1], axis=axis), want_grads[1], rtol=1e-5,
                             atol=1e-6)


def test_weight_tuple_keeps_the_parts_not_their_concatenation(rng):
  """The backward keeps the parts (the caller's arrays) and makes the concatenation again."""
  layout = LAYOUTS[0]
  routing, x, w, gates = _layout_inputs(rng, layout)
  parts = tuple(jnp.split(w, 2, axis=2))
  _, vjp = jax.vjp(lambda x, w: _call(x, w, routing, gates, layout, "xla"), x, parts)
  shapes = [tuple(r.shape) for r in jax.tree.leaves(vjp)]
  assert tuple(w.shape) not in shapes and tuple(parts[0].shape) in shapes


def test_weight_tuple_validation_names_the_part(rng):
  routing, x, w, gates = _layout_inputs(rng, LAYOUTS[0])
  with pytest.raises(ValueError, match="w: a tuple of weights must hold at least one"):
    scatter_matmul(x, (), routing, y_grouped=True)
  with pytest.raises(ValueError, match=r"w\[1\]: the parts of w must agree"):
    scatter_matmul(x, (w, w[:, :-1]), routing, y_grouped=True)
  with pytest.raises(ValueError, match=r"w\[1\]"):
    scatter_matmul(x, (w, w.astype(jnp.bfloat16)), routing, y_grouped=True)


@pytest.mark.parametrize("backend", ["xla", "triton_interpret"])
@pytest.mark.parametrize("layout", [LAYOUTS[2], LAYOUTS[4]])
@pytest.mark.parametrize("kin, n", [(24, 40), (40, 24)])
def test_gated_weight_gradient_scales_either_operand(rng, layout, backend, kin, n):
  """With gates the weight gradient scales the narrower of x and dy by the gates (K < N: x,
  else dy); both ways match the reference's gradients."""
  choices, routing, x, w, gates = make_inputs(rng, kin=kin, n=n, transpose_w=layout[3])
  if layout[0]:
    x = jnp.asarray(rng.standard_normal((routing.sorted_flat.shape[0], kin)), jnp.float32)
  _check_grads(x, w, gates, routing, layout, backend, jnp.float32, 1.0)
