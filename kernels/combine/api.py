"""kernels.gather_sum: each output row the (weighted) sum of k gathered rows, on a registry
backend.

  out[t] = sum_j weights[t, j] * rows[positions[t, j]]       (T, N); weights 1 when None

The MoE combine in token order (rows: expert outputs in expert-sorted order, positions: the
sorted position of each token's k choices, weights: the gates) and the data gradient of the
dispatch gather (rows: the sorted rows' gradients, no weights): a gather and a sum, never a
scatter-add, so the result does not depend on the order threads run in.

Differentiable (a custom_vjp): the rows' gradient scatters weights[t, j] * dout[t] to
positions[t, j] (an XLA scatter-add; positions are not assumed unique), the weights' gradient is
<dout[t], rows[positions[t, j]]>. The kernels themselves only run the forward.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from kernels.combine.backends import COMBINE_BACKENDS
from kernels.combine.reference import out_of_range_to_end
from kernels.combine.shapes import CombineShape
from kernels.common import validation


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gather_sum(rows, positions, weights, out_dtype, run):
  return run(rows, positions, weights, out_dtype=out_dtype)


def _gather_sum_fwd(rows, positions, weights, out_dtype, run):
  return run(rows, positions, weights, out_dtype=out_dtype), (rows, positions, weights)


def _gather_sum_bwd(out_dtype, run, res, dout):
  rows, positions, weights = res
  (t, k), n = positions.shape, rows.shape[1]
  dout = dout.astype(jnp.float32)
  flat = out_of_range_to_end(positions.reshape(-1), rows.shape[0])
  scaled = dout[:, None, :] if weights is None else \
      dout[:, None, :] * weights.astype(jnp.float32)[:, :, None]
  drows = jnp.zeros(rows.shape, jnp.float32).at[flat].add(
      jnp.broadcast_to(scaled, (t, k, n)).reshape(t * k, n), mode="drop")
  dweights = None
  if weights is not None:
    picked = jnp.take(rows, flat, axis=0, mode="fill", fill_value=jnp.nan)
    dweights = jnp.einsum("tkn,tn->tk", picked.reshape(t, k, n).astype(jnp.float32), dout)
    dweights = dweights.astype(weights.dtype)
  return drows.astype(rows.dtype), None, dweights


_gather_sum.defvjp(_gather_sum_fwd, _gather_sum_bwd)


def gather_sum(rows: jax.Array, positions: jax.Array, weights: jax.Array | None = None, *,
               out_dtype: Any = None, backend: str | None = None, config: Any = None) -> jax.Array:
  """Sum each output row's k gathered rows, optionally weighted; float32 sums.

  Args:
    rows: (M, N) float32, bfloat16 or float16.
    positions: (T, k) int32, each in [0, M): the rows summed into output row t. A position
      outside [0, M) makes its output row NaN (on every backend), never a silent wrong value.
    weights: None, or (T, k) floats: each gathered row's multiplier (the router's gates).
    out_dtype: the output's dtype (default rows.dtype); products and sums are float32.
    backend: a name of kernels.COMBINE_BACKENDS (None: "pallas" on a GPU, "xla" elsewhere).
    config: a kernels.combine.TritonCombineConfig for the Triton backends (None: its default).
  Returns:
    (T, N) array of out_dtype.
  """
  validation.check_float_operand("rows", rows, 2)
  if getattr(positions, "ndim", None) != 2 or jnp.dtype(positions.dtype) != jnp.int32:
    raise ValueError(f"positions must be a (T, k) int32 array, got shape "
                     f"{getattr(positions, 'shape', None)} dtype "
                     f"{getattr(positions, 'dtype', type(positions).__name__)}")
  t, k = positions.shape
  if k < 1:
    raise ValueError(f"positions must have at least one pick per row (k >= 1), got shape "
                     f"{tuple(positions.shape)}")
  if weights is not None:
    validation.check_float_operand("weights", weights, 2)
    if tuple(weights.shape) != (t, k):
      raise ValueError(f"weights must have the shape of positions {(t, k)}, got "
                       f"{tuple(weights.shape)}")
  try:
    out_dtype = jnp.dtype(rows.dtype if out_dtype is None else out_dtype)
  except TypeError:
    raise ValueError(f"out_dtype must be a float dtype or None, got {out_dtype!r}") from None
  if not jnp.issubdtype(out_dtype, jnp.floating):
    raise ValueError(f"out_dtype must be a float dtype or None, got {out_dtype}")
  shape = CombineShape(t, k, rows.shape[0], rows.shape[1])
  dtypes = (jnp.dtype(rows.dtype), out_dtype)
  chosen = COMBINE_BACKENDS.select(backend, shape, dtypes)
  if config is not None and not isinstance(config, chosen.config_classes or ()):
    raise ValueError(f"config must be one of {[c.__name__ for c in chosen.config_classes]} for "
                     f"backend {chosen.name!r}, got {type(config).__name__}")
  why = chosen.check(shape, dtypes, config if config is not None
                     else chosen.default_config(shape, dtypes))
  if why is not None:
    raise ValueError(f"backend {chosen.name!r} cannot run kernels.gather_sum on rows "
                     f"{rows.dtype}{list(rows.shape)}, k={k}: it needs {why}")
  run = functools.partial(chosen.fn, config=config) if config is not None else chosen.fn
  return _gather_sum(rows, positions, weights, out_dtype, run)
