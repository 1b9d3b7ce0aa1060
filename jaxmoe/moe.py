"""The `MoE` Flax NNX layer: router + routed experts (+ shared experts), one `impl` switch.

  layer = MoE(MoEConfig(...), rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
  y, stats = layer(x, deterministic=False)      # x (..., d_model) -> y same shape and dtype

impl (MoEConfig.impl, or the `impl=` call argument to run the same parameters another way):
  "grouped":    sort assignments by expert, gather, kernels.grouped_matmul MLP/GLU, unsort, combine.
  "ragged_dot": the same pipeline with jax.lax.ragged_dot (XLA's own grouped matmul).
  "scatter":    ScatterMoE (kernels.scatter.scatter_glu/scatter_mlp): the first product
                gathers token rows and the last scatters + gate-combines inside the kernel.
  "blocksparse": MegaBlocks dMoE (kernels.blocksparse.dmoe_mlp): pad each expert to block_size,
                block-sparse sdd/dsd products over a topology built from the routing.
  "capacity":   token dropping with capacity ceil(k * T * capacity_factor / E) (jaxmoe/capacity.py).
The dropless impls compute the same function. The layer returns the MoE contribution only; the
transformer block adds the residual.
"""

from __future__ import annotations

import functools
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx, struct

import kernels
from jaxmoe import capacity as capacity_lib
from jaxmoe import dispatch
from jaxmoe import router as router_lib
from jaxmoe.config import MoEConfig
from jaxmoe.experts import RoutedExperts, SharedExperts, activation_fn
from jaxmoe.recompute import checkpointed


@struct.dataclass
class MoEStats:
  """Auxiliary losses and router statistics of one MoE call (a pytree: passes through jit/scan).

  aux_loss: float32 scalar, Switch/GShard load-balancing loss E * sum_e f_e P_e (1 when balanced).
  z_loss: float32 scalar, router z-loss mean_t logsumexp(logits_t)^2.
  loss: float32 scalar, aux_loss_weight * aux_loss + z_loss_weight * z_loss: add it to the
    training loss (the weights come from the MoEConfig).
  tokens_per_expert: (E,) float32 routed assignments per expert (before any capacity drop; sums to
    T * top_k). Feed it to MoE.update_router_bias.
  dropped_fraction: float32 scalar, fraction of the T * top_k assignments dropped (0 if dropless).
  """

  aux_loss: jax.Array
  z_loss: jax.Array
  loss: jax.Array
  tokens_per_expert: jax.Array
  dropped_fraction: jax.Array

  def weighted_loss(self) -> jax.Array:
    """The weighted auxiliary loss to add to the training objective (== self.loss)."""
    return self.loss


class ExpertParallel(Protocol):
  """What the MoE layer asks of the object that runs it on a device mesh.

  jaxmoe.parallel.ParallelConfig implements it; the layer only calls these methods, so no layer
  module imports jaxmoe.parallel (which imports the layer).
  """

  def check_layer(self, config: MoEConfig, num_tokens: int | None = None,
                  impl: str | None = None) -> None:
    """ValueError unless a layer of `config` (called on num_tokens tokens with `impl`) fits."""

  def run_router(self, router: router_lib.Router, tokens: jax.Array,
                 deterministic: bool) -> router_lib.RouterOutput:
    """The router's decision for tokens (T, d_model), as router(tokens) on one device."""

  def run_experts(self, experts: RoutedExperts, tokens: jax.Array,
                  routing: router_lib.RouterOutput, impl: str) -> tuple[jax.Array, jax.Array]:
    """(combined routed-expert outputs (T, d_model), dropped_fraction float32 scalar)."""


def _grouped_matmul_fn(backend):
  def matmul(lhs, rhs, group_sizes):
    return kernels.grouped_matmul(lhs, rhs, group_sizes, backend=backend)
  return matmul


def _ragged_dot(lhs, rhs, group_sizes):
  out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
  return out.astype(lhs.dtype)


class MoE(nnx.Module):
  """Mixture-of-Experts feed-forward layer (see the module docstring).

  Args:
    config: the MoEConfig.
    rngs: parameter initialization (stream "params"; "jitter" for router noise, falling back to
      the default stream).
    dtype: compute dtype of the experts (router logits are always float32).
    param_dtype: storage dtype of the expert parameters (router weights are always float32).
    parallel: an ExpertParallel (jaxmoe.parallel.ParallelConfig): run the router and the routed
      experts expert- and tensor-parallel on its mesh (None: on one device; see also
      jaxmoe.parallel.set_parallel).
  """

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, parallel: ExpertParallel | None = None):
    if not isinstance(config, MoEConfig):
      raise ValueError(f"config must be a MoEConfig, got {type(config).__name__}")
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.router = router_lib.Router(config, rngs=rngs)
    self.experts = RoutedExperts(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.shared = SharedExperts(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype) \
        if config.num_shared_experts > 0 else None
    # Qwen2-MoE's shared-expert gate: (d_model, 1) float32, like the router.
    self.shared_gate = nnx.Param(nnx.initializers.normal(stddev=config.d_model ** -0.5)(
        rngs.params(), (config.d_model, 1), jnp.float32)) if config.shared_expert_gate else None
    self.parallel = parallel
    if parallel is not None:
      parallel.check_layer(config)

  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               impl: str | None = None) -> tuple[jax.Array, MoEStats]:
    """x (..., d_model) float -> (y of x's shape and dtype, MoEStats).

    deterministic=False turns on router jitter (if configured). impl overrides config.impl.
    """
    cfg = self.config
    impl = cfg.impl if impl is None else impl
    cfg.check_impl(impl)
    if x.ndim < 1 or x.shape[-1] != cfg.d_model:
      raise ValueError(f"x must have shape (..., d_model={cfg.d_model}), got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"x must be a float array, got dtype {x.dtype}")
    tokens = x.reshape(-1, cfg.d_model)
    parallel = self.parallel
    if parallel is not None:
      parallel.check_layer(cfg, tokens.shape[0], impl)
      routing = parallel.run_router(self.router, tokens, deterministic)
    else:
      routing = self.router(tokens, deterministic=deterministic)
    e = cfg.num_experts

    dropped = jnp.zeros((), jnp.float32)
    if parallel is not None:
      y, dropped = parallel.run_experts(self.experts, tokens, routing, impl)
    elif impl == "capacity":
      y, _, dropped = capacity_lib.capacity_experts(
          self.experts, tokens, routing.indices, routing.weights, cfg.capacity(tokens.shape[0]),
          recompute=cfg.remat_experts)
    elif impl == "scatter":
      y = self.experts.apply_scatter(tokens, routing.indices, routing.weights)
    elif impl == "blocksparse":
      y = self.experts.apply_blocksparse(tokens, routing.indices, routing.weights)
    else:
      matmul = _ragged_dot if impl == "ragged_dot" else _grouped_matmul_fn(cfg.backend)
      # kernels.grouped_matmul takes the gate and up weights as one product (ragged_dot would
      # keep their concatenation for its backward).
      packed = impl == "grouped"
      fused = {}
      if impl == "grouped" and cfg.fuse_activation:
        fused["fused_mlp"] = functools.partial(
            kernels.grouped_mlp, activation=activation_fn(cfg.activation), backend=cfg.backend,
            keep_activation=not cfg.recompute_activation)
      if impl == "grouped" and cfg.fuse_glu:
        fused["fused_glu"] = functools.partial(
            kernels.grouped_glu, activation=activation_fn(cfg.activation), backend=cfg.backend)
      d = dispatch.sort_by_expert(routing.indices, e)
      rows = dispatch.gather_sorted(tokens.astype(self.dtype), d)
      def apply(experts, rows, group_sizes, expert):
        return experts.apply_sorted(rows, group_sizes, expert, matmul, packed=packed, **fused)
      if cfg.remat_experts:
        # Keeps the sorted rows (the weights are inputs anyway) and recomputes the first matmul
        # and the activation, not the (rows, d_ff) gate [and up] and hidden arrays. The second
        # matmul's forward is dead code in the recomputation (the backward pass does not need
        # its output), so it is not redone.
        y_sorted = checkpointed(self.experts, rows, d.group_sizes, d.expert, apply=apply)
      else:
        y_sorted = apply(self.experts, rows, d.group_sizes, d.expert)
      y = dispatch.combine_sorted(y_sorted, d, routing.weights)

    if cfg.routed_scale != 1.0:
      y = y * jnp.asarray(cfg.routed_scale, y.dtype)
    if self.shared is not None:
      shared = self.shared(tokens)
      if self.shared_gate is not None:
        gate = jax.nn.sigmoid(jnp.dot(tokens.astype(jnp.float32), self.shared_gate[...],
                                      precision=jax.lax.Precision.HIGHEST))
        shared = shared * gate.astype(shared.dtype)
      y = y + shared

    aux = router_lib.load_balancing_loss(routing.probs, routing.indices, e)
    z = router_lib.router_z_loss(routing.logits)
    stats = MoEStats(
        aux_loss=aux,
        z_loss=z,
        loss=cfg.aux_loss_weight * aux + cfg.z_loss_weight * z,
        tokens_per_expert=jax.lax.stop_gradient(router_lib.tokens_per_expert(routing.indices, e)),
        dropped_fraction=dropped,
    )
    return y.astype(x.dtype).reshape(x.shape), stats

  def update_router_bias(self, tokens_per_expert: jax.Array, rate: float = 1e-3) -> None:
    """Auxiliary-loss-free balancing step (DeepSeek-V3), outside the gradient:
    bias_e += rate * sign(mean(tokens_per_expert) - tokens_per_expert_e).

    tokens_per_expert: (E,) loads, e.g. MoEStats.tokens_per_expert summed over layers' steps or
    micro-batches. Needs MoEConfig.bias_balancing=True.
    """
    self.router.update_bias(tokens_per_expert, rate)
