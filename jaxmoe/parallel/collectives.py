"""Collectives of the expert-parallel layer inside `shard_map`: the varying-axes bookkeeping of
shard_map's check_vma, an invariant all-gather, and ragged_all_to_all emulated by a padded
all_to_all (XLA:CPU lacks the ragged one, jax 0.11).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

try:  # Varying -> invariant all-gather (transposes to a slice); not exported by jax.lax in 0.11.
  from jax._src.lax.parallel import all_gather_invariant as _all_gather_invariant
except ImportError:  # pragma: no cover - older/newer jax: emulate with a psum of a padded buffer
  _all_gather_invariant = None


# shard_map's check_vma. With True, a pallas_call inside the shard_map needs its out_shape typed with
# the mesh axes it varies over (jax.ShapeDtypeStruct(..., manual_axis_type=...)); the kernels/ ops do
# not set it (jax 0.11: "When `check_vma=True` on `jax.shard_map`, `manual_axis_type` on
# `jax.ShapeDtypeStruct` must not be `None`"), so the layer's shard_maps run unchecked: shard_map's
# transpose then sums the cotangents of replicated operands over the axes they are replicated on.
# Both settings give the same numbers (tests run the True path with the XLA backend too).
CHECK_VMA = False


def vma(x: jax.Array) -> frozenset:
  """The mesh axes x varies over inside shard_map (its "varying manual axes")."""
  if not CHECK_VMA:
    return frozenset()
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  return frozenset(mat.varying if mat is not None else getattr(aval, "vma", frozenset()))


def vary(x: jax.Array, axes) -> jax.Array:
  """Marks x as varying over `axes` (inside shard_map with check_vma): its gradient is then
  psum'd over them by the transpose, as a replicated operand's must be."""
  if not CHECK_VMA:
    return x
  varying = vma(x)
  missing = tuple(a for a in axes if a not in varying)
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def gather_invariant(x: jax.Array, axis: str, size: int) -> jax.Array:
  """Tiled all-gather over `axis` whose result is invariant over it (dim 0 grows size-fold).

  Without check_vma, shard_map's transpose divides the output cotangent among the replicas of
  `axis` and sums the input cotangents over them: the plain all_gather (which transposes to a
  psum_scatter) is the one that matches; with check_vma, all_gather_invariant (transposes to a
  slice).
  """
  if not CHECK_VMA:
    return jax.lax.all_gather(x, axis, axis=0, tiled=True)
  if _all_gather_invariant is not None:
    return _all_gather_invariant(x, axis, axis=0, tiled=True)
  i = jax.lax.axis_index(axis)
  buf = jnp.zeros((size,) + x.shape, x.dtype).at[i].set(x)
  return jax.lax.psum(buf, axis).reshape((size * x.shape[0],) + x.shape[1:])


def ragged_all_to_all_emulated(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                               send_sizes: jax.Array, output_offsets: jax.Array,
                               recv_sizes: jax.Array, *, axis_name: str | None) -> jax.Array:
  """jax.lax.ragged_all_to_all's semantics (same arguments, one slice per device of the axis)
  from a padded all_to_all and a scatter; runs on every backend, differentiable.

  operand (N, ...), output (M, ...), the four (P,) int32 arrays for an axis of size P. Sends
  operand[input_offsets[j] : + send_sizes[j]] to device j, which writes it at
  output[output_offsets[j] : + recv_sizes[...]] (output_offsets are the sender's view, as in
  ragged_all_to_all). Moves P * N rows per device: a reference, not a fast path.
  """
  n = operand.shape[0]
  r = jnp.arange(n, dtype=jnp.int32)
  src = jnp.clip(input_offsets[:, None] + r[None, :], 0, n - 1)                   # (P, N)
  buf = jnp.where((r[None, :] < send_sizes[:, None]).reshape((-1, n) + (1,) * (operand.ndim - 1)),
                  jnp.take(operand, src, axis=0), 0)
  if axis_name is None:  # an axis of size 1: no communication
    recv, offsets = buf, output_offsets
  else:
    recv = jax.lax.all_to_all(buf, axis_name, 0, 0, tiled=False)                 # [src, row]
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)    # where mine land
  dst = offsets[:, None] + r[None, :]
  dst = jnp.where(r[None, :] < recv_sizes[:, None], dst, output.shape[0])         # drop padding
  return output.at[dst.reshape(-1)].set(recv.reshape((-1,) + operand.shape[1:]), mode="drop")
