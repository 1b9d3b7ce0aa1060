"""The "xla" backend of the scatter matmul: the gather, jax.lax.ragged_dot, the scale and the
scatter as plain XLA ops (portable; the CPU default). It materializes the gathered (M, K) rows
that the scatter kernel avoids."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.gmm import xla as gmm_xla


def scatter2scatter(x: jax.Array, w: jax.Array, group_sizes: jax.Array, src: jax.Array | None,
                    dst: jax.Array | None, scale: jax.Array | None, *, m: int, transpose_w: bool,
                    out_dtype) -> jax.Array:
  """out[dst[p]] = scale[p] * x[src[p]] @ W[g(p)] (None: identity index / no scale); the
  arguments of `kernels.scatter.triton.scatter2scatter`."""
  del m  # the rows of the output are the rows of the gathered input
  xin = x if src is None else jnp.take(x, src, axis=0)
  out = gmm_xla.gmm(xin, w, group_sizes, transpose_rhs=transpose_w, out_dtype=jnp.float32)
  if scale is not None:
    out = out * scale.astype(jnp.float32)[:, None]
  out = out.astype(out_dtype)
  if dst is not None:
    out = jnp.zeros_like(out).at[dst].set(out, unique_indices=True)
  return out
