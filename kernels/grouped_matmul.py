"""Grouped matmul over expert-sorted rows: the op every dropless MoE backend here needs.

  grouped_matmul(lhs (M, K), rhs (G, K, N), group_sizes (G,)) -> (M, N)
      out[m] = lhs[m] @ rhs[g(m)],  g(m) = the group whose row range holds m
  group_xty(x (M, K), dy (M, N), group_sizes (G,)) -> (G, K, N)
      out[g] = x[rows of g].T @ dy[rows of g]   (the weight gradient; zero for empty groups)

Semantics are those of `jax.lax.ragged_dot`: rows at or past sum(group_sizes) come out zero.
If sum(group_sizes) > M the group boundaries are clipped to M (later groups lose their rows
past M); no error is raised because the sizes are only known on device.

`grouped_matmul` is a `jax.custom_vjp`: its backward is the same kernel with transposed weights
for d(lhs) and `group_xty` for d(rhs), so no (G, M, K) tensor is ever materialized.

On a GPU the Pallas kernels take their block sizes from `kernels.tuning` (a per-device, per-shape
table filled by experiments/autotune_gmm.py) where it has an entry, else their defaults.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from kernels import backends, validation, xla_gmm


def _impl(backend: str):
  """(gmm, group_xty) functions of a resolved backend name."""
  if backend == "xla":
    return xla_gmm.gmm, xla_gmm.group_xty
  if backend in ("triton", "triton_interpret"):
    from kernels import gmm_triton

    interpret = backend == "triton_interpret"
    return (
        functools.partial(gmm_triton.gmm, interpret=interpret),
        functools.partial(gmm_triton.group_xty, interpret=interpret),
    )
  if backend in ("mosaic", "mosaic_interpret"):
    interpret = backend == "mosaic_interpret"
    return (
        functools.partial(_mosaic_gmm, interpret=interpret),
        functools.partial(_mosaic_xty, interpret=interpret),
    )
  raise AssertionError(backend)


def _mosaic_gmm(lhs, rhs, group_sizes, *, transpose_rhs, out_dtype, interpret, config=None):
  """The warp-specialized Mosaic kernel where its CTA tile fits N, else the simple one.

  A tuned `config` (from `kernels.tuning`) picks the kernel by its type; `_tuned_config` has
  already checked that it fits this call (ws: `gmm_mosaic_ws.supports` with these dtypes)."""
  from kernels import gmm_mosaic, gmm_mosaic_ws

  if config is not None:
    ws = isinstance(config, gmm_mosaic_ws.MosaicWsGmmConfig)
  else:
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    ws = gmm_mosaic_ws.supports(lhs.shape[1], n, in_dtype=lhs.dtype, out_dtype=out_dtype)
  impl = gmm_mosaic_ws.gmm if ws else gmm_mosaic.gmm
  tuned = {} if config is None else {"config": config}  # as _tuned_config hands it on
  return impl(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
              interpret=interpret, **tuned)


def _mosaic_xty(x, dy, group_sizes, *, out_dtype, interpret, config=None):
  """The warp-specialized Mosaic group_xty where its CTA tile fits K and N and its stages fit in
  shared memory for these dtypes, else the single-warpgroup one; a tuned `config` picks the
  kernel by its type (as `_mosaic_gmm` does; `_tuned_config` has checked that it fits)."""
  from kernels import gmm_mosaic, gmm_mosaic_xty_ws

  if config is not None:
    ws = isinstance(config, gmm_mosaic_xty_ws.MosaicWsXtyConfig)
  else:
    ws = gmm_mosaic_xty_ws.supports(x.shape[1], dy.shape[1], in_dtype=x.dtype,
                                    out_dtype=out_dtype)
  impl = gmm_mosaic_xty_ws.group_xty if ws else gmm_mosaic.group_xty
  tuned = {} if config is None else {"config": config}
  return impl(x, dy, group_sizes, out_dtype=out_dtype, interpret=interpret, **tuned)


def _pick_pallas(m: int, k: int, n: int, dtype) -> str:
  """The Pallas backend for a shape on this GPU: Mosaic GPU on Hopper for 16-bit operands where
  the shape fits its tiles (its float32 tiles exceed shared memory), Triton otherwise."""
  if backends.is_hopper() and jnp.dtype(dtype).itemsize == 2:
    from kernels import gmm_mosaic

    if gmm_mosaic.supports(m, k, n):
      return "mosaic"
  return "triton"


def _tuned_config(op, backend, dtype, k, n, m, out_dtype) -> dict:
  """{"config": tuned config} for a GPU backend when kernels/tuned_configs.json (or the table
  named by $JAXMOE_TUNED_CONFIGS) has an entry for this device and shape and it fits this call;
  else {} so the kernel keeps its default. Never on CPU or for the interpret/xla backends, which
  keep the configs the tests pass."""
  if backend not in ("mosaic", "triton") or not backends.on_gpu():
    return {}
  from kernels import tuning

  config = tuning.lookup(op, backend, dtype, k, n, m)
  if config is None or not tuning.fits(config, k, n, dtype, out_dtype):
    return {}
  return {"config": config}


def _gmm(lhs, rhs, group_sizes, transpose_rhs, backend, out_dtype):
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if backend == "pallas":
    backend = _pick_pallas(lhs.shape[0], lhs.shape[1], n, lhs.dtype)
  gmm, _ = _impl(backend)
  tuned = _tuned_config("gmm_t" if transpose_rhs else "gmm", backend, lhs.dtype, lhs.shape[1], n,
                        lhs.shape[0], out_dtype)
  return gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype, **tuned)


def _xty(x, dy, group_sizes, backend, out_dtype):
  if backend == "pallas":
    # The Mosaic group_xty tiles its (K, N) output: K = x.shape[1] must divide like gmm's K.
    backend = _pick_pallas(x.shape[0], x.shape[1], dy.shape[1], x.dtype)
  _, xty = _impl(backend)
  tuned = _tuned_config("xty", backend, x.dtype, x.shape[1], dy.shape[1], x.shape[0], out_dtype)
  return xty(x, dy, group_sizes, out_dtype=out_dtype, **tuned)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _grouped_matmul(lhs, rhs, group_sizes, transpose_rhs, backend, out_dtype):
  return _gmm(lhs, rhs, group_sizes, transpose_rhs, backend, out_dtype)


def _grouped_matmul_fwd(lhs, rhs, group_sizes, transpose_rhs, backend, out_dtype):
  out = _gmm(lhs, rhs, group_sizes, transpose_rhs, backend, out_dtype)
  return out, (lhs, rhs, group_sizes)


def _grouped_matmul_bwd(transpose_rhs, backend, out_dtype, residuals, dout):
  lhs, rhs, group_sizes = residuals
  dout = dout.astype(lhs.dtype)
  # d(lhs)[m] = dout[m] @ W[g(m)]^T: the same grouped kernel with the weight transposed.
  dlhs = _gmm(dout, rhs, group_sizes, not transpose_rhs, backend, lhs.dtype)
  # d(W)[g] = lhs[g]^T dout[g]  (or its transpose when W is stored (G, N, K)).
  if transpose_rhs:
    drhs = _xty(dout, lhs, group_sizes, backend, rhs.dtype)
  else:
    drhs = _xty(lhs, dout, group_sizes, backend, rhs.dtype)
  return dlhs, drhs, None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    backend: str | None = None,
    out_dtype: Any = None,
) -> jax.Array:
  """Differentiable grouped matmul; see the module docstring.

  Args:
    lhs: (M, K) rows sorted by group, float32/bfloat16/float16.
    rhs: (G, K, N) weights of the same dtype, or (G, N, K) with `transpose_rhs=True`.
    group_sizes: (G,) int32 rows per group.
    transpose_rhs: use rhs[g].T as the weight (rhs stored (G, N, K)).
    backend: one of `kernels.BACKENDS`; None picks "pallas" on GPU and "xla" elsewhere.
    out_dtype: output dtype; defaults to lhs.dtype. Accumulation is float32 in every backend.

  Returns:
    (M, N) array; rows at or past sum(group_sizes) are zero.
  """
  backend = backends.resolve_backend(backend)
  validation.check_float_operand("lhs", lhs, 2)
  validation.check_float_operand("rhs", rhs, 3)
  validation.check_same_dtype(lhs=lhs, rhs=rhs)
  validation.check_group_sizes(group_sizes, rhs.shape[0])
  k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
  if lhs.shape[1] != k_rhs:
    raise ValueError(
        f"rhs: contracting dimension must match lhs.shape[1]={lhs.shape[1]}, got rhs.shape="
        f"{tuple(rhs.shape)} with transpose_rhs={transpose_rhs}"
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
  backend = backends.resolve_backend(backend)
  validation.check_float_operand("x", x, 2)
  validation.check_float_operand("dy", dy, 2)
  validation.check_same_dtype(x=x, dy=dy)
  validation.check_group_sizes(group_sizes, None)
  if x.shape[0] != dy.shape[0]:
    raise ValueError(f"dy: must have x.shape[0]={x.shape[0]} rows, got shape {tuple(dy.shape)}")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  return _xty(x, dy, group_sizes, backend, out_dtype)
