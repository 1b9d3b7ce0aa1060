"""Router: score functions, top-k, auxiliary losses on hand-built routings, loss-free bias, config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_close
from jaxmoe import MoE, MoEConfig, RouterBias
from jaxmoe import router as R


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


@pytest.fixture
def logits(rng):
  return rng.standard_normal((7, 5)).astype(np.float32)


def test_softmax_topk(logits):
  out = R.route(jnp.asarray(logits), 2, "softmax_topk", renormalize=False)
  p = _softmax(logits.astype(np.float64))
  want_idx = np.argsort(-p, axis=-1)[:, :2]
  np.testing.assert_array_equal(out.indices, want_idx)
  assert_close(out.weights, np.take_along_axis(p, want_idx, -1), np.float32, name="weights")
  assert_close(out.probs, p, np.float32, name="probs")
  assert out.weights.dtype == jnp.float32 and out.indices.dtype == jnp.int32


def test_topk_softmax_equals_renormalized_softmax_topk(logits):
  a = R.route(jnp.asarray(logits), 3, "topk_softmax")
  b = R.route(jnp.asarray(logits), 3, "softmax_topk", renormalize=True)
  np.testing.assert_array_equal(a.indices, b.indices)
  assert_close(a.weights, b.weights, np.float32)
  # Mixtral's form computed directly: softmax over the k largest logits.
  top = -np.sort(-logits, axis=-1)[:, :3]
  assert_close(a.weights, _softmax(top.astype(np.float64)), np.float32)


def test_sigmoid_router(logits):
  out = R.route(jnp.asarray(logits), 2, "sigmoid")
  s = 1 / (1 + np.exp(-logits.astype(np.float64)))
  idx = np.argsort(-s, axis=-1)[:, :2]
  np.testing.assert_array_equal(out.indices, idx)
  w = np.take_along_axis(s, idx, -1)
  assert_close(out.weights, w / w.sum(-1, keepdims=True), np.float32)
  assert_close(out.probs, s / s.sum(-1, keepdims=True), np.float32)


def test_selection_bias_changes_choice_not_weights():
  logits = jnp.array([[2.0, 1.0, 0.0]])
  bias = jnp.array([0.0, 0.0, 10.0])
  out = R.route(logits, 1, "softmax_topk", renormalize=False, selection_bias=bias)
  assert int(out.indices[0, 0]) == 2
  p = _softmax(np.array([[2.0, 1.0, 0.0]]))
  np.testing.assert_allclose(out.weights[0, 0], p[0, 2], rtol=1e-6)


def test_load_balancing_loss_hand_built():
  # 4 tokens, 2 experts, top-1: expert 0 gets 3 tokens, expert 1 one.
  probs = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
  idx = jnp.array([[0], [0], [0], [1]])
  f = np.array([0.75, 0.25])
  p = np.array([0.65, 0.35])
  np.testing.assert_allclose(R.load_balancing_loss(probs, idx, 2), 2 * np.sum(f * p), rtol=1e-6)
  # Top-2 over 3 experts, fractions of the T*k assignments.
  probs3 = jnp.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
  idx3 = jnp.array([[0, 1], [1, 2]])
  f3 = np.array([1, 2, 1]) / 4
  p3 = np.array([0.3, 0.45, 0.25])
  np.testing.assert_allclose(R.load_balancing_loss(probs3, idx3, 3), 3 * np.sum(f3 * p3), rtol=1e-6)


def test_load_balancing_loss_extremes():
  e = 4
  uniform = jnp.full((8, e), 1 / e)
  balanced_idx = jnp.arange(8)[:, None] % e
  np.testing.assert_allclose(R.load_balancing_loss(uniform, balanced_idx, e), 1.0, rtol=1e-6)
  collapsed = jax.nn.one_hot(jnp.zeros(8, jnp.int32), e)
  np.testing.assert_allclose(R.load_balancing_loss(collapsed, jnp.zeros((8, 1), jnp.int32), e),
                             float(e), rtol=1e-6)


def test_load_balancing_loss_gradient_flows_through_probs_only():
  probs = jnp.array([[0.9, 0.1], [0.8, 0.2]])
  idx = jnp.array([[0], [1]])
  g = jax.grad(R.load_balancing_loss)(probs, idx, 2)
  # d/dP_{t,e} = E * f_e / T  with f = (0.5, 0.5).
  np.testing.assert_allclose(g, np.full((2, 2), 2 * 0.5 / 2), rtol=1e-6)


def test_z_loss(logits):
  z = logits.astype(np.float64)
  lse = np.log(np.exp(z).sum(-1))
  np.testing.assert_allclose(R.router_z_loss(jnp.asarray(logits)), np.mean(lse ** 2), rtol=1e-5)


def test_tokens_per_expert():
  idx = jnp.array([[0, 2], [2, 1], [2, 0]])
  np.testing.assert_array_equal(R.tokens_per_expert(idx, 4), [2, 1, 3, 0])


def test_router_logits_float32_under_bf16():
  cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2)
  layer = MoE(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert layer.router.kernel[...].dtype == jnp.float32
  out = layer.router(jnp.ones((3, 8), jnp.bfloat16))
  assert out.logits.dtype == jnp.float32 and out.weights.dtype == jnp.float32


def test_jitter_only_at_train_time(rng):
  cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2, jitter=0.5)
  layer = MoE(cfg, rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.standard_normal((6, 8)), jnp.float32)
  a = layer.router(x, deterministic=True).logits
  b = layer.router(x, deterministic=True).logits
  c = layer.router(x, deterministic=False).logits
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  # Noise is multiplicative per input feature, n in [1 - eps, 1 + eps]:
  # |sum_i x_i n_i w_ij - sum_i x_i w_ij| <= eps * sum_i |x_i w_ij|.
  xn, w = np.asarray(x, np.float64), np.asarray(layer.router.kernel[...], np.float64)
  bound = 0.5 * (np.abs(xn) @ np.abs(w))
  assert np.all(np.abs(np.asarray(c) - xn @ w) <= bound + 1e-5)


def test_bias_balancing_update_and_no_gradient(rng):
  cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=1, bias_balancing=True)
  layer = MoE(cfg, rngs=nnx.Rngs(0))
  assert isinstance(layer.router.bias, RouterBias)
  assert not isinstance(layer.router.bias, nnx.Param)
  layer.update_router_bias(jnp.array([5.0, 1.0, 3.0, 3.0]), 0.25)
  np.testing.assert_array_equal(layer.router.bias[...], [-0.25, 0.25, 0.0, 0.0])
  # The bias is not a Param: gradients w.r.t. Params do not include it.
  x = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)
  grads = nnx.grad(lambda m: jnp.sum(m(x)[0]))(layer)
  assert "bias" not in grads["router"]
  # A large bias steers every token to its expert.
  layer.router.bias[...] = jnp.array([0.0, 0.0, 100.0, 0.0])
  _, stats = layer(x)
  np.testing.assert_array_equal(stats.tokens_per_expert, [0, 0, 5, 0])


def test_update_router_bias_needs_bias_balancing():
  layer = MoE(MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="bias_balancing"):
    layer.update_router_bias(jnp.ones(4), 0.1)


@pytest.mark.parametrize("field,value", [
    ("top_k", 0), ("top_k", 5), ("d_model", 0), ("d_ff", -3), ("num_experts", 0),
    ("impl", "magic"), ("activation", "tanh"), ("router", "hash"), ("capacity_factor", 0.0),
    ("jitter", 1.5), ("num_shared_experts", -1), ("aux_loss_weight", -1.0), ("backend", "cuda"), ("block_size", 0),
])
def test_config_validation_names_field(field, value):
  kwargs = dict(d_model=8, d_ff=16, num_experts=4, top_k=2)
  kwargs[field] = value
  with pytest.raises(ValueError, match=field):
    MoEConfig(**kwargs)


def _grouped_reference(scores, k, n_group, topk_group):
  """DeepSeek-V3 group-limited top-k in numpy: a group scores the sum of its two best."""
  t, e = scores.shape
  g = scores.reshape(t, n_group, e // n_group)
  group_score = np.sort(g, -1)[..., -2:].sum(-1)
  best_groups = np.argsort(-group_score, -1, kind="stable")[:, :topk_group]
  masked = np.full_like(scores, -np.inf).reshape(t, n_group, -1)
  for row in range(t):
    masked[row, best_groups[row]] = g[row, best_groups[row]]
  return np.argsort(-masked.reshape(t, e), -1, kind="stable")[:, :k]


@pytest.mark.parametrize("router", ["sigmoid", "softmax_topk"])
def test_group_limited_routing(router, rng):
  logits = rng.standard_normal((64, 16)).astype(np.float32)
  out = R.route(jnp.asarray(logits), 4, router, n_group=4, topk_group=2)
  scores = np.asarray(jax.nn.sigmoid(logits) if router == "sigmoid" else jax.nn.softmax(logits))
  want = _grouped_reference(scores, 4, 4, 2)
  np.testing.assert_array_equal(np.sort(np.asarray(out.indices), -1), np.sort(want, -1))
  # Every chosen expert lies in at most topk_group groups.
  assert max(len(set(row // 4)) for row in np.asarray(out.indices)) <= 2
  # Without the limit the choice differs on some tokens (the test would catch a no-op).
  free = R.route(jnp.asarray(logits), 4, router)
  assert not np.array_equal(np.sort(np.asarray(free.indices), -1), np.sort(want, -1))


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_group=4), "go together"), (dict(n_group=3, topk_group=1), "must divide"),
    (dict(n_group=4, topk_group=5), "topk_group=5 must be <="),
    (dict(n_group=8, topk_group=1), "fewer than top_k"),
])
def test_group_limited_routing_config_is_checked(kwargs, match):
  with pytest.raises(ValueError, match=match):
    MoEConfig(d_model=8, d_ff=16, num_experts=16, top_k=4, router="sigmoid", **kwargs)
