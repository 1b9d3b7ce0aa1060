"""Tensor names and layouts: Hugging Face checkpoints <-> jaxmoe's TransformerLM parameters.

Hugging Face stores a linear layer's weight as (out, in); jaxmoe's kernels are (in, out). jaxmoe
fuses K and V into one projection (columns [K | V]) and the dense MLP's gate and up (columns
[gate | up]), and stacks experts into (E, in, out) arrays. Each direction is one function over
the same table of layer parts, so import and export cannot disagree.

Expert tensors may come per expert (`experts.{e}.gate_proj.weight`, the hub layout) or fused
(`experts.gate_up_proj` (E, 2I, H) and `experts.down_proj` (E, H, I), what transformers 5 holds in
memory); import takes either, export writes the hub layout.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jaxmoe.hf.architectures import Arch, ConvertError

# Buffers some checkpoints carry that are recomputed, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

Params = dict[tuple, np.ndarray]     # jaxmoe parameter path (as in the nnx State) -> array


def _t(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.swapaxes(w, -1, -2))


def to_jaxmoe(arch: Arch, cfg, get: Callable[[str], np.ndarray], has: Callable[[str], bool]
              ) -> Params:
  """jaxmoe parameters from a checkpoint's tensors (get(name) -> array, has(name) -> bool)."""
  p: Params = {("embed", "embedding"): get("model.embed_tokens.weight"),
               ("final_norm", "scale"): get("model.norm.weight")}
  if not cfg.tie_embeddings:
    p[("lm_head", "kernel")] = _t(get("lm_head.weight"))
  for i in range(cfg.n_layers):
    pre, b = f"model.layers.{i}.", ("blocks", i)
    att = pre + "self_attn."
    p[b + ("attn_norm", "scale")] = get(pre + "input_layernorm.weight")
    p[b + ("ffn_norm", "scale")] = get(pre + "post_attention_layernorm.weight")
    p[b + ("attn", "q", "kernel")] = _t(get(att + "q_proj.weight"))
    p[b + ("attn", "kv", "kernel")] = np.concatenate(
        [_t(get(att + "k_proj.weight")), _t(get(att + "v_proj.weight"))], axis=1)
    p[b + ("attn", "o", "kernel")] = _t(get(att + "o_proj.weight"))
    if cfg.qkv_bias:
      p[b + ("attn", "q", "bias")] = get(att + "q_proj.bias")
      p[b + ("attn", "kv", "bias")] = np.concatenate([get(att + "k_proj.bias"),
                                                      get(att + "v_proj.bias")])
    if cfg.qk_norm != "none":
      p[b + ("attn", "q_norm", "scale")] = get(att + "q_norm.weight")
      p[b + ("attn", "k_norm", "scale")] = get(att + "k_norm.weight")
    if cfg.is_moe_layer(i):
      moe, f = pre + arch.moe_module + ".", b + ("ffn",)
      p[f + ("router", "kernel")] = _t(get(moe + "gate.weight"))
      gate_n, up_n, down_n = arch.expert_names
      if has(moe + "experts.gate_up_proj"):
        gate_up = get(moe + "experts.gate_up_proj")               # (E, 2I, H)
        half = gate_up.shape[1] // 2
        p[f + ("experts", "w_gate")] = _t(gate_up[:, :half])
        p[f + ("experts", "w_up")] = _t(gate_up[:, half:])
        p[f + ("experts", "w_out")] = _t(get(moe + "experts.down_proj"))   # (E, H, I)
      else:
        stack = lambda n: np.stack([_t(get(f"{moe}experts.{e}.{n}.weight"))
                                    for e in range(cfg.num_experts)])
        p[f + ("experts", "w_gate")] = stack(gate_n)
        p[f + ("experts", "w_up")] = stack(up_n)
        p[f + ("experts", "w_out")] = stack(down_n)
      if cfg.num_shared_experts:
        sh = moe + "shared_expert."
        p[f + ("shared", "w_gate")] = _t(get(sh + "gate_proj.weight"))
        p[f + ("shared", "w_up")] = _t(get(sh + "up_proj.weight"))
        p[f + ("shared", "w_out")] = _t(get(sh + "down_proj.weight"))
        if cfg.shared_expert_gate:
          p[f + ("shared_gate",)] = _t(get(moe + "shared_expert_gate.weight"))
    else:
      mlp = pre + "mlp."
      p[b + ("ffn", "gate_up", "kernel")] = np.concatenate(
          [_t(get(mlp + "gate_proj.weight")), _t(get(mlp + "up_proj.weight"))], axis=1)
      p[b + ("ffn", "down", "kernel")] = _t(get(mlp + "down_proj.weight"))
  return p


def to_hf(arch: Arch, cfg, p: Params) -> dict[str, np.ndarray]:
  """A checkpoint's tensors (hub names and layouts) from jaxmoe parameters: to_jaxmoe inverted."""
  out = {"model.embed_tokens.weight": p[("embed", "embedding")],
         "model.norm.weight": p[("final_norm", "scale")]}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = _t(p[("lm_head", "kernel")])
  kv_width = cfg.n_kv_heads * cfg.head_dim
  for i in range(cfg.n_layers):
    pre, b = f"model.layers.{i}.", ("blocks", i)
    att = pre + "self_attn."
    out[pre + "input_layernorm.weight"] = p[b + ("attn_norm", "scale")]
    out[pre + "post_attention_layernorm.weight"] = p[b + ("ffn_norm", "scale")]
    out[att + "q_proj.weight"] = _t(p[b + ("attn", "q", "kernel")])
    kv = p[b + ("attn", "kv", "kernel")]
    out[att + "k_proj.weight"] = _t(kv[:, :kv_width])
    out[att + "v_proj.weight"] = _t(kv[:, kv_width:])
    out[att + "o_proj.weight"] = _t(p[b + ("attn", "o", "kernel")])
    if cfg.qkv_bias:
      out[att + "q_proj.bias"] = p[b + ("attn", "q", "bias")]
      kv_b = p[b + ("attn", "kv", "bias")]
      out[att + "k_proj.bias"], out[att + "v_proj.bias"] = kv_b[:kv_width], kv_b[kv_width:]
    if cfg.qk_norm != "none":
      out[att + "q_norm.weight"] = p[b + ("attn", "q_norm", "scale")]
      out[att + "k_norm.weight"] = p[b + ("attn", "k_norm", "scale")]
    if cfg.is_moe_layer(i):
      moe, f = pre + arch.moe_module + ".", b + ("ffn",)
      out[moe + "gate.weight"] = _t(p[f + ("router", "kernel")])
      for name, key in zip(arch.expert_names, ("w_gate", "w_up", "w_out")):
        w = p[f + ("experts", key)]
        for e in range(cfg.num_experts):
          out[f"{moe}experts.{e}.{name}.weight"] = _t(w[e])
      if cfg.num_shared_experts:
        sh = moe + "shared_expert."
        out[sh + "gate_proj.weight"] = _t(p[f + ("shared", "w_gate")])
        out[sh + "up_proj.weight"] = _t(p[f + ("shared", "w_up")])
        out[sh + "down_proj.weight"] = _t(p[f + ("shared", "w_out")])
        if cfg.shared_expert_gate:
          out[moe + "shared_expert_gate.weight"] = _t(p[f + ("shared_gate",)])
    else:
      mlp = pre + "mlp."
      gate_up = p[b + ("ffn", "gate_up", "kernel")]
      out[mlp + "gate_proj.weight"] = _t(gate_up[:, :cfg.d_ff])
      out[mlp + "up_proj.weight"] = _t(gate_up[:, cfg.d_ff:])
      out[mlp + "down_proj.weight"] = _t(p[b + ("ffn", "down", "kernel")])
  return out


def unused(names: set[str], used: set[str]) -> list[str]:
  """Tensors of a checkpoint that the conversion did not read (besides recomputed buffers)."""
  return sorted(n for n in names - used if not n.endswith(IGNORED_SUFFIXES))


__all__ = ["ConvertError", "Params", "to_hf", "to_jaxmoe", "unused"]
