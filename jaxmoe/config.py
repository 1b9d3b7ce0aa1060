"""The frozen configurations, validated once at construction:

  MoEConfig     every knob of one MoE layer
  ModelConfig   the language model's architecture (saved with checkpoints as plain JSON values)
  TrainConfig   a training run: optimizer, batch, schedule, data, mesh sizes, logging

A bad value raises a ValueError (ConfigError for TrainConfig) naming the field, what was given and
what is allowed, so a typo in a training config fails at startup rather than deep inside a jitted
step. All three are frozen and hashable: the training package caches compiled steps by them.
(jaxmoe.parallel.ParallelConfig is not here: it holds a live device Mesh, not plain values.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

import kernels
from kernels.gmm.epilogue import GLU_UNIT

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
    fuse_activation: impl "grouped" runs a plain MLP's (no GLU, no biases) activation inside the
      grouped products' epilogues (kernels.grouped_mlp) where the backend has them (Mosaic GPU);
      False: the separate products and elementwise passes (the same values).
    recompute_activation: with fuse_activation on impl "grouped" (a plain MLP without biases),
      the forward pass keeps only the pre-activation h for the backward pass, and the backward's
      data-gradient product writes act(h) again in its epilogue (kernels.grouped_mlp's
      keep_activation=False): one (rows, d_ff) array less memory per layer between the passes,
      one (rows, d_ff) write more in the backward. The same values. Like fuse_activation, a
      choice of the single-device layer (the expert-parallel one runs separate products and
      ParallelConfig.remat chooses what it recomputes).
    fuse_glu: a GLU's activation in its up projection's kernel. impl "grouped": a GLU without
      biases runs as kernels.grouped_glu (act(gate) * up and its gradient in the products'
      epilogues); impl "scatter": scatter_glu(fused=True) where the backend has the fused GLU
      kernels (the fused up-projection and the fused backward: it keeps g and u, not the
      activation, but its forward+backward was 0.84-0.93x the default's on the H200; off, the
      scatter impl runs scatter_glu's default, the fused up-projection in an undifferentiated
      forward). d_ff a multiple of 64. Off by default (kernels/README.md: neither is faster
      than the default in training on the H200).
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
  fuse_activation: bool = True
  fuse_glu: bool = False
  recompute_activation: bool = False

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
    for name in ("fuse_activation", "fuse_glu", "recompute_activation"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"MoEConfig.{name} must be a bool, got {getattr(self, name)!r}")
    if self.recompute_activation and not (self.impl == "grouped" and self.fuse_activation
                                          and not self.is_glu and not self.use_bias):
      raise ValueError(f"MoEConfig.recompute_activation=True needs impl='grouped' with "
                       f"fuse_activation=True, a plain (non-GLU) activation and no biases; got "
                       f"impl={self.impl!r}, fuse_activation={self.fuse_activation}, "
                       f"activation={self.activation!r}, use_bias={self.use_bias}")
    if self.fuse_glu and not (self.is_glu and self.d_ff % GLU_UNIT == 0):
      raise ValueError(f"MoEConfig.fuse_glu=True needs a GLU activation and d_ff a multiple of "
                       f"{GLU_UNIT}, got activation={self.activation!r}, d_ff={self.d_ff}")
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


# ------------------------------------------------------------------------------------------------
# The model.

FFN_KINDS = ("moe", "dense")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
QK_NORMS = ("none", "head", "full")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of the LM. All fields are plain JSON values (saved with checkpoints)."""

  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  d_ff: int = 256            # dense MLP width (and expert width unless expert_d_ff is set)
  # Feed-forward activation, dense MLP and experts alike: a GLU (three matrices: "swiglu", "geglu",
  # ...) or a plain 2-matrix MLP ("gelu_tanh" as in MegaBlocks, "gelu", ...); jaxmoe.config.ACTIVATIONS.
  activation: str = "swiglu"
  max_seq_len: int = 256
  rope_theta: float = 10000.0
  ffn: str = "moe"           # "moe" or "dense"
  moe_every: int = 1         # MoE in every n-th layer
  num_experts: int = 8
  top_k: int = 2
  expert_d_ff: int | None = None
  moe_impl: str = "grouped"  # one of jaxmoe.config.IMPLS
  # Routing (MoEConfig's fields of the same names): "softmax_topk", "topk_softmax" or "sigmoid";
  # renormalize None is the router's published default (softmax_topk: no, as Switch/MegaBlocks;
  # sigmoid: yes, as DeepSeek-V3); routed_scale multiplies the routed experts' output.
  router: str = "softmax_topk"
  renormalize: bool | None = None
  routed_scale: float = 1.0
  capacity_factor: float = 1.25
  aux_loss_weight: float = 0.01
  z_loss_weight: float = 0.001
  bias_balancing: bool = False
  backend: str | None = None  # kernels backend for impl="grouped"
  block_size: int = 128      # MegaBlocks block size for moe_impl="blocksparse"
  dtype: str = "bfloat16"    # compute dtype; parameters are always float32
  remat: bool = False
  remat_skip: int = 0        # with remat: the last remat_skip blocks keep their activations
  remat_mlp: bool = False    # recompute the (expert) MLPs' hidden activations in the backward
                             # (expert-parallel MoE layers: their comm-aware remat)
  fuse_activation: bool = True  # MoEConfig's field: the activation in the grouped kernels
  fuse_glu: bool = False     # MoEConfig's field: a GLU's activation in the grouped kernels
  recompute_activation: bool = False  # MoEConfig's field (the MoE layers' experts): keep h, not
                                      # act(h), for the backward
  tie_embeddings: bool = True
  norm_eps: float = 1e-6
  attention: str = "auto"    # "auto" (cuDNN on GPU for bf16/fp16, else XLA), "xla" or "cudnn"
  # What published models add (jaxmoe convert sets them from a Hugging Face config):
  attn_head_dim: int | None = None  # per-head width; None: d_model // n_heads (Qwen3 differs)
  qk_norm: str = "none"      # RMSNorm on q and k before RoPE: "head" (each head over its own
                             # dims, one weight shared by the heads: Qwen3-MoE) or "full" (all
                             # heads' q, and all k, as one vector: OLMoE)
  qkv_bias: bool = False     # biases on the q, k and v projections (Qwen2-MoE)
  first_dense_layers: int = 0  # the first N layers have a dense MLP (DeepSeek's first_k_dense)
  num_shared_experts: int = 0  # always-on experts in every MoE layer (MoEConfig's field)
  shared_d_ff: int | None = None   # their width each (None: the expert width)
  shared_expert_gate: bool = False  # scale the shared experts by sigmoid(x @ w) (Qwen2-MoE)
  n_group: int | None = None     # group-limited routing (DeepSeek-V3): experts in n_group groups,
  topk_group: int | None = None  # only the topk_group best groups eligible (MoEConfig's fields)
  scale_tied_head: bool = True  # a tied LM head multiplies by d_model ** -0.5 (jaxmoe's own
                                # models; the published ones do not)
  # > 0: the training loss runs the LM head and the cross-entropy fused, in this many pieces of
  # the sequence (kernels.cross_entropy.linear_cross_entropy): the (B, T, V) logits are never all
  # in memory (6.1 GiB in bf16 at the Small preset's batch). 0: the model's logits, then the loss.
  loss_chunks: int = 0

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
                 "moe_every", "num_experts", "top_k"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model.{name} must be a positive int, got {value!r}")
    if not isinstance(self.remat_skip, int) or isinstance(self.remat_skip, bool) \
        or not 0 <= self.remat_skip <= self.n_layers:
      raise ValueError(f"model.remat_skip must be an int in [0, n_layers={self.n_layers}], got "
                       f"{self.remat_skip!r}")
    for name in ("remat_mlp", "fuse_activation", "fuse_glu", "recompute_activation"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"model.{name} must be true or false, got {getattr(self, name)!r}")
    if self.remat_mlp and self.ffn == "moe" and self.moe_impl not in REMAT_EXPERTS_IMPLS:
      raise ValueError(f"model.remat_mlp is implemented for moe_impl in {REMAT_EXPERTS_IMPLS}, "
                       f"got moe_impl={self.moe_impl!r}")
    if self.remat_skip and not self.remat:
      raise ValueError(f"model.remat_skip={self.remat_skip} needs remat=true (it is the number of "
                       "blocks left out of the recomputation)")
    if self.attn_head_dim is None and self.d_model % self.n_heads:
      raise ValueError(f"model.d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
    if self.attn_head_dim is None and (self.d_model // self.n_heads) % 2:
      raise ValueError(f"model head dim d_model/n_heads={self.d_model // self.n_heads} must be even "
                       "(rotary embeddings rotate pairs)")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model.n_heads={self.n_heads} must be divisible by "
                       f"n_kv_heads={self.n_kv_heads} (grouped-query attention)")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"model.activation must be one of {tuple(ACTIVATIONS)}, "
                       f"got {self.activation!r}")
    if self.ffn not in FFN_KINDS:
      raise ValueError(f"model.ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
    if self.moe_impl not in IMPLS:
      raise ValueError(f"model.moe_impl must be one of {IMPLS}, got {self.moe_impl!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"model.attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
    if self.attention == "cudnn" and (self.dtype == "float32" or self.head_dim % 8
                                      or self.head_dim > 128):
      raise ValueError(f"model.attention='cudnn' needs dtype bfloat16/float16 and a head dim that "
                       f"is a multiple of 8 and <= 128; got dtype={self.dtype!r}, "
                       f"head_dim={self.head_dim}")
    if self.top_k > self.num_experts:
      raise ValueError(f"model.top_k={self.top_k} must be <= num_experts={self.num_experts}")
    if self.ffn == "moe":
      self.moe_config()  # MoEConfig's own checks (e.g. blocksparse: d_ff a multiple of block_size)
    if self.expert_d_ff is not None and (not isinstance(self.expert_d_ff, int) or self.expert_d_ff < 1):
      raise ValueError(f"model.expert_d_ff must be a positive int or None, got {self.expert_d_ff!r}")
    if self.attn_head_dim is not None and (not isinstance(self.attn_head_dim, int)
                                           or self.attn_head_dim < 2 or self.attn_head_dim % 2):
      raise ValueError(f"model.attn_head_dim must be an even int >= 2 or None, got "
                       f"{self.attn_head_dim!r}")
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f"model.qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
    if not isinstance(self.first_dense_layers, int) or isinstance(self.first_dense_layers, bool) \
        or not 0 <= self.first_dense_layers <= self.n_layers:
      raise ValueError(f"model.first_dense_layers must be an int in [0, n_layers={self.n_layers}], "
                       f"got {self.first_dense_layers!r}")
    if not isinstance(self.loss_chunks, int) or isinstance(self.loss_chunks, bool) \
        or not 0 <= self.loss_chunks <= self.max_seq_len:
      raise ValueError(f"model.loss_chunks must be an int in [0, max_seq_len={self.max_seq_len}], "
                       f"got {self.loss_chunks!r}")
    for name in ("qkv_bias", "shared_expert_gate", "scale_tied_head", "tie_embeddings"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"model.{name} must be true or false, got {getattr(self, name)!r}")

  @property
  def head_dim(self) -> int:
    return self.attn_head_dim or self.d_model // self.n_heads

  def is_moe_layer(self, i: int) -> bool:
    return self.ffn == "moe" and i >= self.first_dense_layers and (i + 1) % self.moe_every == 0

  @property
  def num_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.n_layers))

  def moe_config(self) -> MoEConfig:
    return MoEConfig(d_model=self.d_model, d_ff=self.expert_d_ff or self.d_ff,
                     num_experts=self.num_experts, top_k=self.top_k, impl=self.moe_impl,
                     activation=self.activation, capacity_factor=self.capacity_factor,
                     router=self.router, renormalize=self.renormalize,
                     routed_scale=self.routed_scale, num_shared_experts=self.num_shared_experts,
                     shared_d_ff=self.shared_d_ff, shared_expert_gate=self.shared_expert_gate,
                     n_group=self.n_group, topk_group=self.topk_group,
                     aux_loss_weight=self.aux_loss_weight, z_loss_weight=self.z_loss_weight,
                     bias_balancing=self.bias_balancing, backend=self.backend,
                     block_size=self.block_size, remat_experts=self.remat_mlp,
                     fuse_activation=self.fuse_activation, fuse_glu=self.fuse_glu,
                     recompute_activation=self.recompute_activation)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; allowed: {sorted(known)}")
    return cls(**d)

  @classmethod
  def from_saved(cls, d: dict[str, Any]) -> "ModelConfig":
    """The config a checkpoint was trained with: from_dict, with the fields that an older save
    lacks taken at the value they had then (SAVED_DEFAULTS), not at today's default."""
    try:
      return cls.from_dict(with_saved_defaults(d))
    except ValueError as e:
      if "renormalize" not in d and "combine weight" in str(e):
        raise ValueError(
            "this checkpoint predates router='softmax_topk' renormalize=False as the default: its "
            "top-1 router combined every expert output with the constant weight 1, so it never "
            "learned from the task loss, and jaxmoe no longer builds that model; train it again") \
            from None
      raise


# Fields whose default changed, at the value a saved config without them was trained with: until
# routing became explicit, MoE layers renormalized the top-k weights (MoEConfig.renormalize=True).
SAVED_DEFAULTS: dict[str, Any] = {"renormalize": True}


def with_saved_defaults(d: dict[str, Any]) -> dict[str, Any]:
  """A saved model config dict with SAVED_DEFAULTS filled in where it lacks them."""
  return {**{k: v for k, v in SAVED_DEFAULTS.items() if k not in d}, **d}


# ------------------------------------------------------------------------------------------------
# Training.

# TrainConfig.adam_mu_dtype -> optax's mu_dtype (None: the parameters' dtype, float32).
MU_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}

# All-to-all modes of the expert-parallel MoE layer (jaxmoe.parallel.ParallelConfig.a2a,
# TrainConfig.ep_a2a): "padded" runs everywhere, "ragged" on GPU/TPU only, "ragged_emulated" is
# the ragged bookkeeping over a padded collective (how CPU tests check it).
A2A_MODES = ("padded", "ragged", "ragged_emulated")


class ConfigError(ValueError):
  """A user configuration mistake (bad value, does not fit the mesh, mismatched resume)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A training run (jaxmoe.train.run); every field is a `jaxmoe train` flag."""

  steps: int = 200
  batch_size: int = 16        # global batch (sequences), per optimizer step
  grad_accum: int = 1         # microbatches per step: batch_size / grad_accum sequences at a time
  seq_len: int = 128
  lr: float = 3e-3
  min_lr_ratio: float = 0.1   # cosine decays to lr * min_lr_ratio
  warmup_steps: int = 30
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.95
  adam_mu_dtype: str = "float32"   # Adam's first moment: "float32" or "bfloat16" (2 B/param less)
  # Keep the routed experts' weights in the compute dtype in the train state too, written by the
  # optimizer's update (no cast pass over them each step; not checkpointed):
  # jaxmoe.train.compute_copy. None: wherever it costs no memory (see there); True: required.
  expert_compute_copy: bool | None = None
  seed: int = 0
  eval_every: int = 100       # 0: only at the end
  eval_batches: int = 4
  ckpt_every: int = 100       # 0: only at the end / on a signal
  keep: int = 3
  log_every: int = 10
  data: str | None = None     # None/"builtin", "python" (embedded corpora); a text file/folder,
                              # .npy or .bin (jaxmoe train --help lists the formats)
  tokenizer: str = "byte"     # "byte", "bpe" (trained on the data, vocab_size entries) or a
                              # tokenizer.json path; the run keeps it as RUN/tokenizer.json
  init_from: str | None = None  # a run or checkpoint whose parameters a new run starts from
  data_dtype: str = "uint16"  # for .bin
  val_fraction: float = 0.05
  corpus_bytes: int = 8 << 20
  mesh_data: int = -1         # -1: all devices not used by expert * tensor
  mesh_expert: int = 1
  mesh_tensor: int = 1
  # All-to-all of the expert-parallel MoE layers (mesh_expert or mesh_tensor > 1): "padded" runs
  # everywhere; "ragged" moves only the real rows but XLA:CPU cannot compile it (GPU only).
  ep_a2a: str = "padded"
  peak_tflops: float | None = None  # per device; None: from the device kind (H100: 989)
  bias_rate: float = 1e-3     # aux-loss-free router bias step (model.bias_balancing)
  tensorboard: bool = True

  def __post_init__(self):
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "keep",
                 "log_every", "mesh_expert", "mesh_tensor", "corpus_bytes"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"train.{name} must be a positive int, got {v!r}")
    for name in ("warmup_steps", "eval_every", "ckpt_every", "seed"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ConfigError(f"train.{name} must be an int >= 0, got {v!r}")
    if not isinstance(self.mesh_data, int) or (self.mesh_data < 1 and self.mesh_data != -1):
      raise ConfigError(f"train.mesh_data must be a positive int or -1, got {self.mesh_data!r}")
    for name in ("lr", "grad_clip"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"train.{name} must be a finite number > 0, got {v!r}")
    for name in ("min_lr_ratio", "b1", "b2"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise ConfigError(f"train.{name} must be in [0, 1], got {v!r}")
    if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
      raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay!r}")
    if self.batch_size % self.grad_accum:
      raise ConfigError(f"train.batch_size={self.batch_size} is not divisible by train.grad_accum="
                        f"{self.grad_accum} (the microbatches are equal parts of the batch)")
    if self.expert_compute_copy is not None and not isinstance(self.expert_compute_copy, bool):
      raise ConfigError(f"train.expert_compute_copy must be a bool or None, got "
                        f"{self.expert_compute_copy!r}")
    if self.adam_mu_dtype not in MU_DTYPES:
      raise ConfigError(f"train.adam_mu_dtype must be one of {tuple(MU_DTYPES)}, got "
                        f"{self.adam_mu_dtype!r}")
    if self.ep_a2a not in A2A_MODES:
      raise ConfigError(f"train.ep_a2a must be one of {A2A_MODES}, got {self.ep_a2a!r}")

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f"unknown train config keys {unknown}; allowed: {sorted(known)}")
    return cls(**d)
