"""experiments.moa_lm: the dense attention's head layout against a per-head reference, and the
compact LM's causality with each attention."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_close
from experiments import moa_lm

ATT = moa_lm.AttentionConfig(d_model=16, num_experts=4, top_k=2, heads=2, head_dim=8)


@pytest.mark.parametrize("kind, kv_heads", [("mha", 4), ("gqa", 2)])
def test_dense_attention_matches_per_head_reference(kind, kv_heads, rng):
  layer = moa_lm.make_attention(ATT, kind, rngs=nnx.Rngs(0), dtype=jnp.float32)
  x = rng.standard_normal((2, 5, 16))
  y = layer(jnp.asarray(x, jnp.float32))
  w = lambda lin: np.asarray(lin.kernel[...], np.float64)
  q = (x @ w(layer.q)).reshape(2, 5, 4, 8)
  k = (x @ w(layer.k)).reshape(2, 5, kv_heads, 8)
  v = (x @ w(layer.v)).reshape(2, 5, kv_heads, 8)
  out = np.zeros_like(q)
  for h in range(4):   # query head h reads key/value head h % kv_heads (MoA's layout)
    s = np.einsum("bqd,bsd->bqs", q[:, :, h], k[:, :, h % kv_heads]) / np.sqrt(8)
    s = np.where(np.tril(np.ones((5, 5), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    out[:, :, h] = np.einsum("bqs,bsd->bqd", p / p.sum(-1, keepdims=True), v[:, :, h % kv_heads])
  assert_close(y, out.reshape(2, 5, 32) @ w(layer.o), np.float32, factor=3)
  assert moa_lm.active_attention_params(ATT, kind) == sum(
      w(lin).size for lin in (layer.q, layer.k, layer.v, layer.o))


@pytest.mark.parametrize("kind", moa_lm.ATTENTIONS)
def test_lm_is_causal(kind, rng):
  cfg = moa_lm.LMConfig(vocab_size=64, n_layers=2, d_ff=32, seq_len=8, attention=ATT)
  model = moa_lm.LM(cfg, kind, rngs=nnx.Rngs(0))
  tokens = rng.integers(0, 64, (2, 8))
  changed = tokens.copy()
  changed[:, 5:] = (changed[:, 5:] + 1) % 64
  logits, aux = model(jnp.asarray(tokens))
  logits2, _ = model(jnp.asarray(changed))
  assert logits.shape == (2, 8, 64) and np.isfinite(float(aux))
  np.testing.assert_array_equal(np.asarray(logits[:, :5]), np.asarray(logits2[:, :5]))
  assert not np.array_equal(np.asarray(logits[:, 5:]), np.asarray(logits2[:, 5:]))
