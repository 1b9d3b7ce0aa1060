"""sdd / dsd / dds (all transpose flags) against dense masked references: forward and gradients,
float32 and bfloat16, on the xla backend and the Triton kernels in interpret mode."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from kernels.blocksparse import (
    BlockSparseConfig, dds, dds_reference, dsd, dsd_reference, make_topology, sdd, sdd_reference)

BACKENDS = ["xla", "triton_interpret"]
FLAGS = list(itertools.product([False, True], repeat=2))
# Small tiles so the K/N/M loops take several (and ragged) steps in interpret mode.
CFG = BlockSparseConfig(block_k=16, block_n=16, block_m=16, group_lines=2)
B, F, K = 16, 32, 40            # block, ffn size (2 blocks per expert), dense dim (not a multiple)


def _topo(sizes=(5, 0, 40, 3), m=48):
  return make_topology(jnp.asarray(sizes, jnp.int32), m, ffn_size=F, block_size=B)


def _randn(rng, shape, dtype):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def _operands(op, ta, tb, topo, rng, dtype):
  """(a, b) operands of `op` with the given transpose flags (stored transposed where set)."""
  p, ns = topo.sparse_shape
  data = sdd_reference(_randn(rng, (p, K), jnp.float32), _randn(rng, (K, ns), jnp.float32), topo)
  data = data.astype(dtype)
  if op == "sdd":
    a, b = _randn(rng, (p, K), dtype), _randn(rng, (K, ns), dtype)
    return (a.T if ta else a), (b.T if tb else b)
  if op == "dsd":
    b = _randn(rng, (p if ta else ns, K), dtype)
    return data, (b.T if tb else b)
  a = _randn(rng, (K, ns if tb else p), dtype)
  return (a.T if ta else a), data


OPS = {"sdd": (sdd, sdd_reference), "dsd": (dsd, dsd_reference), "dds": (dds, dds_reference)}


def _call(op, a, b, topo, ta, tb, backend):
  fn = OPS[op][0]
  return fn(a, b, topo, transpose_lhs=ta, transpose_rhs=tb, backend=backend, config=CFG)


def _ref(op, a, b, topo, ta, tb):
  fn = OPS[op][1]
  return fn(a.astype(jnp.float32), b.astype(jnp.float32), topo, transpose_lhs=ta,
            transpose_rhs=tb, out_dtype=jnp.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["sdd", "dsd", "dds"])
def test_forward_all_flags(op, backend, rng):
  topo = _topo()
  for ta, tb in FLAGS:
    a, b = _operands(op, ta, tb, topo, rng, jnp.float32)
    got = _call(op, a, b, topo, ta, tb, backend)
    assert_close(got, _ref(op, a, b, topo, ta, tb), jnp.float32, name=f"{op} ta={ta} tb={tb}")
    if op == "sdd":  # padding blocks must be written, as zeros
      assert np.all(np.asarray(got)[int(topo.nnz[0]):] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["dsd", "dds"])
def test_many_experts_all_flags(op, backend, rng):
  """Ten experts of three blocks (f=48): empty experts first, in the middle and before the last,
  one-block experts, the last group clipped (sum 63 > 60) and six padding row blocks, so the
  kernels' affine block-row and block-column walks see every kind of line."""
  sizes = (0, 17, 0, 0, 16, 1, 0, 20, 0, 9)
  topo = make_topology(jnp.asarray(sizes, jnp.int32), 60, ffn_size=48, block_size=B)
  assert topo.num_row_blocks - int(topo.num_valid_row_blocks[0]) == 6
  for ta, tb in FLAGS:
    a, b = _operands(op, ta, tb, topo, rng, jnp.float32)
    got = _call(op, a, b, topo, ta, tb, backend)
    assert_close(got, _ref(op, a, b, topo, ta, tb), jnp.float32, name=f"{op} ta={ta} tb={tb}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["sdd", "dsd", "dds"])
@pytest.mark.parametrize("flags", [(False, False), (True, True)])
def test_gradients_f32(op, flags, backend, rng):
  ta, tb = flags
  topo = _topo(sizes=(0, 37, 11), m=50)   # empty expert, rows past the last group
  a, b = _operands(op, ta, tb, topo, rng, jnp.float32)
  out_shape = jax.eval_shape(lambda: _ref(op, a, b, topo, ta, tb)).shape
  ct = _randn(rng, out_shape, jnp.float32)
  got = jax.grad(lambda a, b: jnp.sum(_call(op, a, b, topo, ta, tb, backend) * ct), (0, 1))(a, b)
  want = jax.grad(lambda a, b: jnp.sum(_ref(op, a, b, topo, ta, tb) * ct), (0, 1))(a, b)
  for g, w, name in zip(got, want, ("d_lhs", "d_rhs")):
    assert g.shape == w.shape and g.dtype == w.dtype
    assert_close(g, w, jnp.float32, factor=2, name=f"{op} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["sdd", "dsd", "dds"])
def test_bf16_forward_and_gradients(op, backend, rng):
  topo = _topo(sizes=(0, 0, 45, 0), m=45)   # one expert takes every row
  a, b = _operands(op, False, False, topo, rng, jnp.bfloat16)
  out = _call(op, a, b, topo, False, False, backend)
  assert out.dtype == jnp.bfloat16
  assert_close(out, _ref(op, a, b, topo, False, False), jnp.bfloat16, name=f"{op} fwd")
  ct = _randn(rng, out.shape, jnp.float32)
  got = jax.grad(
      lambda a, b: jnp.sum(_call(op, a, b, topo, False, False, backend).astype(jnp.float32) * ct),
      (0, 1))(a, b)
  want = jax.grad(lambda a, b: jnp.sum(_ref(op, a, b, topo, False, False) * ct), (0, 1))(
      a.astype(jnp.float32), b.astype(jnp.float32))
  for g, w, name in zip(got, want, ("d_lhs", "d_rhs")):
    assert g.dtype == jnp.bfloat16
    assert_close(g, w, jnp.bfloat16, factor=2, name=f"{op} {name}")


def test_jit_with_traced_topology(rng):
  """The topology is built on device inside jit: only static bounds enter the shapes."""
  p_rows = 48

  @jax.jit
  def f(sizes, x, w):
    topo = make_topology(sizes, p_rows, ffn_size=F, block_size=B)
    return sdd(x, w, topo, backend="triton_interpret", config=CFG)

  topo = _topo()
  x, w = _operands("sdd", False, False, topo, rng, jnp.float32)
  got = f(jnp.asarray([5, 0, 40, 3], jnp.int32), x, w)
  assert_close(got, sdd_reference(x, w, topo), jnp.float32)


def test_validation(rng):
  topo = _topo()
  p, ns = topo.sparse_shape
  x, w = _randn(rng, (p, K), jnp.float32), _randn(rng, (K, ns), jnp.float32)
  with pytest.raises(ValueError, match="rhs"):
    sdd(x, w[:, :-1], topo)
  with pytest.raises(ValueError, match="lhs"):
    sdd(x[:-1], w, topo)
  with pytest.raises(ValueError, match="dtype"):
    sdd(x, w.astype(jnp.bfloat16), topo)
  with pytest.raises(ValueError, match="backend"):
    sdd(x, w, topo, backend="cuda")
  with pytest.raises(ValueError, match="data"):
    dsd(jnp.zeros((3, B, B)), w.T, topo)
  with pytest.raises(ValueError, match="block_n"):
    dsd(sdd(x, w, topo), w.T, topo, config=BlockSparseConfig(block_n=24))
  with pytest.raises(ValueError, match="topo"):
    dds(x.T, x, None)
