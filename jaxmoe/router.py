"""Token routing: scores, top-k selection, auxiliary losses, and loss-free bias balancing.

Everything here is float32 whatever the compute dtype: router logits are small (T, E) tensors whose
softmax and top-k are sensitive to rounding. The logits matmul of 16-bit activations runs on bf16
tensor cores at float32 accuracy (kernels.router_logits): at Precision.HIGHEST it took ~10% of a
fine-grained layer's time.

Shapes: T tokens, E experts, k experts per token.
  route(logits (T, E), ...) -> RouterOutput(weights (T, k) f32, indices (T, k) int32, probs (T, E) f32)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from jaxmoe.config import DEFAULT_RENORMALIZE, MoEConfig
from kernels.router_logits import router_logits


class RouterOutput(NamedTuple):
  """Routing decision for T tokens.

  weights: (T, k) float32 combine weights of the chosen experts.
  indices: (T, k) int32 chosen experts, best first.
  probs: (T, E) float32 per-token probabilities over all experts, the P in the load-balancing loss
    (softmax of the logits; for the sigmoid router the scores normalized to sum 1).
  logits: (T, E) float32 raw router logits (for the z-loss).
  """

  weights: jax.Array
  indices: jax.Array
  probs: jax.Array
  logits: jax.Array


class RouterBias(nnx.Variable):
  """Per-expert selection bias of auxiliary-loss-free balancing; not a Param, so no gradient.

  Optimizers built with `nnx.Optimizer(model, tx, wrt=nnx.Param)` leave it alone; the trainer
  changes it with `MoE.update_router_bias`.
  """


def route(
    logits: jax.Array,
    top_k: int,
    router: str = "softmax_topk",
    *,
    renormalize: bool | None = None,
    selection_bias: jax.Array | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
) -> RouterOutput:
  """Chooses top_k experts per token from float32 logits (T, E).

  renormalize divides the chosen scores by their sum ("softmax_topk" and "sigmoid"; "topk_softmax"
  is normalized by construction); None takes the router's published default
  (jaxmoe.config.DEFAULT_RENORMALIZE). selection_bias (E,) is added to the scores used to *choose*
  experts only; the combine weights come from the unbiased scores (DeepSeek-V3
  auxiliary-loss-free balancing).
  """
  logits = logits.astype(jnp.float32)
  if router == "sigmoid":
    scores = jax.nn.sigmoid(logits)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  else:
    scores = jax.nn.softmax(logits, axis=-1)
    probs = scores
  # topk_softmax chooses by logits; softmax is monotone, so choosing by scores is the same set.
  choose = scores if selection_bias is None else scores + selection_bias.astype(jnp.float32)
  if n_group is not None:
    choose = _limit_to_groups(choose, n_group, topk_group)
  # kernels.top_k: a Pallas kernel on the GPU, where lax.top_k is an XLA sort many times slower
  # than reading the scores; lax.top_k elsewhere. Both choose the same experts (ties: lowest
  # index). Only the indices are used: the weights are gathered from the unbiased scores below.
  _, indices = kernels.top_k(choose, top_k)
  if router == "topk_softmax":
    weights = jax.nn.softmax(jnp.take_along_axis(logits, indices, axis=-1), axis=-1)
  else:
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if DEFAULT_RENORMALIZE[router] if renormalize is None else renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return RouterOutput(weights, indices, probs, logits)


def _limit_to_groups(choose: jax.Array, n_group: int, topk_group: int) -> jax.Array:
  """DeepSeek-V3's group-limited selection: (T, E) scores with every expert outside each token's
  topk_group best groups set to -inf. A group's score is the sum of its two best scores (its one
  score when a group holds one expert)."""
  t, e = choose.shape
  grouped = choose.reshape(t, n_group, e // n_group)
  best = jax.lax.top_k(grouped, min(2, e // n_group))[0]
  _, groups = jax.lax.top_k(jnp.sum(best, axis=-1), topk_group)             # (T, topk_group)
  keep = jnp.any(groups[:, :, None] == jnp.arange(n_group)[None, None, :], axis=1)  # (T, G)
  return jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(t, e)


def tokens_per_expert(indices: jax.Array, num_experts: int) -> jax.Array:
  """(E,) float32 count of (token, slot) assignments per expert; sums to T * k."""
  one_hot = jax.nn.one_hot(indices.reshape(-1), num_experts, dtype=jnp.float32)
  return jnp.sum(one_hot, axis=0)


def load_balancing_loss(probs: jax.Array, indices: jax.Array, num_experts: int) -> jax.Array:
  """Switch/GShard auxiliary loss  E * sum_e f_e * P_e  (float32 scalar).

  f_e = fraction of the T*k assignments that went to expert e (not differentiable),
  P_e = mean over tokens of probs[:, e]. A perfectly uniform routing gives 1, the minimum;
  all tokens on one expert with probability 1 gives E.
  """
  t, k = indices.shape
  f = tokens_per_expert(indices, num_experts) / (t * k)
  p = jnp.mean(probs.astype(jnp.float32), axis=0)
  return num_experts * jnp.sum(jax.lax.stop_gradient(f) * p)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss  mean_t logsumexp(logits_t)^2  (float32 scalar)."""
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(lse))


def _jitter_stream(rngs: nnx.Rngs) -> nnx.RngStream:
  for name in ("jitter", "default", "params"):
    if name in vars(rngs):
      return getattr(rngs, name)
  raise ValueError("rngs: MoEConfig.jitter > 0 needs an rng stream named 'jitter', 'default' or "
                   f"'params', got streams {sorted(vars(rngs))}")


class Router(nnx.Module):
  """Linear router d_model -> E in float32, with optional jitter and selection bias."""

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
    self.config = config
    init = nnx.with_partitioning(
        nnx.initializers.normal(stddev=config.d_model ** -0.5), ("embed", None), eager_sharding=False)
    # (d_model, E) float32: the router stays float32 whatever param_dtype the experts use.
    self.kernel = nnx.Param(init(rngs.params(), (config.d_model, config.num_experts), jnp.float32))
    self.bias = RouterBias(jnp.zeros((config.num_experts,), jnp.float32)) if config.bias_balancing \
        else None
    # Its own stream ("jitter", else "default", else "params") so noise does not shift parameter
    # initialization; the fallbacks let Linen users (bridge) pass only a "params" key.
    self.jitter_rngs = _jitter_stream(rngs).fork() if config.jitter > 0 else None

  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> RouterOutput:
    """x (T, d_model) any float dtype -> RouterOutput."""
    if self.jitter_rngs is not None and not deterministic:
      eps = self.config.jitter
      noise = jax.random.uniform(self.jitter_rngs(), x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
      x = x.astype(jnp.float32) * noise
    logits = router_logits(x, self.kernel[...])
    bias = None if self.bias is None else jax.lax.stop_gradient(self.bias[...])
    return route(logits, self.config.top_k, self.config.router,
                 renormalize=self.config.normalizes_weights, selection_bias=bias,
                 n_group=self.config.n_group, topk_group=self.config.topk_group)

  def update_bias(self, tokens_per_expert: jax.Array, rate: float) -> None:
    """DeepSeek-V3 update  b_e += rate * sign(mean_load - load_e)  (no gradient involved)."""
    if self.bias is None:
      raise ValueError("update_router_bias needs MoEConfig.bias_balancing=True, got False")
    load = jnp.asarray(tokens_per_expert, jnp.float32)
    if load.shape != self.bias.shape:
      raise ValueError(f"tokens_per_expert must have shape {self.bias.shape}, got {load.shape}")
    self.bias[...] = self.bias[...] + rate * jnp.sign(jnp.mean(load) - load)
