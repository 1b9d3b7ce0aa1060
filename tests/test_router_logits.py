"""kernels.router_logits: float32 logits from 16-bit activations on bf16 matmuls, against the
float32 Precision.HIGHEST product, forward and both gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.router_logits import router_logits, split_bf16


def _highest(x, w):
  return jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_split_bf16_is_exact():
  a = jax.random.normal(jax.random.key(0), (4096,)) * jnp.logspace(-6, 6, 4096)
  parts = split_bf16(a, 3)
  assert all(p.dtype == jnp.bfloat16 for p in parts)
  np.testing.assert_array_equal(np.asarray(sum(p.astype(jnp.float32) for p in parts)),
                                np.asarray(a))
  # Two parts are not exact: the third carries real bits.
  assert float(jnp.max(jnp.abs(parts[2].astype(jnp.float32)))) > 0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_matches_float32_product_and_gradients(dtype):
  kx, kw, kd = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (300, 96)).astype(dtype)
  w = jax.random.normal(kw, (96, 24)) * 0.1
  dl = jax.random.normal(kd, (300, 24))
  # float32 rounding of a 96-term sum, not bf16's 2^-8.
  assert _rel(router_logits(x, w), _highest(x, w)) < 4e-6
  dx, dw = jax.grad(lambda x, w: jnp.sum(router_logits(x, w) * dl), (0, 1))(x, w)
  rx, rw = jax.grad(lambda x, w: jnp.sum(_highest(x, w) * dl), (0, 1))(x, w)
  assert dw.dtype == jnp.float32 and dx.dtype == dtype
  assert _rel(dw, rw) < 4e-6
  # dx is rounded to x's dtype: one unit in its last place apart from the reference, plus the
  # 2^-16-relative error of the three part products (relative to the terms, so to the row scale).
  ulp = 2.0 ** -7 if dtype == jnp.bfloat16 else 2.0 ** -10
  want = np.asarray(rx, np.float64)
  err = np.abs(np.asarray(dx, np.float64) - want)
  assert np.all(err <= ulp * np.abs(want) + 1e-4 * np.max(np.abs(want)))


def test_float32_x_is_the_highest_product():
  x = jax.random.normal(jax.random.key(2), (64, 32))
  w = jax.random.normal(jax.random.key(3), (32, 8))
  np.testing.assert_array_equal(np.asarray(router_logits(x, w)), np.asarray(_highest(x, w)))


@pytest.mark.parametrize("x_shape,w_shape,w_dtype,match", [
    ((8, 4), (5, 3), jnp.float32, "w must be float32 of shape"),
    ((8, 4), (4, 3), jnp.bfloat16, "w must be float32"),
    ((2, 8, 4), (4, 3), jnp.float32, "x must be a 2-D floating array"),
])
def test_bad_inputs(x_shape, w_shape, w_dtype, match):
  with pytest.raises(ValueError, match=match):
    router_logits(jnp.ones(x_shape, jnp.bfloat16), jnp.ones(w_shape, w_dtype))


def test_split_bf16_needs_a_part():
  with pytest.raises(ValueError, match="parts must be >= 1, got 0"):
    split_bf16(jnp.ones(3), 0)
