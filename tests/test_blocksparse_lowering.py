"""The block-sparse Triton kernels lower for an H100 (no GPU needed): every op and transpose
flag pair at the default 128 block, and the dMoE GLU's gradient."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import pytest

from kernels.blocksparse import dds, dmoe_mlp, dsd, make_topology, sdd
from kernels.gpu_lowering import lower_for_gpu

S = jax.ShapeDtypeStruct
BF = jnp.bfloat16
M, D, F, E = 1000, 256, 512, 4   # M not a multiple of the block; 4 blocks per expert


def _topo(gs):
  return make_topology(gs, M, ffn_size=F, block_size=128)


@pytest.mark.parametrize("ta,tb", list(itertools.product([False, True], repeat=2)))
def test_ops_lower_for_h100(ta, tb):
  topo = jax.eval_shape(lambda: _topo(jnp.zeros((E,), jnp.int32)))
  p, ns = topo.sparse_shape
  gs = S((E,), jnp.int32)
  data = S(topo.data_shape, BF)
  kw = dict(transpose_lhs=ta, transpose_rhs=tb, backend="triton")
  cases = [
      (lambda g, a, b: sdd(a, b, _topo(g), **kw), S((D, p) if ta else (p, D), BF),
       S((ns, D) if tb else (D, ns), BF)),
      (lambda g, s, r: dsd(s, r, _topo(g), **kw), data,
       S((D, p if ta else ns) if tb else (p if ta else ns, D), BF)),
      (lambda g, l, s: dds(l, s, _topo(g), **kw),
       S((ns if tb else p, D) if ta else (D, ns if tb else p), BF), data),
  ]
  for fn, a, b in cases:
    text = lower_for_gpu(fn, gs, a, b)
    assert "triton" in text


def test_dmoe_gradient_lowers_for_h100():
  t, k = 300, 2

  def loss(x, idx, cw, w1, w2, w3):
    return jnp.sum(dmoe_mlp(x, idx, cw, w1, w2, w3, backend="triton").astype(jnp.float32))

  text = lower_for_gpu(
      jax.grad(loss, argnums=(0, 3, 4, 5)), S((t, D), BF), S((t, k), jnp.int32), S((t, k), BF),
      S((E, D, F), BF), S((E, F, D), BF), S((E, D, F), BF))
  # forward: 2 sdd + 1 dsd; backward: dsd_nt + dds_tn per sdd, sdd_nt + dsd_tn for the dsd
  assert text.count("jaxmoe_bsr_") >= 9
