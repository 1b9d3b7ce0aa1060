"""A compact causal language model whose attention is Mixture-of-Attention or standard attention of
the same active size, and its training loop (experiments.reproduce_scattermoe compares them).

Blocks (pre-norm): x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x)), the MLP a SwiGLU
(jaxmoe.model.DenseMLP). Attn is one of ATTENTIONS:
  "moa": jaxmoe.moa.MoA: E experts, each h query heads with its own query and output projection,
         top-k experts per token, h key/value heads shared by all: k*h active query heads;
  "mha": standard multi-head attention with k*h heads of the same head_dim, each with its own
         key and value (the same active query heads and head size);
  "gqa": k*h query heads sharing h key/value heads: MoA's active projections exactly, no router.
All three run the same attention core (jaxmoe.moa.attention: causal softmax(q k^T / sqrt(dh)) v,
float32 softmax), so they differ only in their projections and routing. Positions are learned
absolute embeddings added to the input: MoA computes its queries inside its kernels and takes no
rotary positions, so no variant gets them. The token embedding is tied to the LM head (scaled by
d_model^-0.5, as in jaxmoe's models); bf16 compute on float32 parameters.

Why not jaxmoe.model: its attention is rotary grouped-query attention through cuDNN, and MoA has
no rotary hook; wiring MoA in would add model fields, presets and checkpoint formats for a
comparison that needs neither.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmoe import data as data_lib
from jaxmoe.config import ModelConfig
from jaxmoe.moa import MOA_IMPLS, MoA, MoAConfig, attention
from jaxmoe.model import DenseMLP, cross_entropy, embed_lookup

ATTENTIONS = ("moa", "mha", "gqa")


def _check_positive_ints(obj) -> None:
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
      raise ValueError(f"{type(obj).__name__}.{f.name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """The attention layer of every variant. heads: query heads per MoA expert (and the key/value
  heads of MoA and "gqa"); top_k * heads query heads of head_dim are active per token in all."""

  d_model: int
  num_experts: int
  top_k: int
  heads: int
  head_dim: int
  moa_impl: str = "scatter"
  backend: str | None = None   # kernels backend of MoA (None: the platform's default)

  def __post_init__(self):
    _check_positive_ints(self)
    if self.moa_impl not in MOA_IMPLS:
      raise ValueError(f"AttentionConfig.moa_impl must be one of {MOA_IMPLS}, "
                       f"got {self.moa_impl!r}")

  @property
  def active_heads(self) -> int:
    return self.top_k * self.heads

  def moa_config(self) -> MoAConfig:
    return MoAConfig(d_model=self.d_model, num_heads=self.heads, head_dim=self.head_dim,
                     num_experts=self.num_experts, top_k=self.top_k, impl=self.moa_impl,
                     backend=self.backend)


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """The compact LM around an AttentionConfig (its d_model is the model's)."""

  vocab_size: int
  n_layers: int
  d_ff: int
  seq_len: int
  attention: AttentionConfig

  def __post_init__(self):
    _check_positive_ints(self)

  @property
  def d_model(self) -> int:
    return self.attention.d_model

  def mlp_config(self) -> ModelConfig:
    """The jaxmoe ModelConfig DenseMLP reads (d_model, d_ff, activation)."""
    a = self.attention
    return ModelConfig(vocab_size=self.vocab_size, d_model=a.d_model, n_layers=self.n_layers,
                       n_heads=a.active_heads, n_kv_heads=a.heads, d_ff=self.d_ff,
                       ffn="dense", activation="swiglu", max_seq_len=self.seq_len)


def _linear(rngs: nnx.Rngs, d_in: int, d_out: int, dtype, param_dtype) -> nnx.Linear:
  # Fan-in scaled, as MoA's own projections and jaxmoe.model's dense layers.
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                    rngs=rngs)


class DenseAttention(nnx.Module):
  """Causal attention with q_heads query heads sharing kv_heads key/value heads (q_heads ==
  kv_heads: multi-head attention), through MoA's attention core. x (B, S, d) -> (B, S, d)."""

  def __init__(self, d_model: int, q_heads: int, kv_heads: int, head_dim: int, *,
               rngs: nnx.Rngs, dtype, param_dtype=jnp.float32):
    if q_heads % kv_heads:
      raise ValueError(f"q_heads={q_heads} must be a multiple of kv_heads={kv_heads}")
    self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
    linear = lambda d_in, d_out: _linear(rngs, d_in, d_out, dtype, param_dtype)
    self.q = linear(d_model, q_heads * head_dim)
    self.k = linear(d_model, kv_heads * head_dim)
    self.v = linear(d_model, kv_heads * head_dim)
    self.o = linear(q_heads * head_dim, d_model)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, s, _ = x.shape
    g, kv, dh = self.q_heads // self.kv_heads, self.kv_heads, self.head_dim
    # Query head j * kv + i reads key/value head i: MoA's layout with the g groups as its k slots.
    q = self.q(x).reshape(b, s, g, kv, dh)
    o = attention(q, self.k(x).reshape(b, s, kv, dh), self.v(x).reshape(b, s, kv, dh), causal=True)
    return self.o(o.reshape(b, s, self.q_heads * dh))


def make_attention(cfg: AttentionConfig, kind: str, *, rngs: nnx.Rngs, dtype,
                   param_dtype=jnp.float32) -> nnx.Module:
  """The attention layer of `kind` (ATTENTIONS); MoA's __call__ returns (y, stats), the dense
  ones y (attention_output takes either)."""
  if kind == "moa":
    return MoA(cfg.moa_config(), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
  if kind in ("mha", "gqa"):
    kv_heads = cfg.active_heads if kind == "mha" else cfg.heads
    return DenseAttention(cfg.d_model, cfg.active_heads, kv_heads, cfg.head_dim, rngs=rngs,
                          dtype=dtype, param_dtype=param_dtype)
  raise ValueError(f"attention must be one of {ATTENTIONS}, got {kind!r}")


def attention_output(layer: nnx.Module, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(y, the auxiliary loss to add to the objective: MoA's router losses, 0 for dense)."""
  if isinstance(layer, MoA):
    y, stats = layer(x)
    return y, stats.loss
  return layer(x), jnp.zeros((), jnp.float32)


def active_attention_params(cfg: AttentionConfig, kind: str) -> int:
  """Attention weights one token's forward reads (MoA: its k experts' query and output
  projections, the shared keys and values, the router)."""
  d, hd, qd = cfg.d_model, cfg.heads * cfg.head_dim, cfg.active_heads * cfg.head_dim
  if kind == "moa":
    return cfg.top_k * 2 * d * hd + 2 * d * hd + d * cfg.num_experts
  return 2 * d * qd + 2 * d * (qd if kind == "mha" else hd)


class Block(nnx.Module):
  def __init__(self, cfg: LMConfig, kind: str, *, rngs: nnx.Rngs, dtype):
    norm = lambda: nnx.RMSNorm(cfg.d_model, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.attn_norm, self.mlp_norm = norm(), norm()
    self.attn = make_attention(cfg.attention, kind, rngs=rngs, dtype=dtype)
    self.mlp = DenseMLP(cfg.mlp_config(), rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    a, aux = attention_output(self.attn, self.attn_norm(x))
    x = x + a
    return x + self.mlp(self.mlp_norm(x)), aux


class LM(nnx.Module):
  """tokens (B, S) int -> (logits (B, S, V) bf16, the attention layers' summed auxiliary loss)."""

  def __init__(self, cfg: LMConfig, kind: str, *, rngs: nnx.Rngs):
    dtype = jnp.bfloat16
    self.cfg, self.dtype = cfg, dtype
    self.embed = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (cfg.vocab_size,
                                                                       cfg.d_model)))
    # Half the token embedding's scale, as GPT-2's position table is to its token table.
    self.pos = nnx.Param(nnx.initializers.normal(0.5)(rngs.params(), (cfg.seq_len, cfg.d_model)))
    self.blocks = nnx.List([Block(cfg, kind, rngs=rngs, dtype=dtype)
                            for _ in range(cfg.n_layers)])
    self.final_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    s = tokens.shape[1]
    table = self.embed[...]
    x = embed_lookup(table, tokens, self.dtype) + self.pos[...][:s].astype(self.dtype)
    aux = jnp.zeros((), jnp.float32)
    for block in self.blocks:
      x, a = block(x)
      aux = aux + a
    x = self.final_norm(x)
    return jnp.dot(x, (table * self.cfg.d_model ** -0.5).astype(self.dtype).T), aux


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  steps: int
  batch_size: int
  lr: float
  warmup_steps: int
  eval_every: int
  eval_batches: int
  log_every: int
  seed: int = 0


def train(cfg: LMConfig, kind: str, train_tokens: np.ndarray, val_tokens: np.ndarray,
          ts: TrainSettings, log: Callable[[str], None] = print) -> dict:
  """Trains the LM with `kind` attention; every variant sees the same batches (data.Batches with
  ts.seed), the same initial seed and the same AdamW schedule. Returns the training loss per
  logging interval, the validation loss at step 0 and every eval_every steps (the same
  eval_batches validation batches each time), the median step time and the parameter counts."""
  model = LM(cfg, kind, rngs=nnx.Rngs(ts.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  schedule = optax.warmup_cosine_decay_schedule(0.0, ts.lr, ts.warmup_steps, ts.steps,
                                                end_value=0.1 * ts.lr)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1))
  opt_state = tx.init(params)

  def losses(p, x, y):
    logits, aux = nnx.merge(graphdef, p, rest)(x)
    ce = cross_entropy(logits, y)
    return ce + aux, ce

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, o, x, y):
    (_, ce), grads = jax.value_and_grad(losses, has_aux=True)(p, x, y)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, ce

  @jax.jit
  def val_loss(p, x, y):
    return losses(p, x, y)[1]

  batches = data_lib.Batches(train_tokens, ts.batch_size, cfg.seq_len, seed=ts.seed)
  val = data_lib.Batches(val_tokens, ts.batch_size, cfg.seq_len, seed=ts.seed + 1)
  val_set = [val.batch(i) for i in range(ts.eval_batches)]

  def evaluate(p) -> float:
    return float(np.mean([float(val_loss(p, x, y)) for x, y in val_set]))

  curve, train_curve, step_ms, pending = [{"step": 0, "val_loss": evaluate(params)}], [], [], []
  t0 = time.perf_counter()
  for i in range(1, ts.steps + 1):
    x, y = next(batches)
    params, opt_state, ce = step(params, opt_state, x, y)
    pending.append(ce)
    if i % ts.log_every == 0 or i == ts.steps:
      train_loss = float(np.mean(jax.device_get(pending)))   # blocks: the interval is done
      dt = time.perf_counter() - t0
      if i > ts.log_every:   # the first interval holds the step's compilation
        step_ms.append(1e3 * dt / len(pending))
      train_curve.append({"step": i, "train_loss": train_loss})
      pending = []
      if i % ts.eval_every == 0 or i == ts.steps:
        curve.append({"step": i, "val_loss": evaluate(params)})
        log(f"  {kind} step {i}: train {train_loss:.3f}  val {curve[-1]['val_loss']:.3f}")
      t0 = time.perf_counter()   # evaluation time is not step time
  ms = statistics.median(step_ms) if step_ms else None
  return {"attention": kind, "val_curve": curve, "train_curve": train_curve,
          "final_val_loss": curve[-1]["val_loss"], "median_step_ms": ms,
          "tokens_per_s": None if ms is None else ts.batch_size * cfg.seq_len / (ms * 1e-3),
          "params": int(sum(np.prod(v.shape) for v in jax.tree.leaves(params))),
          "active_attention_params_per_layer": active_attention_params(cfg.attention, kind)}
