"""Mixture-of-Attention: impls against a dense per-expert reference, causality, grads, bf16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_close
from jaxmoe.moa import MOA_IMPLS, MoA, MoAConfig

CFG = MoAConfig(d_model=16, num_heads=2, head_dim=8, num_experts=4, top_k=2)


def dense_reference(layer: MoA, x: jax.Array) -> jax.Array:
  """Every expert's attention for every token in float64 numpy, weighted by the router."""
  cfg = layer.config
  b, s, d = x.shape
  h, dh = cfg.num_heads, cfg.head_dim
  xs = np.asarray(x, np.float64).reshape(b * s, d)
  r = layer.router(jnp.asarray(x).reshape(b * s, d))
  idx, wts = np.asarray(r.indices), np.asarray(r.weights, np.float64)
  p = lambda v: np.asarray(v[...], np.float64)
  keys = (xs @ p(layer.w_k)).reshape(b, s, h, dh)
  vals = (xs @ p(layer.w_v)).reshape(b, s, h, dh)
  mask = np.tril(np.ones((s, s), bool))
  y = np.zeros_like(xs)
  for e in range(cfg.num_experts):
    q = (xs @ p(layer.w_q)[e]).reshape(b, s, h, dh)
    sc = np.einsum("bqhd,bshd->bhqs", q, keys) / np.sqrt(dh)
    sc = np.where(mask, sc, -np.inf)
    pr = np.exp(sc - sc.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    o = np.einsum("bhqs,bshd->bqhd", pr, vals).reshape(b * s, h * dh)
    coef = np.sum(np.where(idx == e, wts, 0.0), axis=1)
    y += coef[:, None] * (o @ p(layer.w_o)[e])
  return y.reshape(b, s, d)


def test_moa_matches_reference_and_impls_agree(rng):
  layer = MoA(CFG, rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32)
  g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  want = dense_reference(layer, x)
  grads = {}
  for impl in MOA_IMPLS:
    y, stats = layer(x, impl=impl)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, want, np.float32, factor=3, name=impl)
    np.testing.assert_allclose(np.sum(stats.tokens_per_expert), 14 * 2)
    grads[impl] = nnx.grad(lambda m, x: jnp.sum(m(x, impl=impl)[0] * g), argnums=(0, 1))(layer, x)
  gm1, gx1 = grads["ragged_dot"]
  for impl in ("scatter", "grouped"):
    gm0, gx0 = grads[impl]
    assert_close(gx0, gx1, np.float32, factor=3, name=f"{impl} dx")
    for name in ("w_q", "w_o", "w_k", "w_v"):
      assert np.any(np.asarray(gm0[name][...]) != 0)
      assert_close(gm0[name][...], gm1[name][...], np.float32, factor=3, name=f"{impl} {name}")
    assert_close(gm0["router"]["kernel"][...], gm1["router"]["kernel"][...], np.float32, factor=3,
                 name=f"{impl} router")


def test_moa_scatter_triton_interpret(rng):
  """The scatter MoA through the Pallas Triton kernels in interpret mode."""
  cfg = MoAConfig(d_model=16, num_heads=2, head_dim=16, num_experts=4, top_k=2,
                  backend="triton_interpret")
  layer = MoA(cfg, rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.standard_normal((1, 5, 16)), jnp.float32)
  assert_close(layer(x)[0], dense_reference(layer, x), np.float32, factor=3)


def test_moa_is_causal(rng):
  layer = MoA(CFG, rngs=nnx.Rngs(1))
  x = jnp.asarray(rng.standard_normal((1, 8, 16)), jnp.float32)
  x2 = x.at[:, 5:].set(jnp.asarray(rng.standard_normal((1, 3, 16)), jnp.float32))
  y, _ = nnx.jit(lambda m, x: m(x))(layer, x)
  y2, _ = layer(x2)
  np.testing.assert_allclose(y[:, :5], y2[:, :5], rtol=1e-5, atol=1e-6)
  assert not np.allclose(y[:, 5:], y2[:, 5:])


def test_moa_bf16(rng):
  layer = MoA(CFG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  x = jnp.asarray(rng.standard_normal((2, 6, 16)), jnp.float32).astype(jnp.bfloat16)
  y, _ = layer(x)
  assert y.dtype == jnp.bfloat16
  assert_close(y, dense_reference(layer, x.astype(jnp.float32)), jnp.bfloat16, factor=2)


def test_moa_config_validation():
  with pytest.raises(ValueError, match="num_heads"):
    MoAConfig(d_model=16, num_heads=0, head_dim=8, num_experts=4)
  with pytest.raises(ValueError, match="MoAConfig.top_k"):
    MoAConfig(d_model=16, num_heads=2, head_dim=8, num_experts=4, top_k=5)
  with pytest.raises(ValueError, match="impl"):
    MoAConfig(d_model=16, num_heads=2, head_dim=8, num_experts=4, impl="capacity")
  with pytest.raises(ValueError, match="impl"):
    MoA(CFG, rngs=nnx.Rngs(0))(jnp.ones((1, 3, 16)), impl="blocksparse")
  with pytest.raises(ValueError, match="B, S"):
    MoA(CFG, rngs=nnx.Rngs(0))(jnp.ones((3, 16)))
