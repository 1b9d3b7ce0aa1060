"""Decoder-only transformer LM (Flax NNX) with MoE or dense feed-forward layers.

Pre-norm blocks:  x += Attn(RMSNorm(x));  x += FFN(RMSNorm(x)),  FFN = MoE (jaxmoe.MoE) in every
`moe_every`-th layer (counting from the last: layers i with (i + 1) % moe_every == 0), a dense
MLP elsewhere and everywhere when ffn="dense". Attention is grouped-query attention with
rotary embeddings through `jax.nn.dot_product_attention`: cuDNN flash attention on GPU for bf16/fp16
(`attention="auto"`), XLA's reference attention elsewhere (it materializes the (B, N, T, T) scores).
Compute runs in `dtype` (bf16 by default) on float32 master parameters; the LM head's matmul runs
in `dtype` (float32 accumulation) and so do its logits; the loss does its math in float32
(kernels.cross_entropy). The token embedding's gradient is a one-hot matmul (`embed_lookup`), not
XLA's scatter-add: in a profile of the Small dense step on the H100 that scatter took 18.6 ms of
62 ms, and its atomic adds make the sum's order, and so training, nondeterministic. (Alone, on
the corpus's ids, the scatter-add takes 0.28 ms against 2.4 ms for this gradient: what made it
slow in the step is not established.)

Shapes: tokens (B, T) int32 -> logits (B, T, vocab) in `dtype`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kernels import cross_entropy as ce_lib
from kernels.hidden import hidden
from jaxmoe.config import ACTIVATIONS, DTYPES, ModelConfig
from jaxmoe.experts import activation_fn
from jaxmoe.moe import MoE, MoEStats
from jaxmoe.recompute import checkpointed


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (half-split form). x (B, T, N, H), positions (T,) -> same shape and dtype."""
  h = x.shape[-1]
  freqs = theta ** (-jnp.arange(0, h // 2, dtype=jnp.float32) * 2.0 / h)   # (H/2,)
  angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]         # (T, H/2)
  sin = jnp.sin(angles)[None, :, None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_impl(cfg: ModelConfig, dtype) -> str:
  """The `jax.nn.dot_product_attention` implementation for this config and compute dtype.

  "auto" picks cuDNN flash attention when the default backend is a GPU and the dtype and head dim
  are ones cuDNN takes; otherwise XLA's attention (which materializes the scores: fine on CPU).
  """
  if cfg.attention != "auto":
    return cfg.attention
  cudnn_ok = (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
              and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128)
  return "cudnn" if cudnn_ok and jax.default_backend() == "gpu" else "xla"


# Tokens per one-hot matmul in embed_lookup's backward: bounds its (chunk, vocab) one-hot operand.
_EMBED_GRAD_CHUNK = 8192
# Above this vocabulary a chunk's one-hot is taken over the chunk's own distinct ids instead.
_EMBED_COMPACT_CHUNK = 4096


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def embed_lookup(table: jax.Array, ids: jax.Array, dtype: Any) -> jax.Array:
  """table (V, D), ids (...) int -> table[ids].astype(dtype) (..., D), one-hot-matmul gradient.

  The backward computes d_table = onehot(ids)^T @ d_out in chunks of tokens, with operands in
  `dtype` (the cotangent arrives in it) and float32 accumulation, on the tensor cores instead of
  XLA's scatter-add, whose atomic adds sum in no fixed order (see the module docstring for its
  timings). A small vocabulary (V <= _EMBED_COMPACT_CHUNK) takes the one-hot over all V
  ids, 2 V D FLOPs per token. A large one (GPT-2's 50304) would make that matmul as large as the
  LM head's, so each chunk of C tokens takes its one-hot over its own distinct ids (jnp.unique,
  at most C), 2 C D FLOPs per token, and adds the C summed rows into d_table with a scatter whose
  indices are unique (no atomics contend). Out-of-range ids give zero rows.
  """
  return jnp.take(table, ids, axis=0).astype(dtype)


def _embed_fwd(table, ids, dtype):
  # A zero-width slice carries the table's vocab size and dtype (residuals must be arrays).
  return jnp.take(table, ids, axis=0).astype(dtype), (ids, jnp.zeros((table.shape[0], 0), table.dtype))


def _embed_bwd(dtype, res, g):
  ids, table_like = res
  vocab, table_dtype = table_like.shape[0], table_like.dtype
  d = g.shape[-1]
  ids = ids.reshape(-1).astype(jnp.int32)
  # Out-of-range ids (and the padding below) become `vocab`: a zero one-hot row, a dropped scatter.
  ids = jnp.where((ids >= 0) & (ids < vocab), ids, vocab)
  g = g.reshape(-1, d)
  n = ids.shape[0]
  compact = vocab > _EMBED_COMPACT_CHUNK
  chunk = min(n, _EMBED_COMPACT_CHUNK if compact else _EMBED_GRAD_CHUNK)
  pad = (-n) % chunk
  ids = jnp.pad(ids, (0, pad), constant_values=vocab).reshape(-1, chunk)
  g = jnp.pad(g, ((0, pad), (0, 0))).reshape(-1, chunk, d)
  # A float32 model's cotangents multiply at full precision (the GPU default would be TF32);
  # bf16/fp16 ones go to the tensor cores as they are (one-hot entries are exact in any dtype).
  precision = jax.lax.Precision.HIGHEST if g.dtype == jnp.float32 else None

  def onehot_t_matmul(cols, g_c, width):
    onehot = jax.nn.one_hot(cols, width, dtype=g_c.dtype)             # (chunk, width)
    return jax.lax.dot_general(onehot, g_c, (((0,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)    # (width, d)

  def body(acc, xs):
    ids_c, g_c = xs
    if not compact:
      return acc + onehot_t_matmul(ids_c, g_c, vocab), None
    # uniq: the chunk's distinct ids, ascending, padded with `vocab`; inv: each token's slot.
    uniq, inv = jnp.unique(ids_c, size=chunk, fill_value=vocab, return_inverse=True)
    rows = onehot_t_matmul(inv.reshape(-1), g_c, chunk)
    # The barrier makes XLA write uniq before the scatter: fused into the scatter, unique's
    # index arithmetic (reductions over the chunk) was redone per updated element, 1.5 ms per
    # 4096-token chunk on the H100 instead of microseconds.
    uniq, rows = jax.lax.optimization_barrier((uniq, rows))
    return acc.at[uniq].add(rows, mode="drop", unique_indices=True, indices_are_sorted=True), None

  acc, _ = jax.lax.scan(body, jnp.zeros((vocab, d), jnp.float32), (ids, g))
  return acc.astype(table_dtype), None


embed_lookup.defvjp(_embed_fwd, _embed_bwd)


def _dense(rngs, d_in, d_out, dtype, bias: bool = False) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                    rngs=rngs)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with rotary embeddings. x (B, T, D) -> (B, T, D)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype):
    self.cfg = cfg
    h = cfg.head_dim
    self.q = _dense(rngs, cfg.d_model, cfg.n_heads * h, dtype, bias=cfg.qkv_bias)
    # K and V in one projection: columns [0, n_kv h) are K, [n_kv h, 2 n_kv h) are V.
    self.kv = _dense(rngs, cfg.d_model, 2 * cfg.n_kv_heads * h, dtype, bias=cfg.qkv_bias)
    self.o = _dense(rngs, cfg.n_heads * h, cfg.d_model, dtype)
    norm = lambda width: nnx.RMSNorm(width, epsilon=cfg.norm_eps, dtype=dtype,
                                     param_dtype=jnp.float32, rngs=rngs)
    if cfg.qk_norm == "head":
      self.q_norm, self.k_norm = norm(h), norm(h)
    elif cfg.qk_norm == "full":
      self.q_norm, self.k_norm = norm(cfg.n_heads * h), norm(cfg.n_kv_heads * h)
    else:
      self.q_norm = self.k_norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, t, _ = x.shape
    h = cfg.head_dim
    q = self.q(x)
    k, v = jnp.split(self.kv(x), 2, axis=-1)
    if cfg.qk_norm == "full":   # over all heads at once, before the split into heads
      q, k = checkpointed(self.q_norm, q), checkpointed(self.k_norm, k)
    q = q.reshape(b, t, cfg.n_heads, h)
    k = k.reshape(b, t, cfg.n_kv_heads, h)
    v = v.reshape(b, t, cfg.n_kv_heads, h)
    if cfg.qk_norm == "head":
      q, k = checkpointed(self.q_norm, q), checkpointed(self.k_norm, k)
    pos = jnp.arange(t)
    q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
    # K/V with fewer heads than Q: dot_product_attention broadcasts them over query-head groups.
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                       implementation=attention_impl(cfg, q.dtype))
    return self.o(out.reshape(b, t, cfg.n_heads * h))


class DenseMLP(nnx.Module):
  """MLP d_model -> d_ff -> d_model (the dense baseline's feed-forward): a GLU or a plain MLP."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype):
    self.glu = ACTIVATIONS[cfg.activation]
    self.activation = cfg.activation
    self.gate_up = _dense(rngs, cfg.d_model, (2 if self.glu else 1) * cfg.d_ff, dtype)
    self.down = _dense(rngs, cfg.d_ff, cfg.d_model, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    # act(gate) [* up] in float32 on the matmul's output dtype, recomputed from the 16-bit gate
    # and up in the backward pass (kernels.hidden), as in the experts.
    h = self.gate_up(x)
    act = activation_fn(self.activation)
    if self.glu:
      gate, up = jnp.split(h, 2, axis=-1)
      a = hidden(act, gate, up)
    else:
      a = hidden(act, h)
    return self.down(a.astype(x.dtype))


class Block(nnx.Module):
  """Pre-norm transformer block. x (B, T, D) -> (x, MoEStats or None)."""

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs, dtype):
    self.attn_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dtype,
                                 param_dtype=jnp.float32, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs, dtype=dtype)
    self.ffn_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dtype,
                                param_dtype=jnp.float32, rngs=rngs)
    self.is_moe = cfg.is_moe_layer(layer)
    self.remat_mlp = cfg.remat_mlp     # the MoE layer gets it as MoEConfig.remat_experts
    if self.is_moe:
      self.ffn = MoE(cfg.moe_config(), rngs=rngs, dtype=dtype, param_dtype=jnp.float32)
    else:
      self.ffn = DenseMLP(cfg, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array, deterministic: bool = True):
    # The norms run under jax.checkpoint: autodiff of nnx.RMSNorm with a 16-bit x keeps three
    # float32 arrays of x's shape (x squared, the centred x, the scaled rsqrt broadcast; at the
    # Small preset's 65536 tokens x 768, 0.6 GB per norm, 25 norms a step), where recomputing
    # from x is one fused elementwise pass. With remat_mlp the dense MLP's two (tokens, d_ff)
    # hidden arrays are likewise recomputed, for one more first matmul. Same operations, same
    # numbers.
    x = x + self.attn(checkpointed(self.attn_norm, x))
    h = checkpointed(self.ffn_norm, x)
    if self.is_moe:
      y, stats = self.ffn(h, deterministic=deterministic)
      return x + y, stats
    return x + (checkpointed(self.ffn, h) if self.remat_mlp else self.ffn(h)), None


class TransformerLM(nnx.Module):
  """The LM. __call__(tokens (B, T) int) -> (logits (B, T, V) in cfg.dtype, ModelStats dict).

  The stats dict holds float32 values: "aux_loss", "z_loss", "moe_loss" (the weighted sum to add
  to the objective), summed over MoE layers; "dropped_fraction" averaged over MoE layers; and
  "tokens_per_expert" (num_moe_layers, E) (an empty (0, E) array for a dense model).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = DTYPES[cfg.dtype]
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=jnp.float32,
                           embedding_init=nnx.initializers.normal(stddev=1.0), rngs=rngs)
    self.blocks = nnx.List([Block(cfg, i, rngs=rngs, dtype=dtype) for i in range(cfg.n_layers)])
    self.final_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dtype,
                                  param_dtype=jnp.float32, rngs=rngs)
    self.lm_head = None if cfg.tie_embeddings else _dense(rngs, cfg.d_model, cfg.vocab_size, dtype)

  def __call__(self, tokens: jax.Array, deterministic: bool = True):
    x, stats = self.features(tokens, deterministic)
    # Operands and logits in the compute dtype (float32 accumulation inside the matmul): a float32
    # output would make the backward's cotangent float32 and its two matmuls TF32 (about a third
    # of bf16's rate on the H100), and float32 logits are 4 B per (token, vocab) entry written and
    # read again (kernels.cross_entropy does the loss's float32 math on the 16-bit logits).
    return jnp.dot(x, self.head_weight(x.dtype)), stats

  def head_weight(self, dtype: Any) -> jax.Array:
    """The LM head's (d_model, vocab) weight in `dtype`: logits = features @ head_weight."""
    if self.lm_head is not None:
      return self.lm_head.kernel[...].astype(dtype)
    # Tied head: unit-variance embeddings, so scale by 1/sqrt(d) to start with O(1) logits; the
    # scale is folded into the table's cast to the compute dtype (one rounding).
    table = self.embed.embedding[...]
    return (table * self.cfg.d_model ** -0.5 if self.cfg.scale_tied_head else table).astype(dtype).T

  def features(self, tokens: jax.Array, deterministic: bool = True):
    """tokens (B, T) -> (the final norm's output (B, T, d_model) in cfg.dtype, stats): all of the
    model but the head (the fused loss, kernels.cross_entropy.linear_cross_entropy, takes them)."""
    cfg = self.cfg
    if tokens.ndim != 2:
      raise ValueError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
    if tokens.shape[1] > cfg.max_seq_len:
      raise ValueError(f"tokens seq length {tokens.shape[1]} exceeds max_seq_len={cfg.max_seq_len}")
    x = embed_lookup(self.embed.embedding[...], tokens, self.embed.dtype)
    stats = []
    for i, block in enumerate(self.blocks):
      if cfg.remat and i < cfg.n_layers - cfg.remat_skip:
        # Recompute the block's activations in the backward pass instead of storing them; the
        # last remat_skip blocks keep theirs (each skips one block's forward recompute for ~one
        # block's activations of memory).
        x, s = checkpointed(block, x, apply=lambda b, x: b(x, deterministic))
      else:
        x, s = block(x, deterministic)
      if s is not None:
        stats.append(s)
    x = checkpointed(self.final_norm, x)   # as the blocks' norms
    return x, _summarize(stats, cfg.num_experts)


def _summarize(stats: list[MoEStats], num_experts: int) -> dict[str, jax.Array]:
  if not stats:
    z = jnp.zeros((), jnp.float32)
    return {"aux_loss": z, "z_loss": z, "moe_loss": z, "dropped_fraction": z,
            "tokens_per_expert": jnp.zeros((0, num_experts), jnp.float32)}
  return {
      "aux_loss": sum(s.aux_loss for s in stats),
      "z_loss": sum(s.z_loss for s in stats),
      "moe_loss": sum(s.loss for s in stats),
      "dropped_fraction": sum(s.dropped_fraction for s in stats) / len(stats),
      "tokens_per_expert": jnp.stack([s.tokens_per_expert.astype(jnp.float32) for s in stats]),
  }


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy (float32 scalar). logits (B, T, V) in any float dtype (the
  model's compute dtype; float32 math inside, see kernels.cross_entropy), targets (B, T) int."""
  return jnp.mean(ce_lib.cross_entropy(logits, targets.astype(jnp.int32)))


def update_router_biases(model: TransformerLM, tokens_per_expert: jax.Array, rate: float) -> None:
  """Aux-loss-free balancing: one bias step per MoE layer. tokens_per_expert (num_moe_layers, E)."""
  i = 0
  for block in model.blocks:
    if block.is_moe:
      block.ffn.update_router_bias(tokens_per_expert[i], rate)
      i += 1


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts: "total", "active" (per token: top_k of E experts), "embedding"."""
  d, h = cfg.d_model, cfg.head_dim
  attn = d * cfg.n_heads * h + d * 2 * cfg.n_kv_heads * h + cfg.n_heads * h * d
  if cfg.qkv_bias:
    attn += (cfg.n_heads + 2 * cfg.n_kv_heads) * h
  attn += {"none": 0, "head": 2 * h, "full": (cfg.n_heads + cfg.n_kv_heads) * h}[cfg.qk_norm]
  norms = 2 * d
  mats = 3 if ACTIVATIONS[cfg.activation] else 2
  dense_ffn = mats * d * cfg.d_ff
  e_ff = cfg.expert_d_ff or cfg.d_ff
  expert = mats * d * e_ff
  # The shared experts run on every token: the router's parameters count them as always active.
  shared = cfg.num_shared_experts * mats * d * (cfg.shared_d_ff or e_ff)
  router = d * cfg.num_experts + shared + (d if cfg.shared_expert_gate and shared else 0)
  total = active = 0
  for i in range(cfg.n_layers):
    total += attn + norms
    active += attn + norms
    if cfg.is_moe_layer(i):
      total += router + cfg.num_experts * expert
      active += router + cfg.top_k * expert
    else:
      total += dense_ffn
      active += dense_ffn
  emb = cfg.vocab_size * d
  head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
  total += emb + head + d
  active += emb + head + d
  return {"total": total, "active": active, "embedding": emb}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token on the active parameters: 6 * (active non-embedding params + LM
  head matmul) + attention scores/values 6 * 2 * n_layers * seq_len * d_model / 2 (causal half)."""
  counts = param_counts(cfg)
  # A tied embedding is also the LM head's matmul; an untied head is already in "active".
  head = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
  matmul_params = counts["active"] - counts["embedding"] + head
  attn = 6 * cfg.n_layers * seq_len * cfg.d_model  # 12 * L * T * D, halved by the causal mask
  return 6.0 * matmul_params + attn
