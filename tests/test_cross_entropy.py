"""kernels.cross_entropy: float32 math on the logits' own dtype, a one-pass backward; the LM head
fused with the loss (linear_cross_entropy): the logits path's values and gradients, chunk by chunk,
keeping no logits."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmoe.parallel import hlo_collectives
from kernels.cross_entropy import cross_entropy, cross_entropy_reference, linear_cross_entropy


def _case(rng, dtype, shape=(3, 17), vocab=301, scale=4.0):
  logits = jnp.asarray(rng.standard_normal((*shape, vocab)) * scale, dtype)
  targets = jnp.asarray(rng.integers(0, vocab, shape), jnp.int32)
  return logits, targets


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_match_autodiff(rng, dtype):
  logits, targets = _case(rng, dtype)
  g = jnp.asarray(rng.standard_normal(targets.shape), jnp.float32)
  y, vjp = jax.vjp(lambda l: cross_entropy(l, targets), logits)
  y0, vjp0 = jax.vjp(lambda l: cross_entropy_reference(l, targets), logits)
  assert y.dtype == jnp.float32 and y.shape == targets.shape
  np.testing.assert_allclose(y, y0, rtol=1e-6, atol=1e-5)
  (d,), (d0,) = vjp(g), vjp0(g)
  assert d.dtype == dtype
  # The reference's cotangent is float32 until its final cast: the same float32 math, so equal
  # up to float32 rounding, and then to one rounding in the logits' dtype.
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(d, np.float32), np.asarray(d0, np.float32), rtol=tol,
                             atol=tol)


def test_mean_loss_gradient_against_numpy(rng):
  """The gradient of the mean loss is (softmax - onehot) / N, computed here in float64."""
  logits, targets = _case(rng, jnp.float32, shape=(5,), vocab=11, scale=2.0)
  grad = jax.jit(jax.grad(lambda l: jnp.mean(cross_entropy(l, targets))))(logits)
  x = np.asarray(logits, np.float64)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  p[np.arange(5), np.asarray(targets)] -= 1.0
  np.testing.assert_allclose(grad, p / 5, rtol=1e-5, atol=1e-7)


def test_large_logits_do_not_overflow(rng):
  logits = jnp.asarray([[1e4, 0.0, -1e4], [3e4, 3e4, 0.0]], jnp.bfloat16)
  targets = jnp.asarray([0, 2], jnp.int32)
  y = cross_entropy(logits, targets)
  chex.assert_tree_all_finite(y)
  big = float(logits[1, 0])   # 3e4 rounded to bf16
  np.testing.assert_allclose(y, [0.0, big + np.log(2.0)], rtol=1e-6)


def test_infinite_and_nan_logits_as_logsumexp_gives_them(rng):
  """The one-read log-sum-exp merges (max, sum) pairs; where a row's max is +-inf (or NaN) it must
  give what jax.nn.logsumexp gives: a row of -inf -> -inf, a +inf entry -> +inf, a NaN -> NaN."""
  logits = jnp.asarray(rng.standard_normal((5, 7)), jnp.float32)
  logits = logits.at[0].set(-jnp.inf).at[1, 3].set(jnp.inf).at[2, 4].set(jnp.nan)
  logits = logits.at[3, :6].set(-jnp.inf)    # one finite entry: exactly that entry
  targets = jnp.asarray([0, 0, 0, 6, 1], jnp.int32)
  want = jax.nn.logsumexp(logits, axis=-1) - logits[jnp.arange(5), targets]
  got = cross_entropy(logits, targets)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  ok = ~np.isnan(want)
  np.testing.assert_allclose(np.asarray(got)[ok], np.asarray(want)[ok], rtol=1e-6)
  assert float(got[3]) == 0.0


def test_keeps_no_float32_copy_of_the_logits(rng):
  """The backward pass keeps the bf16 logits and a per-token vector, not float32 logits."""
  logits, targets = _case(rng, jnp.bfloat16)
  _, vjp = jax.vjp(lambda l: cross_entropy(l, targets), logits)
  _, vjp0 = jax.vjp(lambda l: cross_entropy_reference(l, targets), logits)
  f32 = lambda f: [r for r in jax.tree.leaves(f) if getattr(r, "dtype", None) == jnp.float32
                   and r.shape == logits.shape]
  assert not f32(vjp)
  assert f32(vjp0)   # what autodiff alone keeps (so this test can tell them apart)


def test_out_of_range_targets_give_nan(rng):
  logits, _ = _case(rng, jnp.float32, shape=(2,), vocab=7)
  y = cross_entropy(logits, jnp.asarray([3, 7], jnp.int32))
  assert np.isfinite(y[0]) and np.isnan(y[1])


@pytest.mark.parametrize("logits,targets,match", [
    (np.zeros((2, 5), np.int32), np.zeros((2,), np.int32), "logits"),
    (np.zeros((2, 5), np.float32), np.zeros((2,), np.float32), "targets"),
    (np.zeros((2, 5), np.float32), np.zeros((3,), np.int32), "targets"),
])
def test_bad_input_names_the_argument(logits, targets, match):
  with pytest.raises(ValueError, match=match):
    cross_entropy(jnp.asarray(logits), jnp.asarray(targets))


def _head_case(rng, dtype, b=3, t=10, d=24, v=97):
  x = jnp.asarray(rng.standard_normal((b, t, d)), dtype)
  w = jnp.asarray(rng.standard_normal((d, v)) * 0.5, dtype)
  y = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  return x, w, y


def _logits_path(x, w, y):
  """The unfused form: the head's logits in x's dtype, then the mean loss."""
  logits = jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
  return jnp.mean(cross_entropy(logits, y))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_chunks", [1, 3, 10])   # 3 does not divide T = 10: a padded piece
def test_linear_cross_entropy_matches_the_logits_path(rng, dtype, num_chunks):
  x, w, y = _head_case(rng, dtype)
  scale = 2.5   # a cotangent other than 1 reaches both gradients
  f = jax.jit(jax.value_and_grad(lambda x, w: scale * linear_cross_entropy(
      x, w, y, num_chunks=num_chunks), argnums=(0, 1)))
  g = jax.jit(jax.value_and_grad(lambda x, w: scale * _logits_path(x, w, y), argnums=(0, 1)))
  (l1, (dx1, dw1)), (l0, (dx0, dw0)) = f(x, w), g(x, w)
  assert l1.dtype == jnp.float32 and dx1.dtype == dtype and dw1.dtype == dtype
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  # float32: the same math. bf16: dlogits are rounded before the cotangent's scale, which the
  # logits path folds in first, and dw is summed over chunks in float32 before its one rounding:
  # sums over V with cancellation then differ by a few units of the largest terms.
  for got, want in ((dx1, dx0), (dw1, dw0)):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if dtype == jnp.float32:
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    else:
      np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
  # Not differentiated: the loss alone, chunk by chunk.
  np.testing.assert_allclose(jax.jit(lambda x, w: linear_cross_entropy(
      x, w, y, num_chunks=num_chunks))(x, w), l0 / scale, rtol=1e-6)


def _while_bodies_and_all_reduces(hlo: str) -> tuple[set, list]:
  """The while loops' body computations, and the computation each all-reduce sits in."""
  bodies = set(re.findall(r" while\(.*?body=(%[\w.\-]+)", hlo))
  return bodies, [c["computation"] for c in hlo_collectives(hlo) if c["op"] == "all-reduce"]


def test_linear_cross_entropy_on_a_data_parallel_mesh_sums_dw_once(rng):
  """The batch split over 4 devices: with batch_shards=4 the head's gradient is summed across
  them by all-reduces outside the chunk loop (with 1, one sits inside it, run in every chunk);
  the values equal the single-device ones."""
  x, w, y = _head_case(rng, jnp.float32, b=8, t=12)
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))   # noqa: E731
  xs, ws, ys = put(x, P("data")), put(w, P()), put(y, P("data"))
  want = jax.value_and_grad(lambda x, w: linear_cross_entropy(x, w, y, num_chunks=3),
                            argnums=(0, 1))(x, w)
  for shards in (1, 4):
    f = jax.jit(jax.value_and_grad(lambda x, w, y: linear_cross_entropy(
        x, w, y, num_chunks=3, batch_shards=shards), argnums=(0, 1)))
    bodies, where = _while_bodies_and_all_reduces(f.lower(xs, ws, ys).compile().as_text())
    assert bodies and where, (bodies, where)
    assert any(c in bodies for c in where) == (shards == 1), (shards, bodies, where)
    chex.assert_trees_all_close(f(xs, ws, ys), want, rtol=1e-5, atol=1e-7)


def test_linear_cross_entropy_keeps_no_logits(rng):
  """The VJP keeps dx and dw, nothing (B, T, V)-sized; the logits path keeps the logits."""
  x, w, y = _head_case(rng, jnp.bfloat16, v=301)
  big = lambda vjp: [r.shape for r in jax.tree.leaves(vjp) if hasattr(r, "shape")
                     and np.prod(r.shape) >= x.shape[0] * x.shape[1] * w.shape[1]]
  assert not big(jax.vjp(lambda x, w: linear_cross_entropy(x, w, y, num_chunks=2), x, w)[1])
  assert big(jax.vjp(lambda x, w: _logits_path(x, w, y), x, w)[1])


def test_linear_cross_entropy_out_of_range_target_gives_nan(rng):
  x, w, y = _head_case(rng, jnp.float32, v=7)
  y = y.at[0, 0].set(7)
  assert np.isnan(linear_cross_entropy(x, w, y, num_chunks=2))


@pytest.mark.parametrize("kw, match", [
    (dict(num_chunks=0), "num_chunks: must be a positive int"),
    (dict(batch_shards=2), r"batch_shards: must divide B = 3, got 2"),
    (dict(batch_shards=True), "batch_shards: must be a positive int"),
    (dict(num_chunks=11), r"num_chunks: must be at most T = 10"),
    (dict(x=np.zeros((3, 10), np.float32)), r"x: must be a non-empty floating \(B, T, D\)"),
    (dict(w=np.zeros((23, 97), np.float32)), r"w: must be a \(D=24, V\) array"),
    (dict(w=np.zeros((24, 97), np.float16)), r"w: must be a \(D=24, V\) array of x's dtype"),
    (dict(y=np.zeros((3, 9), np.int32)), r"targets: must be an integer array of shape \(B, T\)"),
])
def test_linear_cross_entropy_bad_input_names_the_argument(rng, kw, match):
  x, w, y = _head_case(rng, jnp.float32)
  args = dict(x=x, w=w, y=y, num_chunks=2, batch_shards=1)
  args.update({k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()})
  with pytest.raises(ValueError, match=match):
    linear_cross_entropy(args["x"], args["w"], args["y"], num_chunks=args["num_chunks"],
                         batch_shards=args["batch_shards"])
