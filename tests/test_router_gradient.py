"""The task loss reaches the router: its gradient on the router kernel is nonzero and equals a
finite difference, for top-1 and top-k, in the MoE layer and in the language model.

With top_k=1 a normalized combine weight is the constant 1 (p / p), which leaves the router
learning only from the auxiliary losses; such configurations are refused. These tests leave the
auxiliary and z losses out of the loss, so only the task gradient is measured.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmoe import MoE, MoEConfig
from jaxmoe.config import ModelConfig
from jaxmoe.model import TransformerLM, cross_entropy
from jaxmoe.presets import PRESETS

D, F, E = 16, 24, 8

ROUTINGS = {
    "top1_softmax": dict(top_k=1),                                   # Switch / MegaBlocks
    "top1_sigmoid": dict(top_k=1, router="sigmoid", renormalize=False),
    "top2_softmax": dict(top_k=2),                                   # OLMoE-style, unnormalized
    "top2_renormalized": dict(top_k=2, renormalize=True),            # Mixtral
    "top2_topk_softmax": dict(top_k=2, router="topk_softmax"),
    "top3_sigmoid": dict(top_k=3, router="sigmoid"),                 # DeepSeek-V3 (normalized)
}


def _fd_vs_grad(loss_fn, routing_fn, params, eps: float = 1e-3, tries: int = 6, grads=None):
  """Directional derivative of loss_fn along a random unit direction in the router kernels:
  (autodiff, central finite difference, norm of the router gradient). `grads`: loss_fn's
  gradient at params if the caller has it (else computed here).

  A direction whose +-eps steps change any top-k choice (routing_fn differs) would put a jump
  into the difference quotient: such directions are skipped for the next seed.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  router = [any(getattr(p, "key", None) == "router" for p in path) for path, _ in leaves]
  assert any(router), "no router parameters found"
  values = [x for _, x in leaves]
  grads = jax.tree_util.tree_leaves(jax.grad(loss_fn)(params) if grads is None else grads)
  router_norm = np.sqrt(sum(float(jnp.sum(g * g)) for g, r in zip(grads, router) if r))
  base = np.asarray(routing_fn(params))
  for seed in range(tries):
    rng = np.random.default_rng(seed)
    direction = [jnp.asarray(rng.standard_normal(x.shape), x.dtype) if r else jnp.zeros_like(x)
                 for r, x in zip(router, values)]
    norm = np.sqrt(sum(float(jnp.sum(d * d)) for d in direction))
    shift = lambda s: jax.tree_util.tree_unflatten(
        treedef, [x + (s / norm) * d for x, d in zip(values, direction)])
    if not all(np.array_equal(base, np.asarray(routing_fn(shift(s)))) for s in (eps, -eps)):
      continue
    auto = sum(float(jnp.sum(g * d)) for g, d in zip(grads, direction)) / norm
    fd = (float(loss_fn(shift(eps))) - float(loss_fn(shift(-eps)))) / (2 * eps)
    return auto, fd, router_norm
  raise AssertionError(f"every one of {tries} directions changed the routing at eps={eps}")


@pytest.mark.parametrize("impl", ["grouped", "scatter", "capacity"])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_layer_task_loss_reaches_the_router(routing, impl, rng):
  cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, impl=impl, capacity_factor=2.0,
                  **ROUTINGS[routing])
  layer = MoE(cfg, rngs=nnx.Rngs(1), dtype=jnp.float32)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x = jnp.asarray(rng.standard_normal((2, 24, D)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((2, 24, D)), jnp.float32)

  def task_loss(p):  # linear in the layer's output (small float32 rounding); no aux or z loss
    y, _ = nnx.merge(graphdef, p, rest)(x)
    return jnp.sum(y * r)

  def routing(p):
    return nnx.merge(graphdef, p, rest).router(x.reshape(-1, D)).indices

  auto, fd, router_norm = _fd_vs_grad(jax.jit(task_loss), jax.jit(routing), params)
  assert router_norm > 1e-2, f"the task loss does not reach the router (|grad| = {router_norm:.2e})"
  np.testing.assert_allclose(auto, fd, rtol=3e-2)


@pytest.mark.slow
@pytest.mark.parametrize("routing", ["top1_softmax", "top2_renormalized"])
def test_model_task_loss_reaches_every_router(routing, rng):
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                    max_seq_len=16, num_experts=4, dtype="float32",
                    **{k: v for k, v in ROUTINGS[routing].items()})
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jnp.asarray(rng.integers(0, 64, (4, 16)), jnp.int32)

  def task_loss(p):  # the language-model loss alone
    logits, _ = nnx.merge(graphdef, p, rest)(tokens)
    return cross_entropy(logits[:, :-1], tokens[:, 1:])

  grads = jax.jit(jax.grad(task_loss))(params)
  per_layer = [float(jnp.linalg.norm(g)) for path, g in
               jax.tree_util.tree_flatten_with_path(grads)[0]
               if any(getattr(p, "key", None) == "router" for p in path)]
  assert len(per_layer) == cfg.num_moe_layers
  assert min(per_layer) > 1e-4, f"router gradient norms per layer: {per_layer}"
  def routing(p):  # expert loads per layer: a changed top-k choice changes them
    return nnx.merge(graphdef, p, rest)(tokens)[1]["tokens_per_expert"]

  auto, fd, _ = _fd_vs_grad(jax.jit(task_loss), jax.jit(routing), params, eps=3e-3, grads=grads)
  np.testing.assert_allclose(auto, fd, rtol=3e-2)


@pytest.mark.parametrize("kwargs,named", [
    (dict(top_k=1, renormalize=True), "renormalize=True"),
    (dict(top_k=1, router="topk_softmax"), "router='topk_softmax'"),
    (dict(top_k=1, router="sigmoid"), "renormalize=None"),
])
def test_constant_combine_weight_is_refused(kwargs, named):
  with pytest.raises(ValueError, match="top_k=1") as e:
    MoEConfig(d_model=D, d_ff=F, num_experts=E, **kwargs)
  assert named in str(e.value) and "constant 1" in str(e.value)
  with pytest.raises(ValueError, match="top_k=1"):
    ModelConfig(num_experts=E, **kwargs)


def test_renormalize_defaults_follow_the_published_routers():
  cfg = lambda **kw: MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=2, **kw)
  assert not cfg().normalizes_weights                      # Switch, MegaBlocks, OLMoE
  assert cfg(router="sigmoid").normalizes_weights          # DeepSeek-V3
  assert cfg(router="topk_softmax").normalizes_weights     # Mixtral
  assert not cfg(router="sigmoid", renormalize=False).normalizes_weights
  with pytest.raises(ValueError, match="renormalize=False cannot apply"):
    cfg(router="topk_softmax", renormalize=False)
  with pytest.raises(ValueError, match="MoEConfig.renormalize must be"):
    cfg(renormalize="false")


def test_every_moe_preset_states_its_routing():
  for name, preset in PRESETS.items():
    model = preset["model"]
    if model.get("ffn", "moe") == "moe":
      assert "router" in model and "renormalize" in model, name
      cfg = ModelConfig.from_dict(model)
      assert cfg.top_k > 1 or not cfg.moe_config().normalizes_weights, name


def test_saved_config_without_routing_fields_keeps_its_old_weights():
  """A checkpoint saved before routing became explicit renormalized its top-k weights."""
  saved = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
               num_experts=4, top_k=2)
  assert ModelConfig.from_saved(saved).renormalize is True
  with pytest.raises(ValueError, match="predates"):
    ModelConfig.from_saved({**saved, "top_k": 1})
