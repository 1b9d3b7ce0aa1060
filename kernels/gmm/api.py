"""Grouped matmul over expert-sorted rows: the op every dropless MoE backend here needs.

  grouped_matmul(lhs (M, K), rhs (G, K, N), group_sizes (G,)) -> (M, N)
      out[m] = lhs[m] @ rhs[g(m)],  g(m) = the group whose row range holds m
  group_xty(x (M, K), dy (M, N), group_sizes (G,)) -> (G, K, N)
      out[g] = x[rows of g].T @ dy[rows of g]   (the weight gradient; zero for empty groups)

Semantics are those of `jax.lax.ragged_dot`: rows at or past sum(group_sizes) come out zero.
If sum(group_sizes) > M the group boundaries are clipped to M (later groups lose their rows
past M); no error is raised because the sizes are only known on device.

`grouped_matmul` is a `jax.custom_vjp`: its backward is the same kernel with transposed weights
for d(lhs) and `group_xty` for d(rhs), so no (G, M, K) tensor is ever materialized. Its rhs may
be a tuple of parts along N (kernels.common.weight_parts): the GLU's gate and up projections as
one product of width 2f.

Backends: `kernels.gmm.backends` (GMM_BACKENDS, XTY_BACKENDS). On a GPU the Pallas kernels take
their block sizes from `kernels.gmm.tuning` (a per-device, per-shape table filled by
experiments/autotune_gmm.py) where it has an entry that the backend's check accepts, else their
defaults.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from kernels.common import registry, validation, weight_parts
from kernels.gmm import tuning
from kernels.gmm.backends import GMM_BACKENDS, XTY_BACKENDS
from kernels.gmm.shapes import GroupedShape, dtypes as make_dtypes


def tuned_config(op: str, backend: registry.Backend, shape: GroupedShape, dtypes) -> dict:
  """{"config": tuned config} for a GPU backend when the tuned table (kernels/gmm/
  tuned_configs.json, or the one named by $JAXMOE_TUNED_CONFIGS) has an entry for this device and
  shape and the backend's check accepts it for this call; else {} so the kernel keeps its
  default. Never on CPU or for the interpret/xla backends, which keep the configs the tests pass."""
  if backend.name not in tuning.TUNED_BACKENDS or not registry.on_gpu():
    return {}
  config = tuning.lookup(op, backend.name, dtypes.operands, shape.k, shape.n, shape.m)
  if config is None or backend.check(shape, dtypes, config) is not None:
    return {}
  return {"config": config}


def run_gmm(lhs, rhs, group_sizes, transpose_rhs, backend, out_dtype, epilogue=None,
            residual=None):
  """The grouped product on `backend` (a name; "pallas" is resolved per shape) with its tuned
  config: the one dispatch of both ops of this family (grouped_matmul, grouped_mlp).

  epilogue (kernels.gmm.epilogue.Epilogue; `residual` its (M, N) input when it takes one): in
  the kernel where the chosen backend has epilogues and its `epilogue_config` accepts the shape,
  else as separate passes after the product (Epilogue.apply: the same values)."""
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  shape = GroupedShape(lhs.shape[0], lhs.shape[1], n, rhs.shape[0])
  dtypes = make_dtypes(lhs.dtype, out_dtype)
  impl = GMM_BACKENDS.select(backend, shape, dtypes)
  tuned = tuned_config("gmm_t" if transpose_rhs else "gmm", impl, shape, dtypes)
  if epilogue is not None and impl.epilogue_config is not None:
    config = impl.epilogue_config(shape, dtypes, tuned.get("config"), epilogue)
    if config is not None:
      return impl.fn(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                     config=config, epilogue=epilogue, residual=residual)
  out = impl.fn(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype, **tuned)
  return out if epilogue is None else epilogue.apply(out, residual)


def run_xty(x, dy, group_sizes, backend, out_dtype):
  shape = GroupedShape(x.shape[0], x.shape[1], dy.shape[1], group_sizes.shape[0])
  dtypes = make_dtypes(x.dtype, out_dtype)
  impl = XTY_BACKENDS.select(backend, shape, dtypes)
  tuned = tuned_config("xty", impl, shape, dtypes)
  return impl.fn(x, dy, group_sizes, out_dtype=out_dtype, **tuned)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _grouped_matmul(lhs, rhs, group_sizes, transpose_rhs, backend, out_dtype):
  return run_gmm(lhs, weight_parts.join(rhs, transpose_rhs), group_sizes, transpose_rhs, backend,
              out_dtype)


def _grouped_matmul_fwd(lhs, rhs, group_sizes, transpose_rhs, backend, out_dtype):
  out = run_gmm(lhs, weight_parts.join(rhs, transpose_rhs), group_sizes, transpose_rhs, backend,
             out_dtype)
  return out, (lhs, rhs, group_sizes)   # rhs: the parts, not their concatenation


def _grouped_matmul_bwd(transpose_rhs, backend, out_dtype, residuals, dout):
  lhs, parts, group_sizes = residuals
  rhs = weight_parts.join(parts, transpose_rhs)
  dout = dout.astype(lhs.dtype)
  # d(lhs)[m] = dout[m] @ W[g(m)]^T: the same grouped kernel with the weight transposed.
  dlhs = run_gmm(dout, rhs, group_sizes, not transpose_rhs, backend, lhs.dtype)
  # d(W)[g] = lhs[g]^T dout[g]  (or its transpose when W is stored (G, N, K)).
  if transpose_rhs:
    drhs = run_xty(dout, lhs, group_sizes, backend, rhs.dtype)
  else:
    drhs = run_xty(lhs, dout, group_sizes, backend, rhs.dtype)
  return dlhs, weight_parts.split(drhs, parts, transpose_rhs), None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(
    lhs: jax.Array,
    rhs: weight_parts.Weight,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    backend: str | None = None,
    out_dtype: Any = None,
) -> jax.Array:
  """Differentiable grouped matmul; see the module docstring.

  Args:
    lhs: (M, K) rows sorted by group, float32/bfloat16/float16.
    rhs: (G, K, N) weights of the same dtype, or (G, N, K) with `transpose_rhs=True`; or a tuple
      of such weights (G, K, N_i), one product of width N = sum N_i (kernels.common.weight_parts).
    group_sizes: (G,) int32 rows per group.
    transpose_rhs: use rhs[g].T as the weight (rhs stored (G, N, K)).
    backend: a name of `GMM_BACKENDS` (kernels.gmm.backends); None picks "pallas" on GPU and
      "xla" elsewhere.
    out_dtype: output dtype; defaults to lhs.dtype. Accumulation is float32 in every backend.

  Returns:
    (M, N) array; rows at or past sum(group_sizes) are zero.
  """
  backend = GMM_BACKENDS.validate(backend)
  validation.check_float_operand("lhs", lhs, 2)
  rhs, joined = weight_parts.check("rhs", rhs, transpose_rhs, {"lhs": lhs})
  validation.check_group_sizes(group_sizes, joined.shape[0])
  k_rhs = joined.shape[2] if transpose_rhs else joined.shape[1]
  if lhs.shape[1] != k_rhs:
    raise ValueError(
        f"rhs: contracting dimension must match lhs.shape[1]={lhs.shape[1]}, got rhs.shape="
        f"{tuple(joined.shape)} with transpose_rhs={transpose_rhs}"
    )
  out_dtype = jnp.dtype(out_dtype or lhs.dtype)
  return _grouped_matmul(lhs, rhs, group_sizes, transpose_rhs, backend, out_dtype)


def group_xty(
    x: jax.Array,
    dy: jax.Array,
    group_sizes: jax.Array,
    *,
    backend: str | None = None,
    out_dtype: Any = None,
) -> jax.Array:
  """Per-group x^T dy: (M, K), (M, N), (G,) -> (G, K, N); zero for empty groups.

  Not differentiable itself (it is the weight gradient); see the module docstring.
  """
  backend = XTY_BACKENDS.validate(backend)
  validation.check_float_operand("x", x, 2)
  validation.check_float_operand("dy", dy, 2)
  validation.check_same_dtype(x=x, dy=dy)
  validation.check_group_sizes(group_sizes, None)
  if x.shape[0] != dy.shape[0]:
    raise ValueError(f"dy: must have x.shape[0]={x.shape[0]} rows, got shape {tuple(dy.shape)}")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  return run_xty(x, dy, group_sizes, backend, out_dtype)
