"""kernels.cross_entropy: float32 math on the logits' own dtype, a one-pass backward."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.cross_entropy import cross_entropy, cross_entropy_reference


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
