"""The block-sparse Triton kernels lower for an H100 (no GPU needed): every op and transpose
flag pair at the default 128 block, and the dMoE GLU's gradient; dsd/dds's inner loops read no
metadata."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jcore

from kernels.blocksparse import dds, dmoe_mlp, dsd, make_topology, sdd
from kernels.blocksparse import triton as bs_triton
from kernels.common.gpu_lowering import lower_for_gpu

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


def _loop_loads(jaxpr, in_kernel: bool = False) -> list[int]:
  """Number of ref loads in the body of every loop nested in a pallas_call of `jaxpr` (the
  topology's own searchsorted loops outside the kernel are skipped)."""
  counts = []
  for eqn in jaxpr.eqns:
    if in_kernel and eqn.primitive.name in ("scan", "while"):
      body = eqn.params["jaxpr"] if eqn.primitive.name == "scan" else eqn.params["body_jaxpr"]
      counts.append(sum(e.primitive.name in ("get", "load", "masked_load") for e in body.jaxpr.eqns))
    for sub in jcore.jaxprs_in_params(eqn.params):
      counts += _loop_loads(sub, in_kernel or eqn.primitive.name == "pallas_call")
  return counts


@pytest.mark.parametrize("ta,tb", list(itertools.product([False, True], repeat=2)))
def test_dsd_dds_loops_load_only_operand_tiles(ta, tb):
  """Each dsd/dds loop step loads one sparse block and one dense tile: the block and other-side
  indices are affine in the loop index, not read from index arrays (see bs_triton)."""
  topo = jax.eval_shape(lambda: _topo(jnp.zeros((E,), jnp.int32)))
  p, ns = topo.sparse_shape
  data = S(topo.data_shape, BF)
  kw = dict(transpose_lhs=ta, transpose_rhs=tb, out_dtype=BF)
  rhs = S((D, p if ta else ns) if tb else (p if ta else ns, D), BF)
  lhs = S((ns if tb else p, D) if ta else (D, ns if tb else p), BF)
  cases = [(lambda g, s, r: bs_triton.dsd(s, r, _topo(g), **kw), data, rhs),
           (lambda g, l, s: bs_triton.dds(l, s, _topo(g), **kw), lhs, data)]
  for fn, a, b in cases:
    counts = _loop_loads(jax.make_jaxpr(fn)(S((E,), jnp.int32), a, b).jaxpr)
    assert counts == [2], counts


@pytest.mark.parametrize("dtype,stages", [(BF, 3), (jnp.float32, 2)])
def test_float32_operands_get_two_pipeline_stages(dtype, stages):
  """3 software-pipelined stages of float32 tiles exceed the H100's shared memory (seen on the
  GPU: 262144 > 232448 bytes); the default config drops to 2 for 32-bit operands."""
  import re

  topo = jax.eval_shape(lambda: _topo(jnp.zeros((E,), jnp.int32)))
  _, ns = topo.sparse_shape
  text = lower_for_gpu(lambda g, s, r: dsd(s, r, _topo(g), transpose_lhs=False,
                                           transpose_rhs=False, backend="triton"),
                       S((E,), jnp.int32), S(topo.data_shape, dtype), S((ns, D), dtype))
  assert set(re.findall(r"num_stages = (\d+)", text)) == {str(stages)}
