"""Differentiable block-sparse products (MegaBlocks' sdd / dsd / dds and their transposes).

S is the block-sparse (P, E*f) matrix of a `Topology`, stored as data (Z, b, b). With op_t(X) = X^T
when the flag is set (the operand is stored transposed) and X otherwise:
  sdd(lhs, rhs, topo)   blocks of op(lhs) @ op(rhs) at the topology      -> (Z, b, b)
                        op(lhs) (P, K), op(rhs) (K, E*f)
  dsd(data, rhs, topo)  op(S) @ op(rhs)                                   -> dense
                        S @ (E*f, N) -> (P, N);  S^T @ (P, N) -> (E*f, N)
  dds(lhs, data, topo)  op(lhs) @ op(S)                                   -> dense
                        (M, P) @ S -> (M, E*f);  (M, E*f) @ S^T -> (M, P)
Every op is a jax.custom_vjp whose backward is made of the same three ops (with the transpose
flags the gradient needs), so the backward runs on the same backend as the forward.

backend: a name of `kernels.blocksparse.backends.BLOCKSPARSE_BACKENDS`: "xla" (block gathers +
batched matmuls, the CPU default), "triton" (the Triton kernels), "pallas" (the GPU default: the
Triton kernels, the only Pallas ones), "triton_interpret" (the same kernels in the Pallas
interpreter). There is no Mosaic block-sparse kernel: "mosaic" is a ValueError listing these.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.blocksparse.backends import BLOCKSPARSE_BACKENDS
from kernels.blocksparse.topology import Topology
from kernels.blocksparse.triton import BlockSparseConfig
from kernels.common import validation

_FLAGS = ("transpose_lhs", "transpose_rhs")


def _impl(name: str, backend: str, config: BlockSparseConfig | None):
  """The `name` ("sdd", "dsd" or "dds") function of a validated backend name."""
  record = BLOCKSPARSE_BACKENDS.select(backend, None, None)
  fn = getattr(record.fn, name)
  return functools.partial(fn, config=config) if record.config_classes else fn


# ---- the custom_vjp core: static = (transpose_lhs, transpose_rhs, backend, config) -------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _sdd(lhs, rhs, topo, ta, tb, backend, config, out_dtype):
  return _impl("sdd", backend, config)(
      lhs, rhs, topo, transpose_lhs=ta, transpose_rhs=tb, out_dtype=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _dsd(data, rhs, topo, ta, tb, backend, config, out_dtype):
  return _impl("dsd", backend, config)(
      data, rhs, topo, transpose_lhs=ta, transpose_rhs=tb, out_dtype=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _dds(lhs, data, topo, ta, tb, backend, config, out_dtype):
  return _impl("dds", backend, config)(
      lhs, data, topo, transpose_lhs=ta, transpose_rhs=tb, out_dtype=out_dtype)


def _fwd(op):
  def fwd(a, b, topo, ta, tb, backend, config, out_dtype):
    return op(a, b, topo, ta, tb, backend, config, out_dtype), (a, b, topo)
  return fwd


def _sdd_bwd(ta, tb, backend, config, out_dtype, res, g):
  lhs, rhs, topo = res
  # S = mask(A' B'), A' = op_ta(lhs), B' = op_tb(rhs):  dA' = dS B'^T,  dB' = A'^T dS.
  if ta:
    dlhs = _dds(rhs, g, topo, tb, True, backend, config, lhs.dtype)          # B' dS^T
  else:
    dlhs = _dsd(g, rhs, topo, False, not tb, backend, config, lhs.dtype)     # dS B'^T
  if tb:
    drhs = _dsd(g, lhs, topo, True, ta, backend, config, rhs.dtype)          # dS^T A'
  else:
    drhs = _dds(lhs, g, topo, not ta, False, backend, config, rhs.dtype)     # A'^T dS
  return dlhs, drhs, None


def _dsd_bwd(ta, tb, backend, config, out_dtype, res, g):
  data, rhs, topo = res
  # Y = S' W', S' = op_ta(S), W' = op_tb(rhs):  dS' = sample(dY W'^T),  dW' = S'^T dY.
  if ta:
    ddata = _sdd(rhs, g, topo, tb, True, backend, config, data.dtype)        # W' dY^T
  else:
    ddata = _sdd(g, rhs, topo, False, not tb, backend, config, data.dtype)   # dY W'^T
  if tb:
    drhs = _dds(g, data, topo, True, ta, backend, config, rhs.dtype)         # dY^T S'
  else:
    drhs = _dsd(data, g, topo, not ta, False, backend, config, rhs.dtype)    # S'^T dY
  return ddata, drhs, None


def _dds_bwd(ta, tb, backend, config, out_dtype, res, g):
  lhs, data, topo = res
  # Y = L' S', L' = op_ta(lhs), S' = op_tb(S):  dL' = dY S'^T,  dS' = sample(L'^T dY).
  if ta:
    dlhs = _dsd(data, g, topo, tb, True, backend, config, lhs.dtype)         # S' dY^T
  else:
    dlhs = _dds(g, data, topo, False, not tb, backend, config, lhs.dtype)    # dY S'^T
  if tb:
    ddata = _sdd(g, lhs, topo, True, ta, backend, config, data.dtype)        # dY^T L'
  else:
    ddata = _sdd(lhs, g, topo, not ta, False, backend, config, data.dtype)   # L'^T dY
  return dlhs, ddata, None


_sdd.defvjp(_fwd(_sdd), _sdd_bwd)
_dsd.defvjp(_fwd(_dsd), _dsd_bwd)
_dds.defvjp(_fwd(_dds), _dds_bwd)


# ---- public ops ---------------------------------------------------------------------------------

def _setup(backend, config, out_dtype, default_dtype):
  backend = BLOCKSPARSE_BACKENDS.validate(backend)
  if config is not None:
    if not isinstance(config, BlockSparseConfig):
      raise ValueError(f"config must be a BlockSparseConfig or None, got {type(config).__name__}")
    config.validate()
  return backend, config, jnp.dtype(out_dtype or default_dtype)


def _check_topology(topo) -> None:
  if not isinstance(topo, Topology):
    raise ValueError(f"topo must be a kernels.blocksparse.Topology, got {type(topo).__name__}")


def _check_data(data, topo: Topology) -> None:
  validation.check_float_operand("data", data, 3)
  if tuple(data.shape) != topo.data_shape:
    raise ValueError(f"data must have shape {topo.data_shape} (topo.data_shape), got {tuple(data.shape)}")


def _check_2d(name: str, x, want: tuple[int | None, int | None]) -> None:
  validation.check_float_operand(name, x, 2)
  for axis, w in enumerate(want):
    if w is not None and x.shape[axis] != w:
      raise ValueError(f"{name}: dimension {axis} must be {w}, got shape {tuple(x.shape)}")


def sdd(lhs: jax.Array, rhs: jax.Array, topo: Topology, *, transpose_lhs: bool = False,
        transpose_rhs: bool = False, backend: str | None = None, out_dtype=None,
        config: BlockSparseConfig | None = None) -> jax.Array:
  """Dense x dense -> block-sparse: blocks (Z, b, b) of op(lhs) (P, K) @ op(rhs) (K, E*f).

  lhs is (P, K) [(K, P) if transpose_lhs]; rhs is (K, E*f) [(E*f, K) if transpose_rhs].
  Padding blocks (index >= topo.nnz) are zero.
  """
  _check_topology(topo)
  p, n = topo.sparse_shape
  _check_2d("lhs", lhs, (None, p) if transpose_lhs else (p, None))
  k = lhs.shape[0] if transpose_lhs else lhs.shape[1]
  _check_2d("rhs", rhs, (n, k) if transpose_rhs else (k, n))
  validation.check_same_dtype(lhs=lhs, rhs=rhs)
  backend, config, out_dtype = _setup(backend, config, out_dtype, lhs.dtype)
  return _sdd(lhs, rhs, topo, bool(transpose_lhs), bool(transpose_rhs), backend, config, out_dtype)


def dsd(data: jax.Array, rhs: jax.Array, topo: Topology, *, transpose_lhs: bool = False,
        transpose_rhs: bool = False, backend: str | None = None, out_dtype=None,
        config: BlockSparseConfig | None = None) -> jax.Array:
  """Block-sparse x dense -> dense: op(S) @ op(rhs).

  S (P, E*f) is `data` (Z, b, b). Without transpose_lhs: rhs (E*f, N) -> (P, N); with it (S^T):
  rhs (P, N) -> (E*f, N). rhs is stored (N, .) instead if transpose_rhs.
  """
  _check_topology(topo)
  _check_data(data, topo)
  p, n_s = topo.sparse_shape
  inner = p if transpose_lhs else n_s
  _check_2d("rhs", rhs, (None, inner) if transpose_rhs else (inner, None))
  validation.check_same_dtype(data=data, rhs=rhs)
  backend, config, out_dtype = _setup(backend, config, out_dtype, data.dtype)
  return _dsd(data, rhs, topo, bool(transpose_lhs), bool(transpose_rhs), backend, config, out_dtype)


def dds(lhs: jax.Array, data: jax.Array, topo: Topology, *, transpose_lhs: bool = False,
        transpose_rhs: bool = False, backend: str | None = None, out_dtype=None,
        config: BlockSparseConfig | None = None) -> jax.Array:
  """Dense x block-sparse -> dense: op(lhs) @ op(S).

  Without transpose_rhs: lhs (M, P) -> (M, E*f); with it (S^T): lhs (M, E*f) -> (M, P).
  lhs is stored (., M) instead if transpose_lhs.
  """
  _check_topology(topo)
  _check_data(data, topo)
  p, n_s = topo.sparse_shape
  inner = n_s if transpose_rhs else p
  _check_2d("lhs", lhs, (inner, None) if transpose_lhs else (None, inner))
  validation.check_same_dtype(lhs=lhs, data=data)
  backend, config, out_dtype = _setup(backend, config, out_dtype, lhs.dtype)
  return _dds(lhs, data, topo, bool(transpose_lhs), bool(transpose_rhs), backend, config, out_dtype)
