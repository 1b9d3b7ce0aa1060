"""The transformer LM: shapes, causality, rotary embeddings, GQA, remat, parameter counts, config checks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_close
from jaxmoe import model as model_lib
from jaxmoe.config import ModelConfig
from jaxmoe.model import (TransformerLM, attention_impl, cross_entropy, embed_lookup, param_counts,
                          rope)

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16,
             num_experts=4, top_k=2, dtype="float32")


def _loss_and_grads(model, tokens):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    logits, stats = nnx.merge(graphdef, params, rest)(tokens)
    return cross_entropy(logits[:, :-1], tokens[:, 1:]) + stats["moe_loss"]

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("ffn,moe_every,act", [("moe", 1, "swiglu"), ("moe", 2, "gelu"),
                                               ("dense", 1, "swiglu"), ("dense", 1, "gelu"),
                                               ("dense", 1, "geglu_tanh")])
def test_shapes_stats_and_param_count(ffn, moe_every, act, rng):
  cfg = ModelConfig(**SMALL, ffn=ffn, moe_every=moe_every, activation=act)
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(rng.integers(0, 64, (3, 16)), jnp.int32)
  logits, stats = model(tokens)
  chex.assert_shape(logits, (3, 16, 64))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite((logits, stats))
  n_moe = {"moe": 2 // moe_every, "dense": 0}[ffn]
  chex.assert_shape(stats["tokens_per_expert"], (n_moe, 4))
  # Each MoE layer routes every token to top_k experts.
  np.testing.assert_allclose(np.asarray(stats["tokens_per_expert"]).sum(-1), 3 * 16 * 2)
  actual = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert param_counts(cfg)["total"] == actual


@pytest.mark.parametrize("act,glu,fn", [
    ("gelu_tanh", False, lambda x: jax.nn.gelu(x, approximate=True)),
    ("gelu", False, lambda x: jax.nn.gelu(x, approximate=False)),
    ("swiglu", True, jax.nn.silu), ("reglu", True, jax.nn.relu)])
def test_dense_mlp_applies_the_configured_activation(act, glu, fn, rng):
  """The dense MLP takes every activation the experts do (MegaBlocks' presets use gelu_tanh)."""
  cfg = ModelConfig(**SMALL, ffn="dense", activation=act)
  mlp = model_lib.DenseMLP(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)
  x = jnp.asarray(rng.standard_normal((5, 32)), jnp.float32)
  h = x @ mlp.gate_up.kernel[...]
  chex.assert_shape(h, (5, (2 if glu else 1) * 48))
  a = fn(h[:, :48]) * h[:, 48:] if glu else fn(h)
  assert_close(mlp(x), a @ mlp.down.kernel[...], jnp.float32)


def test_causal(rng):
  model = TransformerLM(ModelConfig(**SMALL), rngs=nnx.Rngs(1))
  a = rng.integers(0, 64, (2, 16))
  b = a.copy()
  b[:, 10:] = rng.integers(0, 64, (2, 6))
  la, _ = model(jnp.asarray(a, jnp.int32))
  lb, _ = model(jnp.asarray(b, jnp.int32))
  np.testing.assert_array_equal(np.asarray(la[:, :10]), np.asarray(lb[:, :10]))
  assert not np.allclose(np.asarray(la[:, 10:]), np.asarray(lb[:, 10:]))


def test_rope_is_relative(rng):
  """<rope(q, m), rope(k, n)> depends on m - n only, and rope preserves norms."""
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
  def dot(m, n):
    return float(jnp.sum(rope(q, jnp.array([m]), 100.0) * rope(k, jnp.array([n]), 100.0)))
  assert dot(5, 2) == pytest.approx(dot(13, 10), rel=1e-5)
  assert dot(5, 2) != pytest.approx(dot(5, 4), rel=1e-3)
  np.testing.assert_allclose(np.linalg.norm(rope(q, jnp.array([7]), 100.0)), np.linalg.norm(q),
                             rtol=1e-6)


def test_gqa_matches_repeated_kv_heads(rng):
  """Grouped-query attention equals full multi-head attention with each K/V head repeated."""
  cfg = ModelConfig(**SMALL, ffn="dense")
  model = TransformerLM(cfg, rngs=nnx.Rngs(2))
  attn = model.blocks[0].attn
  x = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
  got = attn(x)
  h = cfg.head_dim
  q = attn.q(x).reshape(2, 16, 4, h)
  k, v = jnp.split(attn.kv(x).reshape(2, 16, 4, h), 2, axis=2)
  pos = jnp.arange(16)
  q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
  k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
  s = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(h)
  s = jnp.where(jnp.tril(jnp.ones((16, 16), bool)), s, -jnp.inf)
  want = attn.o(jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, -1), v).reshape(2, 16, 32))
  assert_close(got, want, jnp.float32, factor=10, name="gqa")


def test_remat_same_loss_and_grads(rng):
  tokens = jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32)
  l0, g0 = _loss_and_grads(TransformerLM(ModelConfig(**SMALL), rngs=nnx.Rngs(3)), tokens)
  l1, g1 = _loss_and_grads(TransformerLM(ModelConfig(**SMALL, remat=True), rngs=nnx.Rngs(3)), tokens)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  chex.assert_trees_all_close(g0, g1, rtol=1e-5, atol=1e-7)


def _saved_residuals(cfg, tokens) -> list:
  """The arrays (shapes and dtypes) the VJP of the loss keeps for the backward pass."""
  model = nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def residuals(params, tokens):
    def loss(p):
      logits, stats = nnx.merge(graphdef, p, rest)(tokens)
      return cross_entropy(logits, tokens) + stats["moe_loss"]
    return jax.vjp(loss, params)[1]

  return [a for a in jax.tree.leaves(jax.eval_shape(residuals, params, tokens))
          if hasattr(a, "shape")]


def _residual_bytes(cfg, tokens) -> int:
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in _saved_residuals(cfg, tokens))


def test_remat_skip_keeps_the_last_blocks_activations(rng):
  """remat_skip=1 of 2 blocks: same loss and gradients as full remat, and the backward pass keeps
  more than with every block recomputed, less than with none."""
  tokens = jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32)
  full = ModelConfig(**SMALL, remat=True)
  half = ModelConfig(**SMALL, remat=True, remat_skip=1)
  l0, g0 = _loss_and_grads(TransformerLM(full, rngs=nnx.Rngs(3)), tokens)
  l1, g1 = _loss_and_grads(TransformerLM(half, rngs=nnx.Rngs(3)), tokens)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  chex.assert_trees_all_close(g0, g1, rtol=1e-5, atol=1e-7)
  spec = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  sizes = [_residual_bytes(c, spec) for c in (full, half, ModelConfig(**SMALL))]
  assert sizes[0] < sizes[1] < sizes[2], sizes


@pytest.mark.parametrize("ffn", ["moe", "dense"])
def test_remat_mlp_same_loss_and_grads_less_kept(rng, ffn):
  """remat_mlp recomputes the (expert) MLPs' hidden activations: same loss and gradients, fewer
  residual bytes than without it, more than full remat."""
  tokens = jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32)
  base = ModelConfig(**SMALL, ffn=ffn)
  mlp = ModelConfig(**SMALL, ffn=ffn, remat_mlp=True)
  l0, g0 = _loss_and_grads(TransformerLM(base, rngs=nnx.Rngs(3)), tokens)
  l1, g1 = _loss_and_grads(TransformerLM(mlp, rngs=nnx.Rngs(3)), tokens)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  chex.assert_trees_all_close(g0, g1, rtol=1e-5, atol=1e-7)
  spec = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  sizes = [_residual_bytes(c, spec) for c in (ModelConfig(**SMALL, ffn=ffn, remat=True), mlp, base)]
  assert sizes[0] < sizes[1] < sizes[2], sizes


def test_bf16_compute_float32_params(rng):
  model = TransformerLM(ModelConfig(**{**SMALL, "dtype": "bfloat16"}), rngs=nnx.Rngs(4))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  ref = TransformerLM(ModelConfig(**SMALL), rngs=nnx.Rngs(4))
  tokens = jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32)
  assert_close(model(tokens)[0], ref(tokens)[0], jnp.bfloat16, factor=5, name="bf16 logits")


@pytest.mark.parametrize("override,match", [
    ({"n_heads": 3}, "divisible by n_heads"),
    ({"n_kv_heads": 3}, "divisible by n_kv_heads"),
    ({"ffn": "sparse"}, "ffn must be one of"),
    ({"moe_impl": "magic"}, "moe_impl must be one of"),
    ({"top_k": 5}, "top_k"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"activation": "tanh"}, "activation must be one of"),
    ({"moe_impl": "blocksparse", "block_size": 32}, "multiple of block_size"),
    ({"attention": "flash"}, "attention must be one of"),
    ({"attention": "cudnn"}, "needs dtype bfloat16"),   # SMALL is float32
    ({"remat": True, "remat_skip": 3}, "remat_skip must be an int in"),
    ({"remat_skip": 1}, "needs remat=true"),
    ({"remat_mlp": True, "moe_impl": "scatter"}, "remat_mlp is implemented for"),
    ({"remat_mlp": 1}, "remat_mlp must be true or false"),
    ({"loss_chunks": -1}, r"loss_chunks must be an int in \[0, max_seq_len=16\]"),
    ({"loss_chunks": 17}, r"loss_chunks must be an int in \[0, max_seq_len=16\]"),
])
def test_config_errors(override, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**{**SMALL, **override})


@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_same_loss_and_grads_no_logits_kept(rng, tie):
  """loss_chunks > 0: the training loss (jaxmoe.train.loss_fn) runs the head and the loss fused
  (kernels.cross_entropy.linear_cross_entropy): the same loss and gradients as the logits path, and
  its VJP keeps nothing (B, T, V)-sized."""
  from jaxmoe.train import loss_fn
  tokens = jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32)
  x, y = tokens[:, :-1], tokens[:, 1:]   # T = 15: 4 chunks, the last one padded
  out = {}
  for chunks in (0, 4):
    model = TransformerLM(ModelConfig(**SMALL, tie_embeddings=tie, loss_chunks=chunks),
                          rngs=nnx.Rngs(3))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: loss_fn(graphdef)(p, rest, x, y, False)[0]   # noqa: E731
    out[chunks] = jax.jit(jax.value_and_grad(loss))(params)
    big = [r.shape for r in jax.tree.leaves(jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params))
           if hasattr(r, "shape") and tuple(r.shape) in ((2, 15, 64), (30, 64))]
    assert bool(big) == (chunks == 0), (chunks, big)
  np.testing.assert_allclose(out[4][0], out[0][0], rtol=1e-6)
  chex.assert_trees_all_close(out[4][1], out[0][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("chunk", [8192, 5])   # one chunk; several with a padded tail (21 = 4*5+1)
@pytest.mark.parametrize("compact", [False, True])
def test_embed_lookup_gradient_matches_take(rng, monkeypatch, dtype, chunk, compact):
  """The one-hot-matmul gradient equals the scatter-add gradient of jnp.take, repeated ids
  included (one id taking most tokens), for float32 and bf16 cotangents; over the whole vocabulary
  and (compact, a vocabulary larger than the chunk) over each chunk's distinct ids."""
  monkeypatch.setattr(model_lib, "_EMBED_GRAD_CHUNK", chunk)
  monkeypatch.setattr(model_lib, "_EMBED_COMPACT_CHUNK", chunk if compact else 8192)
  table = jnp.asarray(rng.standard_normal((50, 16)), jnp.float32)
  ids = jnp.asarray(np.where(rng.random((3, 7)) < 0.6, 7, rng.integers(0, 50, (3, 7))), jnp.int32)
  w = jnp.asarray(rng.standard_normal((3, 7, 16)), jnp.float32)

  def loss(lookup, t):
    return jnp.sum((lookup(t, ids) * w.astype(dtype)).astype(jnp.float32) ** 2)

  got = jax.grad(lambda t: loss(lambda t, i: embed_lookup(t, i, dtype), t))(table)
  want = jax.grad(lambda t: loss(lambda t, i: jnp.take(t, i, axis=0).astype(dtype), t))(table)
  assert got.dtype == jnp.float32 and got.shape == table.shape
  out = embed_lookup(table, ids, dtype)
  assert out.dtype == dtype
  np.testing.assert_array_equal(np.asarray(out), np.asarray(table[ids].astype(dtype)))
  # Same float32 sums in another order.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # Rows of ids that never occur get exactly zero gradient.
  unused = np.setdiff1d(np.arange(50), np.asarray(ids))
  assert np.all(np.asarray(got)[unused] == 0)


def test_embed_lookup_compact_gradient_ignores_out_of_range_ids(rng, monkeypatch):
  monkeypatch.setattr(model_lib, "_EMBED_COMPACT_CHUNK", 4)
  table = jnp.asarray(rng.standard_normal((10, 3)), jnp.float32)
  ids = jnp.asarray([[9, -1, 10, 3, 9, 0, 12]], jnp.int32)
  got = jax.grad(lambda t: jnp.sum(embed_lookup(t, ids, jnp.float32)))(table)
  want = np.zeros((10, 3), np.float32)
  want[9] = 2.0
  want[3] = want[0] = 1.0
  np.testing.assert_array_equal(np.asarray(got), want)


def test_attention_impl_choice():
  cfg = ModelConfig(**{**SMALL, "dtype": "bfloat16"})
  # CPU tests: "auto" is XLA's attention; an explicit choice is passed through.
  assert attention_impl(cfg, jnp.bfloat16) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
  assert attention_impl(cfg, jnp.float32) == "xla"
  assert attention_impl(ModelConfig(**{**SMALL, "attention": "xla"}), jnp.bfloat16) == "xla"


@pytest.mark.parametrize("ffn", ["moe", "dense"])
def test_bf16_model_keeps_no_float32_activations_for_the_backward_pass(ffn):
  """The norms, the router's float32 logits, the MoE combine and the loss recompute their float32
  math in the backward pass: of the residuals the loss's VJP keeps, none is a float32 array as
  large as the (tokens, d_model) activations (autodiff alone would keep 6 per layer; the attention
  scores of the XLA attention used on CPU are (B, N, T, T) and not counted)."""
  cfg = ModelConfig(**{**SMALL, "dtype": "bfloat16", "ffn": ffn})
  b, t = 2, 16
  saved = _saved_residuals(cfg, jax.ShapeDtypeStruct((b, t), jnp.int32))
  activation_sized = [a for a in saved if a.dtype == jnp.float32
                      and np.prod(a.shape) >= b * t * cfg.d_model and a.ndim < 4]
  assert not activation_sized, [(a.dtype, a.shape) for a in activation_sized]
  assert any(a.dtype == jnp.bfloat16 and np.prod(a.shape) == b * t * cfg.d_model for a in saved)
