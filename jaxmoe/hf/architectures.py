"""The Hugging Face MoE architectures jaxmoe converts, and their configs in jaxmoe's terms.

Each `Arch` says how one transformers model class maps onto `jaxmoe.config.ModelConfig`: the
config keys read (and written back on export), the routing it uses, and the names of its tensors
(`jaxmoe.hf.weights`). Semantics as transformers 5 defines them (tests/data/hf/README.md cites
the functions): pre-norm blocks, RMSNorm `weight * x / rms(x)`, half-split RoPE, grouped-query
attention, softmax-then-top-k routing, SiLU-gated GLU experts.

Activation names differ: on these models Hugging Face's `hidden_act: "silu"` means the SiLU-*gated*
GLU `down(silu(gate(x)) * up(x))`, which is jaxmoe's `activation="swiglu"`; jaxmoe's `"silu"` is a
plain 2-matrix MLP. HF_GLU_ACTIVATIONS is the one place that maps them.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class ConvertError(ValueError):
  """A model folder that cannot be converted (unknown architecture, missing tensor, ...)."""


# Hugging Face hidden_act on a GLU expert -> jaxmoe activation. Never "silu" -> "silu".
HF_GLU_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu",
                      "gelu_pytorch_tanh": "geglu_tanh", "gelu_new": "geglu_tanh", "relu": "reglu"}
JAXMOE_TO_HF_ACTIVATION = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_pytorch_tanh",
                           "reglu": "relu"}


@dataclasses.dataclass(frozen=True)
class Arch:
  name: str                 # jaxmoe's name: "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"
  hf_class: str             # config.json "architectures"[0]
  model_type: str           # config.json "model_type"
  moe_module: str           # the MoE block's module name in tensor names
  expert_names: tuple[str, str, str]   # per-expert (gate, up, down) tensor names
  qk_norm: str              # ModelConfig.qk_norm
  always_renormalize: bool  # Mixtral renormalizes the top-k weights whatever norm_topk_prob says
  has_shared_expert: bool
  has_dense_layers: bool    # mlp_only_layers / decoder_sparse_step (the Qwen models)
  qkv_bias_key: str | None  # config key that puts biases on q, k, v


ARCHITECTURES: dict[str, Arch] = {a.name: a for a in (
    Arch("mixtral", "MixtralForCausalLM", "mixtral", "block_sparse_moe", ("w1", "w3", "w2"),
         "none", True, False, False, None),
    Arch("olmoe", "OlmoeForCausalLM", "olmoe", "mlp", ("gate_proj", "up_proj", "down_proj"),
         "full", False, False, False, None),
    Arch("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", "mlp",
         ("gate_proj", "up_proj", "down_proj"), "none", False, True, True, "qkv_bias"),
    Arch("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", "mlp",
         ("gate_proj", "up_proj", "down_proj"), "head", False, False, True, None),
)}


def detect(hf: dict[str, Any]) -> Arch:
  """The Arch of a config.json dict, by its architectures list or model_type."""
  names = list(hf.get("architectures") or []) + [hf.get("model_type")]
  for arch in ARCHITECTURES.values():
    if arch.hf_class in names or arch.model_type in names:
      return arch
  raise ConvertError(f"unknown architecture {names[0] if names[0] else names[-1]!r}; jaxmoe "
                     f"converts {', '.join(a.hf_class for a in ARCHITECTURES.values())}")


def _get(hf: dict, *keys, default=...):
  for k in keys:
    if hf.get(k) is not None:
      return hf[k]
  if default is ...:
    raise ConvertError(f"config.json has no {' or '.join(repr(k) for k in keys)}")
  return default


def rope_theta(hf: dict) -> float:
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling")
  kind = params.get("rope_type", "default")
  if kind != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
    raise ConvertError(f"RoPE scaling {kind if kind != 'default' else scaling!r} is not supported "
                       "(jaxmoe implements the default rotary embedding)")
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise ConvertError("partial rotary embeddings are not supported")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config(arch: Arch, hf: dict, *, dtype: str = "bfloat16", moe_impl: str = "grouped",
                 block_size: int = 128) -> dict[str, Any]:
  """ModelConfig fields (a dict) for config.json `hf` of architecture `arch`."""
  act = _get(hf, "hidden_act", default="silu")
  if act not in HF_GLU_ACTIVATIONS:
    raise ConvertError(f"hidden_act {act!r} is not supported; jaxmoe maps "
                       f"{sorted(HF_GLU_ACTIVATIONS)} to its GLU activations")
  for key in ("clip_qkv",):
    if hf.get(key) is not None:
      raise ConvertError(f"config.json {key}={hf[key]!r} is not supported")
  if hf.get("attention_bias") and arch.qkv_bias_key is None:
    raise ConvertError("attention_bias=true (biases on q, k, v and o) is not supported for "
                       f"{arch.hf_class}")
  if hf.get("use_sliding_window") or (arch.name == "mixtral" and hf.get("sliding_window")):
    raise ConvertError("sliding-window attention is not supported")
  n_layers = int(_get(hf, "num_hidden_layers"))
  num_experts = int(_get(hf, "num_local_experts", "num_experts"))
  d_ff = int(_get(hf, "intermediate_size"))
  expert_d_ff = int(_get(hf, "moe_intermediate_size", default=d_ff))
  first_dense, moe_every = 0, 1
  if arch.has_dense_layers:
    moe_every = int(_get(hf, "decoder_sparse_step", default=1))
    only = sorted(int(i) for i in (hf.get("mlp_only_layers") or []))
    if only != list(range(len(only))):
      raise ConvertError(f"mlp_only_layers={only} is not supported: jaxmoe takes dense layers "
                         "as a prefix of the model (first_dense_layers)")
    first_dense = len(only)
  shared = int(_get(hf, "shared_expert_intermediate_size", default=0)) \
      if arch.has_shared_expert else 0
  renormalize = True if arch.always_renormalize else bool(_get(hf, "norm_topk_prob", default=False))
  top_k = int(_get(hf, "num_experts_per_tok"))
  if top_k == 1 and renormalize:
    raise ConvertError(f"{arch.hf_class} with num_experts_per_tok=1 and renormalized weights "
                       "combines every expert output with the constant 1; jaxmoe does not build "
                       "that router")
  return dict(
      vocab_size=int(_get(hf, "vocab_size")), d_model=int(_get(hf, "hidden_size")),
      n_layers=n_layers, n_heads=int(_get(hf, "num_attention_heads")),
      n_kv_heads=int(_get(hf, "num_key_value_heads", "num_attention_heads")),
      attn_head_dim=hf.get("head_dim"), d_ff=d_ff, expert_d_ff=expert_d_ff,
      activation=HF_GLU_ACTIVATIONS[act], max_seq_len=int(_get(hf, "max_position_embeddings")),
      rope_theta=rope_theta(hf), ffn="moe", moe_every=moe_every, first_dense_layers=first_dense,
      num_experts=num_experts, top_k=top_k, moe_impl=moe_impl, router="softmax_topk",
      renormalize=renormalize, aux_loss_weight=float(_get(hf, "router_aux_loss_coef",
                                                           default=0.01)),
      z_loss_weight=float(_get(hf, "router_z_loss_coef", default=0.0)),
      num_shared_experts=1 if shared else 0, shared_d_ff=shared or None,
      shared_expert_gate=bool(shared), block_size=block_size, dtype=dtype,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), scale_tied_head=False,
      norm_eps=float(_get(hf, "rms_norm_eps")), qk_norm=arch.qk_norm,
      qkv_bias=bool(hf.get(arch.qkv_bias_key)) if arch.qkv_bias_key else False)


def hf_config(arch: Arch, cfg) -> dict[str, Any]:
  """config.json for a jaxmoe ModelConfig exported as `arch`; ConvertError where it cannot be."""
  problems = []
  if cfg.ffn != "moe":
    problems.append("ffn must be 'moe'")
  if cfg.activation not in JAXMOE_TO_HF_ACTIVATION:
    problems.append(f"activation {cfg.activation!r} has no GLU counterpart there")
  if cfg.router != "softmax_topk" and not (cfg.router == "topk_softmax" and arch.always_renormalize):
    problems.append(f"router {cfg.router!r} (these models use softmax, then top-k)")
  renorm = cfg.moe_config().normalizes_weights
  if arch.always_renormalize and not renorm:
    problems.append("Mixtral always renormalizes the top-k weights (renormalize must be true)")
  if cfg.qk_norm != arch.qk_norm:
    problems.append(f"qk_norm must be {arch.qk_norm!r}")
  if cfg.qkv_bias and not arch.qkv_bias_key:
    problems.append("qkv_bias is not part of it")
  if cfg.num_shared_experts and not arch.has_shared_expert:
    problems.append("it has no shared expert")
  if arch.has_shared_expert and cfg.num_shared_experts and (cfg.num_shared_experts != 1
                                                           or not cfg.shared_expert_gate):
    problems.append("it has exactly one gated shared expert")
  if (cfg.first_dense_layers or cfg.moe_every != 1) and not arch.has_dense_layers:
    problems.append("every layer must be an MoE layer")
  if cfg.tie_embeddings and cfg.scale_tied_head:
    problems.append("a tied head scaled by d_model**-0.5 (scale_tied_head) is jaxmoe's own")
  if cfg.bias_balancing or cfg.routed_scale != 1.0 or cfg.n_group is not None:
    problems.append("bias balancing, routed_scale and group-limited routing are not part of it")
  if problems:
    raise ConvertError(f"this model cannot be exported as {arch.hf_class}: " + "; ".join(problems))
  out: dict[str, Any] = {
      "architectures": [arch.hf_class], "model_type": arch.model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.attn_head_dim,
      "hidden_act": JAXMOE_TO_HF_ACTIVATION[cfg.activation],
      "max_position_embeddings": cfg.max_seq_len,
      "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
      "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "num_experts_per_tok": cfg.top_k,
      "router_aux_loss_coef": cfg.aux_loss_weight, "dtype": "float32",
  }
  if arch.name == "mixtral":
    out.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.expert_d_ff or cfg.d_ff)
  else:
    out.update(num_experts=cfg.num_experts, norm_topk_prob=renorm)
  if arch.name == "olmoe":
    out.update(intermediate_size=cfg.expert_d_ff or cfg.d_ff, attention_bias=False)
  if arch.has_dense_layers:
    out.update(intermediate_size=cfg.d_ff, moe_intermediate_size=cfg.expert_d_ff or cfg.d_ff,
               decoder_sparse_step=cfg.moe_every,
               mlp_only_layers=list(range(cfg.first_dense_layers)))
  if arch.has_shared_expert:
    out["shared_expert_intermediate_size"] = (cfg.shared_d_ff or cfg.expert_d_ff or cfg.d_ff) \
        if cfg.num_shared_experts else 0
  if arch.qkv_bias_key:
    out[arch.qkv_bias_key] = cfg.qkv_bias
  if arch.name == "qwen3_moe":
    out["attention_bias"] = False
  return out
