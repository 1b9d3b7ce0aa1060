"""ScatterMoE `ParallelLinear` (arXiv 2403.08245): a grouped matmul that gathers its input rows
and scatters its output rows inside the kernel, with an optional gate-weighted combine.

Routing: T tokens each pick k experts; flat index f = t * k + j is token t's j-th choice. A
`SortedSlots` holds `sorted_flat` (M = T * k,), the flat indices in expert-sorted order (stable),
and `group_sizes` (E,), the rows per expert. Sorted row p is flat choice sorted_flat[p].

  scatter_matmul(x, w, routing, *, x_grouped, y_grouped, gates)
    input   x_grouped=False: x (T, K) in token order, sorted row p reads x[sorted_flat[p] // k]
                             (x may also be (M, K) in flat order: then it reads x[sorted_flat[p]])
            x_grouped=True:  x (M, K) already in sorted order
    output  y_grouped=True:  (M, N) in sorted order
            y_grouped=False: (M, N) in flat order, row f = choice f's output
            gates (T, k):    (T, N), y[t] = sum_j gates[t, j] * out[t * k + j]

The gate multiply happens in the kernel epilogue; the sum over the k choices is an XLA reduce of
the (T, k, N) scattered rows (as in the paper). Nothing (M, K)-sized is materialized in the forward
when x is in token order.

Weights given as a tuple (w_1, ..., w_r) of (E, K, N_i) are the one weight of width N = sum N_i
(kernels.common.weight_parts): the GLU's gate and up projections run as one product of width 2f,
gathering x once, and in the backward one data-gradient product (one (M, d) array summed over
the k choices, not two) and one weight gradient over one gathered copy of x.

Backward as in the paper: the data gradient is the same scatter kernel with the weights
transposed, gathering dy (by token when the output was combined) and writing straight to x's
layout (summed over the k copies when x was in token order); the weight gradient is
`kernels.gmm.group_xty` over grouped x and grouped dy (gathered here: transient, backward only;
with gates, the narrower of the two is scaled by them, e.g. the (M, f) hidden rather than a copy
of the (M, d) output gradient); the gate gradient is d gates[f] = <dy[t], x_in @ W> =
<dy[t] @ W^T, x_in>, taken from the unscaled data-gradient rows, so the forward keeps no output
activations for it. `scatter_matmul_backward` is this backward as a function, for an op with a
custom_vjp of its own that computes a product's forward otherwise and runs scatter_matmul's
backward for it (kernels.scatter.glu's fused up-projection path: the fused kernel's forward, the
products path's backward).

Backends (`kernels.scatter.backends.SCATTER_BACKENDS`, which says what each name runs): "triton"
runs every product in the scatter kernel, as the paper does. "pallas" (the GPU default) and
"mosaic" keep the scatter kernel (Triton) for the products that gather token-order rows, the
point of the method, and run the products whose input rows are already grouped on the
grouped-matmul kernels (`kernels.gmm`: the Mosaic TMA + wgmma kernels on Hopper, faster than
Triton's): the forward of a grouped input, and in the backward the data gradient, whose grouped
dy the weight gradient gathers anyway. Their grouped output rows are then combined (or, for the data
gradient of an input in token order, each input row's copies summed) by kernels.gather_sum, which
gathers each token's rows from the sorted (M, N) rows and sums them in one pass, where the scatter
kernel would have written the same (M, N) rows in flat order for a separate sum.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from kernels.combine import gather_sum
from kernels.common import validation, weight_parts
from kernels.common.groups import inverse_permutation
from kernels.gmm.api import group_xty, grouped_matmul
from kernels.gmm.shapes import GroupedShape, dtypes as make_dtypes
from kernels.scatter.backends import SCATTER_BACKENDS, ScatterBackend
from kernels.scatter.routing import SortedSlots
from kernels.scatter.triton import TritonScatterConfig

Weight = weight_parts.Weight


def _on_grouped_kernels(backend: ScatterBackend, src, scale) -> bool:
  """Whether a product runs on the grouped-matmul kernels: its input rows are already grouped
  (no gather) and unscaled, and the backend has grouped kernels."""
  return backend.gmm_backend is not None and src is None and scale is None


def _s2s(x, w, group_sizes, src, dst, scale, *, m, transpose_w, backend: ScatterBackend,
         out_dtype, config):
  """out[dst[p]] = scale[p] * x[src[p]] @ W[g(p)]; None = identity index / no scale."""
  if _on_grouped_kernels(backend, src, scale):
    out = grouped_matmul(x, w, group_sizes, transpose_rhs=transpose_w, backend=backend.gmm_backend,
                         out_dtype=out_dtype)
    # dst is a permutation of the M rows (sorted_flat): a gather puts them in flat order.
    return out if dst is None else jnp.take(out, inverse_permutation(dst), axis=0)
  tuned = {"config": config} if backend.config_classes else {}
  return backend.fn(x, w, group_sizes, src, dst, scale, m=m, transpose_w=transpose_w,
                    out_dtype=out_dtype, **tuned)


def _select(x, w, sorted_flat, transpose_w, backend: str) -> ScatterBackend:
  """The record of `backend` (validated by the public op)."""
  n = w.shape[1] if transpose_w else w.shape[2]
  shape = GroupedShape(sorted_flat.shape[0], x.shape[1], n, w.shape[0])
  return SCATTER_BACKENDS.select(backend, shape, make_dtypes(x.dtype))


def _forward(x, w, gates, sorted_flat, group_sizes, x_grouped, y_grouped, transpose_w, backend,
             out_dtype, config):
  m = sorted_flat.shape[0]
  w = weight_parts.join(w, transpose_w)
  backend = _select(x, w, sorted_flat, transpose_w, backend)
  if x_grouped and gates is not None and _on_grouped_kernels(backend, None, None):
    # The grouped kernel's rows in sorted order, then each token's k rows gathered, scaled by
    # the gates and summed (kernels.gather_sum: each product rounded to out_dtype, then scaled
    # and summed in float32, as the grouped path's combine does; the scatter kernel rounds the
    # gate-scaled product instead).
    rows = _s2s(x, w, group_sizes, None, None, None, m=m, transpose_w=transpose_w,
                backend=backend, out_dtype=out_dtype, config=config)
    positions = inverse_permutation(sorted_flat).reshape(gates.shape)
    return gather_sum(rows, positions, gates, out_dtype=out_dtype,
                      backend=backend.combine_backend)
  src = None if x_grouped else sorted_flat // (m // x.shape[0])
  dst = None if y_grouped else sorted_flat
  scale = None if gates is None else gates.reshape(-1)[sorted_flat]
  out = _s2s(x, w, group_sizes, src, dst, scale, m=m, transpose_w=transpose_w, backend=backend,
             out_dtype=out_dtype, config=config)
  if gates is None:
    return out
  t, k = gates.shape
  # The gated rows are already scaled by the kernel; XLA fuses this reduce over the k choices.
  return out.reshape(t, k, -1).sum(axis=1, dtype=jnp.float32).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _scatter_matmul(x, w, gates, sorted_flat, group_sizes, x_grouped, y_grouped, transpose_w,
                    backend, out_dtype, config):
  return _forward(x, w, gates, sorted_flat, group_sizes, x_grouped, y_grouped, transpose_w,
                  backend, out_dtype, config)


def _fwd(x, w, gates, sorted_flat, group_sizes, x_grouped, y_grouped, transpose_w, backend,
         out_dtype, config):
  out = _forward(x, w, gates, sorted_flat, group_sizes, x_grouped, y_grouped, transpose_w,
                 backend, out_dtype, config)
  return out, (x, w, gates, sorted_flat, group_sizes)


def _bwd(x_grouped, y_grouped, transpose_w, backend, out_dtype, config, res, dy):
  x, parts, gates, sorted_flat, group_sizes = res
  w = weight_parts.join(parts, transpose_w)
  m = sorted_flat.shape[0]
  dy = dy.astype(x.dtype)
  backend = _select(x, w, sorted_flat, transpose_w, backend)
  # Where sorted row p's output gradient lives in dy.
  if y_grouped:
    dy_src = None
  elif gates is None:
    dy_src = sorted_flat                      # dy is (M, N) in flat order
  else:
    dy_src = sorted_flat // gates.shape[1]    # dy is (T, N): every choice of token t reads dy[t]
  r = 1 if x_grouped else m // x.shape[0]     # copies of each x row among the M sorted rows
  # Data gradient: the same kernel with W transposed, written to x's layout. Rows are written in
  # flat order (then summed over the r copies) or in sorted order when x was grouped. With gates
  # the rows stay unscaled: the gate gradient needs them.
  dx_dst = None if x_grouped else sorted_flat
  dx_scale = None if gates is None else gates.reshape(-1)[sorted_flat]
  # Where grouped products run on the grouped kernels, gather dy once (the weight gradient needs
  # the grouped rows too) and run the data gradient on the grouped rows.
  dyg = None
  if backend.gmm_backend is not None and dy_src is not None:
    dyg, dy_src_dx = jnp.take(dy, dy_src, axis=0), None
  else:
    dy_src_dx = dy_src
  dx = None
  if gates is None and not x_grouped and _on_grouped_kernels(backend, dy_src_dx, None):
    # The data gradient's rows come off the grouped kernels in sorted order; each x row's r
    # copies are gathered and summed in one pass (kernels.gather_sum), not put in flat order
    # first and then summed.
    u = _s2s(dy if dyg is None else dyg, w, group_sizes, None, None, None, m=m,
             transpose_w=not transpose_w, backend=backend, out_dtype=x.dtype, config=config)
    positions = inverse_permutation(sorted_flat).reshape(x.shape[0], r)
    dx = gather_sum(u, positions, out_dtype=x.dtype, backend=backend.combine_backend)
  else:
    u = _s2s(dy if dyg is None else dyg, w, group_sizes, dy_src_dx, dx_dst, None, m=m,
             transpose_w=not transpose_w, backend=backend, out_dtype=x.dtype, config=config)
  dgates = None
  if gates is not None:
    if x_grouped:
      d_sorted = jnp.sum(u.astype(jnp.float32) * x.astype(jnp.float32), axis=-1)
      # The barrier keeps the row sums a reduction of their own. Fused into the scatter below,
      # XLA computed each (M,) entry's sum over N in one thread (H200 profile at M 327680, N 256:
      # a 773 us fusion, where reading the two (M, N) bf16 operands once takes about a tenth).
      d_sorted = jax.lax.optimization_barrier(d_sorted)
      dgates = jnp.zeros((m,), jnp.float32).at[sorted_flat].set(d_sorted, unique_indices=True)
      u = u.astype(jnp.float32) * dx_scale.astype(jnp.float32)[:, None]
    else:
      u3 = u.reshape(x.shape[0], r, -1).astype(jnp.float32)
      dgates = jnp.sum(u3 * x.astype(jnp.float32)[:, None, :], axis=-1).reshape(-1)
      u = (u3 * gates.reshape(x.shape[0], r, 1).astype(jnp.float32)).reshape(m, -1)
    dgates = dgates.reshape(gates.shape).astype(gates.dtype)
  if dx is None:
    dx = u if r == 1 else u.reshape(x.shape[0], r, -1).sum(axis=1, dtype=jnp.float32)
    dx = dx.astype(x.dtype)
  # Weight gradient over grouped rows: gather x and (scaled) dy into sorted order.
  xg = x if x_grouped else jnp.take(x, sorted_flat // r, axis=0)
  if dyg is None:
    dyg = dy if dy_src is None else jnp.take(dy, dy_src, axis=0)
  if gates is not None:
    # dW[g] = sum_p x_p^T (s_p dy_p) = sum_p (s_p x_p)^T dy_p: scale the narrower of the two.
    # In the combining product x is the (M, f) hidden and dy the gathered (M, d) output
    # gradient, which the data gradient reads unscaled: a scaled copy of it is M * d more bytes
    # written (4.3 GB at T 32768, d 4096, k 16), one of x M * f (0.27 GB at f 256).
    s32 = dx_scale.astype(jnp.float32)[:, None]
    if xg.shape[1] < dyg.shape[1]:
      xg = (xg.astype(jnp.float32) * s32).astype(x.dtype)
    else:
      dyg = (dyg.astype(jnp.float32) * s32).astype(x.dtype)
  # The weight gradient always runs on the grouped kernels: the gmm backend of this backend's
  # record (group_xty resolves "pallas" to the best kernel for the shape).
  if transpose_w:
    dw = group_xty(dyg, xg, group_sizes, backend=backend.xty_backend, out_dtype=w.dtype)
  else:
    dw = group_xty(xg, dyg, group_sizes, backend=backend.xty_backend, out_dtype=w.dtype)
  return dx, weight_parts.split(dw, parts, transpose_w), dgates, None, None


_scatter_matmul.defvjp(_fwd, _bwd)


def _check(x, w, routing, gates, x_grouped: bool, y_grouped: bool, transpose_w: bool,
           backend: str | None, config) -> tuple[str, Weight, Any]:
  """Checks the arguments of scatter_matmul and scatter_matmul_backward (ValueError naming the
  argument); returns the backend's name (None resolved to the platform default), w (a tuple for
  parts) and the joined weight (or its shape and dtype, for parts)."""
  backend = SCATTER_BACKENDS.validate(backend)
  validation.check_float_operand("x", x, 2)
  w, joined = weight_parts.check("w", w, transpose_w, {"x": x})
  if not isinstance(routing, SortedSlots):
    raise ValueError(f"routing must be a SortedSlots (see sort_slots), got "
                     f"{type(routing).__name__}")
  sorted_flat, group_sizes = routing
  validation.check_group_sizes(group_sizes, joined.shape[0])
  if sorted_flat.ndim != 1 or jnp.dtype(sorted_flat.dtype) != jnp.dtype(jnp.int32):
    raise ValueError(f"routing.sorted_flat must be a 1-D int32 array, got shape "
                     f"{tuple(sorted_flat.shape)} dtype {sorted_flat.dtype}")
  m = sorted_flat.shape[0]
  k_w = joined.shape[2] if transpose_w else joined.shape[1]
  if x.shape[1] != k_w:
    raise ValueError(f"w: contracting dimension must match x.shape[1]={x.shape[1]}, got w.shape="
                     f"{tuple(joined.shape)} with transpose_w={transpose_w}")
  if x_grouped and x.shape[0] != m:
    raise ValueError(f"x: with x_grouped=True must have M={m} rows, got shape {tuple(x.shape)}")
  if not x_grouped and (x.shape[0] == 0 or m % x.shape[0]):
    raise ValueError(f"x: in token order must have T rows with M={m} a multiple of T, got shape "
                     f"{tuple(x.shape)}")
  if gates is not None:
    if y_grouped:
      raise ValueError("gates: the combine writes token order; it needs y_grouped=False")
    validation.check_float_operand("gates", gates, 2)
    if gates.shape[0] * gates.shape[1] != m:
      raise ValueError(f"gates: must be (T, k) with T * k = M = {m}, got shape "
                       f"{tuple(gates.shape)}")
    if not x_grouped and x.shape[0] not in (gates.shape[0], m):
      raise ValueError(f"gates: T={gates.shape[0]} does not match x.shape[0]={x.shape[0]}")
  if config is not None and not isinstance(config, TritonScatterConfig):
    raise ValueError(f"config must be a kernels.scatter.TritonScatterConfig or None, got "
                     f"{type(config).__name__}")
  return backend, w, joined


def scatter_matmul(
    x: jax.Array,
    w: jax.Array | tuple[jax.Array, ...],
    routing: SortedSlots,
    *,
    gates: jax.Array | None = None,
    x_grouped: bool = False,
    y_grouped: bool = False,
    transpose_w: bool = False,
    backend: str | None = None,
    out_dtype: Any = None,
    config: Any = None,
) -> jax.Array:
  """Differentiable ScatterMoE ParallelLinear; see the module docstring for the layouts.

  Args:
    x: (T, K) token order (or (M, K) flat order) unless x_grouped, then (M, K) sorted order.
    w: (E, K, N) expert weights of x's dtype, or (E, N, K) with transpose_w; or a tuple of such
      weights (E, K, N_i), one product of width N = sum N_i (see the module docstring).
    routing: SortedSlots from sort_slots (sorted_flat (M,), group_sizes (E,), int32).
    gates: optional (T, k) router weights: combine the k choices of each token into (T, N).
    x_grouped, y_grouped: input / output already in expert-sorted order.
    backend: a name of `SCATTER_BACKENDS` (kernels.scatter.backends): "xla" (plain XLA; CPU
      default), "triton" / "triton_interpret" (every product in the scatter kernel), "pallas"
      (GPU default), "mosaic" / "mosaic_interpret" (grouped-input products on the
      grouped-matmul kernels; see the module docstring) or None.
    out_dtype: defaults to x.dtype; accumulation is float32.
    config: optional kernels.scatter.TritonScatterConfig (tile sizes, warps, stages).

  Returns:
    (M, N) sorted (y_grouped), (M, N) flat order, or (T, N) with gates.
  """
  backend, w, _ = _check(x, w, routing, gates, x_grouped, y_grouped, transpose_w, backend, config)
  sorted_flat, group_sizes = routing
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  return _scatter_matmul(x, w, gates, sorted_flat, group_sizes, x_grouped, y_grouped, transpose_w,
                         backend, out_dtype, config)


def scatter_matmul_backward(
    x: jax.Array,
    w: Weight,
    routing: SortedSlots,
    dy: jax.Array,
    *,
    gates: jax.Array | None = None,
    x_grouped: bool = False,
    y_grouped: bool = False,
    transpose_w: bool = False,
    backend: str | None = None,
    out_dtype: Any = None,
    config: Any = None,
) -> tuple[jax.Array, Weight, jax.Array | None]:
  """The VJP of scatter_matmul(x, w, routing, gates=gates, ...) for the output gradient dy, as a
  function for ops that run a scatter_matmul product inside a custom_vjp of their own (the fused
  up-projection GLU, kernels.scatter.glu: its forward writes the product's input itself and its
  backward is this one). It runs the op's own backward: the same kernels and the same values as
  differentiating scatter_matmul.

  Args:
    x, w, routing, gates, x_grouped, y_grouped, transpose_w, backend, out_dtype, config: the
      forward's arguments (see scatter_matmul).
    dy: the output's gradient, of the output's shape ((T, N) with gates, else (M, N)); it is
      rounded to x's dtype, as scatter_matmul's backward does.

  Returns:
    (dx, dw, dgates): dx in x's layout and dtype; dw in w's dtype, a tuple of the parts'
    gradients when w is a tuple; dgates (T, k) in gates' dtype, or None without gates.
  """
  backend, w, joined = _check(x, w, routing, gates, x_grouped, y_grouped, transpose_w, backend,
                              config)
  n = joined.shape[1] if transpose_w else joined.shape[2]
  rows = routing.sorted_flat.shape[0] if gates is None else gates.shape[0]
  validation.check_float_operand("dy", dy, 2)
  if tuple(dy.shape) != (rows, n):
    raise ValueError(f"dy: must have the output's shape {(rows, n)}, got {tuple(dy.shape)}")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  # The custom_vjp's residuals are exactly these inputs (see _fwd).
  residuals = (x, w, gates, routing.sorted_flat, routing.group_sizes)
  dx, dw, dgates, _, _ = _bwd(x_grouped, y_grouped, transpose_w, backend, out_dtype, config,
                              residuals, dy)
  return dx, dw, dgates
