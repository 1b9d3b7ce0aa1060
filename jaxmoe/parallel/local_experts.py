"""Step 6 of the expert-parallel layer: this device's experts on the rows it received, through the
one expert MLP of the single-device layer (jaxmoe.experts.expert_mlp) on its d_ff / TP slice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import kernels
from kernels.common.groups import inverse_permutation
from jaxmoe.experts import PROJECTIONS, expert_mlp
from jaxmoe.parallel import collectives
from jaxmoe.parallel.remat import rematerialized


def matmul_fn(impl: str, backend):
  """(lhs (M, K), rhs (G, K, N), sizes (G,), out_dtype) -> (M, N), operands first made to vary
  over the same mesh axes (a custom_vjp's cotangents must match its inputs' types)."""
  def align(lhs, rhs):
    axes = tuple(sorted(collectives.vma(lhs) | collectives.vma(rhs)))
    return collectives.vary(lhs, axes), collectives.vary(rhs, axes)

  if impl == "ragged_dot":
    def mm(lhs, rhs, sizes, out_dtype):
      lhs, rhs = align(lhs, rhs)
      return jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32).astype(out_dtype)
  else:
    def mm(lhs, rhs, sizes, out_dtype):
      lhs, rhs = align(lhs, rhs)
      return kernels.grouped_matmul(lhs, rhs, sizes, backend=backend, out_dtype=out_dtype)
  return mm


def local_experts(rows, eid, params, *, cfg, dtype, mm, num_local, skip, fast_rows=None,
                   partial_dtype=jnp.float32):
  """rows (M, d) in any order with local expert ids eid (M,) in [0, num_local] (num_local =
  padding) -> (M, d) float32 partial outputs (this tensor rank's d_ff slice, no output bias);
  padding rows give zeros. partial_dtype: the output projection's dtype (float32 when the
  partial sums are reduced over "tensor"; the compute dtype otherwise, as on one device, which
  also keeps the fastest kernels for 16-bit outputs).

  Rows are sorted by expert for the grouped matmul (padding last: the kernels leave rows past
  sum(group_sizes) zero) and put back in their original order. fast_rows (< M): a lax.cond runs
  the experts on the first fast_rows sorted rows when the real rows fit there, else on all M.
  """
  if skip:
    return rows.astype(jnp.float32)
  m = rows.shape[0]
  order = jnp.argsort(eid, stable=True)
  inverse = inverse_permutation(order)
  sizes = jnp.bincount(eid, length=num_local + 1)[:num_local].astype(jnp.int32)

  def w(name):
    p = params.get(name)
    return None if p is None else p.astype(dtype)

  def mlp(n):
    """The experts on the first n expert-sorted rows -> (n, d) float32."""
    idx = order[:n]
    x = jnp.take(rows, idx, axis=0).astype(dtype)
    e_sorted = jnp.take(eid, idx)

    def project(which, lhs, out_dtype):
      wname, bname = PROJECTIONS[which]
      y = mm(lhs, w(wname), sizes, out_dtype)
      # The output bias is added once, after the partial sums are reduced over "tensor".
      b = None if which == "out" else w(bname)
      if b is not None:
        y = y + jnp.take(b, e_sorted, axis=0, mode="fill", fill_value=0).astype(out_dtype)
      return y

    return expert_mlp(x, project, cfg, dtype, out_dtype=partial_dtype).astype(jnp.float32)

  def unsort(y_sorted):   # rows sorted past y_sorted's end are padding: zeros
    return jnp.take(y_sorted, inverse, axis=0, mode="fill", fill_value=0)

  if fast_rows is None or fast_rows >= m:
    return unsort(mlp(m))
  return jax.lax.cond(jnp.sum(sizes) <= fast_rows, lambda: unsort(mlp(fast_rows)),
                      rematerialized(lambda: unsort(mlp(m))))


def expert_ids(ends: jax.Array, pos: jax.Array, total: jax.Array, num_local: int) -> jax.Array:
  """Local expert of received rows: ends (..., n) cumulative counts of the blocks in the row
  layout, pos (..., M) positions -> (..., M) int32 block index mod num_local, num_local where
  pos >= total (padding)."""
  block = jnp.sum(pos[..., :, None] >= ends[..., None, :], axis=-1).astype(jnp.int32)
  return jnp.where(pos < total, block % num_local, num_local).astype(jnp.int32)
