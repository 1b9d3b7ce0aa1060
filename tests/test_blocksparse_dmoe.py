"""Block-sparse dMoE expert MLP/GLU == grouped-matmul path == per-token reference, values and grads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

import kernels
from kernels.blocksparse import BlockSparseConfig, dmoe_mlp, pad_to_blocks

CFG = BlockSparseConfig(block_k=16, block_n=16, block_m=16, group_lines=3)
B = 16
HI = jax.lax.Precision.HIGHEST


def grouped_path(x, idx, cw, w1, w2, w3, act):
  """Sort + gather + kernels.grouped_matmul (xla) + unsort/combine."""
  t, k = idx.shape
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  gs = jnp.bincount(flat, length=w1.shape[0]).astype(jnp.int32)
  xs = x[order // k]
  h = act(kernels.grouped_matmul(xs, w1, gs, backend="xla").astype(jnp.float32))
  if w3 is not None:
    h = h * kernels.grouped_matmul(xs, w3, gs, backend="xla").astype(jnp.float32)
  ys = kernels.grouped_matmul(h.astype(x.dtype), w2, gs, backend="xla")
  y_slots = jnp.zeros((t * k, x.shape[1]), ys.dtype).at[order].set(ys).reshape(t, k, -1)
  return jnp.einsum("tk,tkd->td", cw.astype(jnp.float32), y_slots.astype(jnp.float32)).astype(x.dtype)


def per_token(x, idx, cw, w1, w2, w3, act):
  """Each (token, slot) through its own expert's weights, in float32."""
  f32 = lambda a: None if a is None else a.astype(jnp.float32)
  x, cw, w1, w2, w3 = map(f32, (x, cw, w1, w2, w3))

  def one(xt, e):
    h = act(jnp.dot(xt, w1[e], precision=HI))
    if w3 is not None:
      h = h * jnp.dot(xt, w3[e], precision=HI)
    return jnp.dot(h, w2[e], precision=HI)

  y = jax.vmap(lambda xt, es: jax.vmap(lambda e: one(xt, e))(es))(x, idx)   # (T, k, d)
  return jnp.einsum("tk,tkd->td", cw, y, precision=HI)


def _problem(rng, t, k, d, f, e, dtype, idx=None, glu=True):
  if idx is None:
    logits = rng.standard_normal((t, e))
    logits[:, 1] = -1e9   # expert 1 stays empty
    idx = np.argsort(-logits, axis=1)[:, :k]
  idx = jnp.asarray(idx, jnp.int32)
  cw = jnp.asarray(rng.uniform(0.1, 1.0, (t, k)), jnp.float32).astype(dtype)
  s = lambda *shape: jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[-2]), jnp.float32).astype(dtype)
  x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32).astype(dtype)
  return x, idx, cw, s(e, d, f), s(e, f, d), (s(e, d, f) if glu else None)


@pytest.mark.parametrize("backend", ["xla", "triton_interpret"])
def test_glu_matches_grouped_and_per_token_f32(backend, rng):
  # T*k = 42 rows: not a multiple of the block; expert 1 empty.
  x, idx, cw, w1, w2, w3 = _problem(rng, t=21, k=2, d=24, f=32, e=4, dtype=jnp.float32)
  act = jax.nn.silu
  fn = lambda x, cw, w1, w2, w3: dmoe_mlp(
      x, idx, cw, w1, w2, w3, activation=act, block_size=B, backend=backend, config=CFG)
  y = jax.jit(fn)(x, cw, w1, w2, w3)
  assert y.shape == x.shape and y.dtype == x.dtype
  ref = jax.jit(lambda *a: per_token(x, idx, *a, act))(cw, w1, w2, w3)
  assert_close(y, ref, jnp.float32, name="vs per-token")
  assert_close(y, jax.jit(lambda *a: grouped_path(x, idx, *a, act))(cw, w1, w2, w3), jnp.float32,
               name="vs grouped")

  ct = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * ct)
  grouped = lambda x, cw, w1, w2, w3: grouped_path(x, idx, cw, w1, w2, w3, act)
  got = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2, 3, 4)))(x, cw, w1, w2, w3)
  want = jax.jit(jax.grad(loss(grouped), argnums=(0, 1, 2, 3, 4)))(x, cw, w1, w2, w3)
  for g, w, name in zip(got, want, ("dx", "dcw", "dw1", "dw2", "dw3")):
    assert_close(g, w, jnp.float32, factor=3, name=name)
  assert np.all(np.asarray(got[2])[1] == 0)  # the empty expert gets no gradient


@pytest.mark.parametrize("backend", ["xla", "triton_interpret"])
def test_mlp_one_expert_takes_all_bf16(backend, rng):
  t, k, e = 19, 1, 4
  idx = np.full((t, k), 2)
  x, idx, cw, w1, w2, _ = _problem(rng, t=t, k=k, d=32, f=48, e=e, dtype=jnp.bfloat16, idx=idx, glu=False)
  act = jax.nn.gelu
  fn = lambda x, w1, w2: dmoe_mlp(
      x, idx, cw, w1, w2, activation=act, block_size=B, backend=backend, config=CFG)
  y = jax.jit(fn)(x, w1, w2)
  assert y.dtype == jnp.bfloat16
  ref = jax.jit(lambda x, w1, w2: per_token(x, idx, cw, w1, w2, None, act))
  assert_close(y, ref(x, w1, w2), jnp.bfloat16, factor=2, name="vs per-token")
  assert_close(y, jax.jit(lambda x, w1, w2: grouped_path(x, idx, cw, w1, w2, None, act))(x, w1, w2),
               jnp.bfloat16, factor=2, name="vs grouped")
  ct = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  got = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * ct), (0, 1, 2)))(x, w1, w2)
  want = jax.jit(jax.grad(lambda *a: jnp.sum(ref(*a) * ct), (0, 1, 2)))(
      *(a.astype(jnp.float32) for a in (x, w1, w2)))
  for g, w, name in zip(got, want, ("dx", "dw1", "dw2")):
    assert g.dtype == jnp.bfloat16
    assert_close(g, w, jnp.bfloat16, factor=3, name=name)


def test_route_covers_every_slot(rng):
  idx = jnp.asarray(rng.integers(0, 5, (13, 3)), jnp.int32)
  r = jax.jit(lambda i: pad_to_blocks(i, 5, ffn_size=32, block_size=B))(idx)
  rows = np.asarray(r.slot_padded_row)
  assert len(set(rows.tolist())) == rows.size and rows.max() < r.topo.padded_rows
  src = np.asarray(r.source_token)
  np.testing.assert_array_equal(src[rows], np.arange(13 * 3) // 3)
  assert np.sum(src < 13) == 13 * 3
  # each slot's padded row lies inside its expert's padded range
  poff = np.asarray(r.topo.padded_offsets)
  e = np.asarray(idx).reshape(-1)
  assert np.all((rows >= poff[e]) & (rows < poff[e + 1]))


def test_validation(rng):
  x, idx, cw, w1, w2, w3 = _problem(rng, t=8, k=2, d=16, f=32, e=4, dtype=jnp.float32)
  with pytest.raises(ValueError, match="block_size"):
    dmoe_mlp(x, idx, cw, w1, w2, w3, block_size=64)
  with pytest.raises(ValueError, match="w2"):
    dmoe_mlp(x, idx, cw, w1, w2[:, :, :-1], w3, block_size=B)
  with pytest.raises(ValueError, match="w3"):
    dmoe_mlp(x, idx, cw, w1, w2, w3[:, :-1], block_size=B)
  with pytest.raises(ValueError, match="combine_weights"):
    dmoe_mlp(x, idx, cw[:, :1], w1, w2, w3, block_size=B)
  with pytest.raises(ValueError, match="expert_indices"):
    dmoe_mlp(x, idx[:-1], cw, w1, w2, w3, block_size=B)
