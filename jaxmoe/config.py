"""`MoEConfig`: every knob of the MoE layer, validated once at construction.

A bad value raises a ValueError naming the field, what was given and what is allowed, so a typo in a
training config fails at startup rather than deep inside a jitted step.
"""

from __future__ import annotations

import dataclasses
import math

import kernels

# Dropless implementations compute the same function; "capacity" is the token-dropping baseline.
DROPLESS_IMPLS = ("grouped", "ragged_dot", "scatter", "blocksparse")
IMPLS = DROPLESS_IMPLS + ("capacity",)
# The impls whose expert MLP MoEConfig.remat_experts can recompute (the others run fused kernels).
REMAT_EXPERTS_IMPLS = ("grouped", "ragged_dot", "capacity")

# name -> is it a gated linear unit (two input projections)?
ACTIVATIONS = {
    "swiglu": True,
    "geglu": True,
    "geglu_tanh": True,
    "reglu": True,
    "gelu": False,
    "gelu_tanh": False,
    "relu": False,
    "silu": False,
}

# softmax_topk: softmax over all experts, then top-k; the combine weights are the chosen
#               probabilities (Switch, GShard, MegaBlocks, OLMoE, Qwen2-MoE), or those renormalized
#               to sum 1 with renormalize=True (Mixtral, Qwen3-MoE: Hugging Face's norm_topk_prob).
# topk_softmax: top-k of the logits, softmax over the k chosen (Mixtral's own formulation; equal to
#               softmax_topk with renormalize=True, and always normalized).
# sigmoid:      per-expert sigmoid scores, top-k; the chosen scores normalized to sum 1 by default
#               (DeepSeek-V3), or used as they are with renormalize=False.
ROUTERS = ("softmax_topk", "topk_softmax", "sigmoid")
# What renormalize=None means for each router: the published models' choice.
DEFAULT_RENORMALIZE = {"softmax_topk": False, "topk_softmax": True, "sigmoid": True}

# The kernels registry of the op each impl runs its expert products on: MoEConfig.backend must be
# one of that op's backends (or None, the platform default). The impls without a kernel op take
# any name a kernels op has (they ignore it; the expert-parallel layer passes it to grouped_matmul).
IMPL_BACKENDS = {"grouped": kernels.GMM_BACKENDS, "scatter": kernels.SCATTER_BACKENDS,
                 "blocksparse": kernels.BLOCKSPARSE_BACKENDS}
BACKENDS = (None,) + tuple(dict.fromkeys(n for r in kernels.REGISTRIES.values() for n in r.names))


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Configuration of one MoE layer.

  Attributes:
    d_model: model width (input and output features).
    d_ff: hidden width of each routed expert.
    num_experts: number of routed experts E.
    top_k: experts per token, 1..num_experts.
    impl: "grouped" (sort + kernels.grouped_matmul), "ragged_dot" (sort + jax.lax.ragged_dot),
      "scatter" (ScatterMoE, kernels.scatter: gather/scatter inside the kernel; needs
      use_bias=False), "blocksparse" (MegaBlocks dMoE, kernels.blocksparse.dmoe_mlp: needs use_bias=False and d_ff a
      multiple of block_size), or "capacity" (token dropping with a per-expert capacity, the
      Switch/GShard baseline).
    activation: one of ACTIVATIONS; the GLU ones ("swiglu", "geglu", ...) use gate and up projections.
    router: one of ROUTERS (see the comment above ROUTERS for which published model uses which).
    renormalize: divide the k chosen scores by their sum, so the combine weights sum to 1 (Hugging
      Face's norm_topk_prob). None (the default) takes the router's published form,
      DEFAULT_RENORMALIZE: no for "softmax_topk" (Switch/MegaBlocks weight each expert's output by
      its router probability), yes for "sigmoid" (DeepSeek-V3); "topk_softmax" is normalized by
      construction and refuses renormalize=False. With top_k=1 a normalized weight is the constant
      1 and the router would learn nothing from the task loss: that combination is a ValueError.
    capacity_factor: impl="capacity" only: capacity = ceil(top_k * tokens * capacity_factor / E).
    num_shared_experts: always-on experts (DeepSeek style), run as one dense MLP of width
      num_shared_experts * shared_d_ff.
    shared_d_ff: hidden width of one shared expert (None: d_ff).
    shared_expert_gate: scale the shared experts' output by sigmoid(x @ w_gate), a learned
      (d_model, 1) float32 gate (Qwen2-MoE).
    n_group, topk_group: group-limited routing (DeepSeek-V3): the experts form n_group equal
      groups, each group scores the sum of its two best selection scores, and only the
      topk_group best groups are eligible for the top-k. None: no grouping.
    use_bias: biases in the expert projections.
    jitter: multiplicative router-input noise x * U(1 - jitter, 1 + jitter) at train time (Switch).
    aux_loss_weight: weight of the load-balancing loss in MoEStats.loss.
    z_loss_weight: weight of the router z-loss in MoEStats.loss.
    bias_balancing: auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias, added to the
      scores for expert selection only, updated outside the gradient by MoE.update_router_bias.
    routed_scale: factor on the routed experts' combined output (DeepSeek-V3 uses 2.5).
    backend: kernels backend for impl="grouped", "scatter" and "blocksparse": a name of the
      registry of the op the impl runs on (IMPL_BACKENDS; blocksparse has no "mosaic"), or None
      for the platform default ("pallas" on GPU, "xla" elsewhere).
    block_size: block size of impl="blocksparse" (MegaBlocks uses 128).
    remat_experts: recompute the expert MLP's hidden activations in the backward pass
      (jax.checkpoint around it: only its input rows are kept, not the two (rows, d_ff) hidden
      arrays; costs the first expert matmul and the activation once more). impl "grouped",
      "ragged_dot" and "capacity". On the expert-parallel layer, ParallelConfig.remat chooses
      what is recomputed, and remat_experts=True asks for one of its recomputing modes.
  """

  d_model: int
  d_ff: int
  num_experts: int
  top_k: int = 2
  impl: str = "grouped"
  activation: str = "swiglu"
  router: str = "softmax_topk"
  renormalize: bool | None = None
  capacity_factor: float = 1.25
  num_shared_experts: int = 0
  shared_d_ff: int | None = None
  shared_expert_gate: bool = False
  n_group: int | None = None
  topk_group: int | None = None
  use_bias: bool = False
  jitter: float = 0.0
  aux_loss_weight: float = 0.01
  z_loss_weight: float = 0.001
  bias_balancing: bool = False
  routed_scale: float = 1.0
  backend: str | None = None
  block_size: int = 128
  remat_experts: bool = False

  def __post_init__(self):
    for name in ("d_model", "d_ff", "num_experts"):
      _check_positive_int(name, getattr(self, name))
    if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"MoEConfig.top_k must be an int in 1..num_experts={self.num_experts}, "
                       f"got {self.top_k!r}")
    _check_choice("impl", self.impl, IMPLS)
    _check_positive_int("block_size", self.block_size)
    self.check_impl(self.impl)
    _check_choice("activation", self.activation, tuple(ACTIVATIONS))
    _check_choice("router", self.router, ROUTERS)
    _check_choice("backend", self.backend, BACKENDS)
    self._check_routing()
    self._check_groups()
    if not isinstance(self.shared_expert_gate, bool) or (self.shared_expert_gate
                                                         and not self.num_shared_experts):
      raise ValueError(f"MoEConfig.shared_expert_gate must be a bool, and True needs "
                       f"num_shared_experts >= 1; got {self.shared_expert_gate!r} with "
                       f"num_shared_experts={self.num_shared_experts}")
    if not (isinstance(self.capacity_factor, (int, float)) and math.isfinite(self.capacity_factor)
            and self.capacity_factor > 0):
      raise ValueError(f"MoEConfig.capacity_factor must be a finite number > 0, "
                       f"got {self.capacity_factor!r}")
    if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
      raise ValueError(f"MoEConfig.num_shared_experts must be an int >= 0, "
                       f"got {self.num_shared_experts!r}")
    if self.shared_d_ff is not None:
      _check_positive_int("shared_d_ff", self.shared_d_ff)
    if not isinstance(self.jitter, (int, float)) or not 0.0 <= self.jitter < 1.0:
      raise ValueError(f"MoEConfig.jitter must be in [0, 1), got {self.jitter!r}")
    for name in ("aux_loss_weight", "z_loss_weight"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"MoEConfig.{name} must be a finite number >= 0, got {value!r}")
    if not isinstance(self.routed_scale, (int, float)) or not math.isfinite(self.routed_scale):
      raise ValueError(f"MoEConfig.routed_scale must be a finite number, got {self.routed_scale!r}")

  def _check_groups(self) -> None:
    if (self.n_group is None) != (self.topk_group is None):
      raise ValueError(f"MoEConfig.n_group and topk_group go together (group-limited routing), "
                       f"got n_group={self.n_group!r}, topk_group={self.topk_group!r}")
    if self.n_group is None:
      return
    _check_positive_int("n_group", self.n_group)
    _check_positive_int("topk_group", self.topk_group)
    if self.num_experts % self.n_group:
      raise ValueError(f"MoEConfig.n_group={self.n_group} must divide num_experts="
                       f"{self.num_experts}")
    if self.topk_group > self.n_group:
      raise ValueError(f"MoEConfig.topk_group={self.topk_group} must be <= n_group={self.n_group}")
    if self.topk_group * (self.num_experts // self.n_group) < self.top_k:
      raise ValueError(f"MoEConfig: topk_group={self.topk_group} groups of "
                       f"{self.num_experts // self.n_group} experts hold fewer than top_k="
                       f"{self.top_k} experts")

  def _check_routing(self) -> None:
    if self.renormalize is not None and not isinstance(self.renormalize, bool):
      raise ValueError(f"MoEConfig.renormalize must be True, False or None (the router's default), "
                       f"got {self.renormalize!r}")
    if self.router == "topk_softmax" and self.renormalize is False:
      raise ValueError("MoEConfig.renormalize=False cannot apply to router='topk_softmax' (a softmax "
                       "over the k chosen logits always sums to 1); use router='softmax_topk' for "
                       "unnormalized probabilities")
    if self.top_k == 1 and self.normalizes_weights:
      how = ("router='topk_softmax'" if self.router == "topk_softmax" else
             f"router={self.router!r} with renormalize="
             f"{self.renormalize if self.renormalize is not None else 'None (its default: True)'}")
      raise ValueError(
          f"MoEConfig: top_k=1 and {how} make every combine weight the constant 1, so the router "
          "gets no gradient from the task loss; use "
          + ("router='softmax_topk' with " if self.router == "topk_softmax" else "")
          + "renormalize=False (the Switch/MegaBlocks form: the expert output weighted by its "
          "router probability) or top_k >= 2")

  @property
  def normalizes_weights(self) -> bool:
    """Whether the k combine weights are normalized to sum 1 (renormalize resolved)."""
    if self.renormalize is None:
      return DEFAULT_RENORMALIZE[self.router]
    return self.renormalize

  def check_impl(self, impl: str) -> None:
    """ValueError if `impl` is unknown or cannot run this configuration (also used for the MoE
    call's impl override)."""
    if impl not in IMPLS:
      raise ValueError(f"MoEConfig.impl must be one of {IMPLS}, got {impl!r}")
    if impl in ("blocksparse", "scatter") and self.use_bias:
      raise ValueError(f"MoEConfig.use_bias must be False with impl={impl!r} (its kernels have "
                       "no expert biases), got True")
    if self.remat_experts and impl not in REMAT_EXPERTS_IMPLS:
      raise ValueError(f"MoEConfig.remat_experts=True is implemented for impl in "
                       f"{REMAT_EXPERTS_IMPLS}, got impl={impl!r}")
    if impl in IMPL_BACKENDS and self.backend not in (None, *IMPL_BACKENDS[impl].names):
      raise ValueError(f"MoEConfig.backend must be one of {IMPL_BACKENDS[impl].names} (the "
                       f"backends of {IMPL_BACKENDS[impl].op}) or None with impl={impl!r}, got "
                       f"{self.backend!r}")
    if impl == "blocksparse":
      if self.d_ff % self.block_size:
        raise ValueError(f"MoEConfig.d_ff must be a multiple of block_size={self.block_size} with "
                         f"impl='blocksparse', got {self.d_ff}")

  @property
  def is_glu(self) -> bool:
    return ACTIVATIONS[self.activation]

  @property
  def is_dropless(self) -> bool:
    return self.impl in DROPLESS_IMPLS

  @property
  def shared_width(self) -> int:
    """Hidden width of the fused shared-expert MLP (0 without shared experts)."""
    return self.num_shared_experts * (self.shared_d_ff or self.d_ff)

  def capacity(self, num_tokens: int) -> int:
    """Slots per expert for impl="capacity": ceil(top_k * tokens * capacity_factor / E)."""
    return max(1, math.ceil(self.top_k * num_tokens * self.capacity_factor / self.num_experts))


def _check_positive_int(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")


def _check_choice(name: str, value, allowed: tuple) -> None:
  if value not in allowed:
    raise ValueError(f"MoEConfig.{name} must be one of {allowed}, got {value!r}")
