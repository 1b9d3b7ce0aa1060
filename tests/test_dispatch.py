"""jaxmoe.dispatch: the expert sort and its gathers, with gradients that avoid scatter-adds."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import dispatch


def _setup(rng, t=37, k=3, e=5, d=16, dtype=jnp.float32):
  indices = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]), jnp.int32)
  x = jnp.asarray(rng.standard_normal((t, d)), dtype)
  return dispatch.sort_by_expert(indices, e), x


def _primitives(jaxpr) -> set[str]:
  names = set()
  for q in jaxpr.eqns:
    names.add(q.primitive.name)
    for v in q.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          names |= _primitives(sub)
  return names


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gather_sorted_gradient_equals_takes_without_a_scatter_add(rng, dtype):
  disp, x = _setup(rng, dtype=dtype)
  probe = jnp.asarray(rng.standard_normal((disp.order.shape[0], x.shape[1])), jnp.float32)

  def loss(gather, x):
    return jnp.sum(gather(x).astype(jnp.float32) * probe)

  ours = lambda x: dispatch.gather_sorted(x, disp)
  plain = lambda x: jnp.take(x, disp.token, axis=0)
  chex.assert_trees_all_equal(ours(x), plain(x))
  got = jax.grad(lambda x: loss(ours, x))(x)
  want = jax.grad(lambda x: loss(plain, x.astype(jnp.float32)))(x)
  assert got.dtype == x.dtype
  # bf16: the k = 3 rows' cotangents arrive rounded to bf16 (values up to ~4, ulp 2^-6 there).
  tol = 1e-6 if dtype == jnp.float32 else 4e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=tol, atol=tol)
  grad_jaxpr = jax.make_jaxpr(jax.grad(lambda x: loss(ours, x)))(x).jaxpr
  assert "scatter-add" not in _primitives(grad_jaxpr)
  assert "scatter-add" in _primitives(jax.make_jaxpr(jax.grad(lambda x: loss(plain, x)))(x).jaxpr)


def test_combine_sorted_is_the_gate_weighted_sum_and_differentiates(rng):
  disp, x = _setup(rng)
  t, k = x.shape[0], disp.order.shape[0] // x.shape[0]
  y_sorted = dispatch.gather_sorted(x, disp) * 2.0 + 1.0
  w = jnp.asarray(rng.random((t, k)), jnp.float32)
  out = dispatch.combine_sorted(y_sorted, disp, w)
  np.testing.assert_allclose(out, (2.0 * x + 1.0) * w.sum(1, keepdims=True), rtol=1e-6, atol=1e-6)
  g = jax.grad(lambda ys: jnp.sum(dispatch.combine_sorted(ys, disp, w)))(y_sorted)
  # Sorted row p is slot (token[p], j): its gradient is that slot's gate weight.
  slot_w = w.reshape(-1)[disp.order]
  np.testing.assert_allclose(g, jnp.broadcast_to(slot_w[:, None], g.shape), rtol=1e-6)


def test_gather_sorted_under_jit_and_remat(rng):
  disp, x = _setup(rng)
  f = jax.jit(jax.grad(lambda x: jnp.sum(jax.checkpoint(
      lambda x: dispatch.gather_sorted(x, disp))(x) ** 2)))
  want = jax.grad(lambda x: jnp.sum(jnp.take(x, disp.token, axis=0) ** 2))(x)
  np.testing.assert_allclose(f(x), want, rtol=1e-6)


def test_inverse_permutation(rng):
  from kernels.common.groups import inverse_permutation

  perm = jnp.asarray(rng.permutation(11), jnp.int32)
  inv = inverse_permutation(perm)
  np.testing.assert_array_equal(np.asarray(inv)[np.asarray(perm)], np.arange(11))
  with pytest.raises(ValueError, match="perm must be a 1-D integer array"):
    inverse_permutation(jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="perm"):
    inverse_permutation(jnp.zeros((3,), jnp.float32))
