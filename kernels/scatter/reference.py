"""Plain-jnp references for the ScatterMoE scatter matmul and the expert GLU on it (readable,
obviously right; tests only).

Routing convention (kernels.scatter.routing): T tokens each pick k experts; flat index f = t * k + j
is token t's j-th choice. `sorted_flat` (M = T * k,) lists the flat indices in expert-sorted order,
so sorted row p belongs to flat choice sorted_flat[p] and expert g(p) (from group_sizes).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from kernels.gmm.reference import gmm_reference


def scatter_matmul_reference(
    x: jax.Array,
    w: jax.Array,
    sorted_flat: jax.Array,
    group_sizes: jax.Array,
    *,
    gates: jax.Array | None = None,
    x_grouped: bool = False,
    y_grouped: bool = False,
    transpose_w: bool = False,
) -> jax.Array:
  """Float32 reference of kernels.scatter.scatter_matmul (same argument meanings). The product
  is gmm_reference's masked dense product per expert (E times the FLOPs, no per-row weight
  tensor, which at the GPU check shapes was tens of GiB), zero for rows past the groups."""
  m = sorted_flat.shape[0]
  x32 = x.astype(jnp.float32)
  xin = x32 if x_grouped else x32[sorted_flat // (m // x.shape[0])]
  out = gmm_reference(xin, w.astype(jnp.float32), group_sizes, transpose_rhs=transpose_w,
                      out_dtype=jnp.float32)                                  # (M, N) sorted
  if y_grouped:
    return out
  flat = jnp.zeros_like(out).at[sorted_flat].set(out)  # token-choice order
  if gates is None:
    return flat
  t, k = gates.shape
  return jnp.einsum("tk,tkn->tn", gates.astype(jnp.float32), flat.reshape(t, k, -1))


def scatter_glu_reference(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    sorted_flat: jax.Array,
    group_sizes: jax.Array,
    gates: jax.Array,
    activation: Callable[[jax.Array], jax.Array],
) -> jax.Array:
  """Float32 reference of kernels.scatter.scatter_glu: (T, d) = sum_j gates[t, j] *
  (act(x[t] @ w_gate[e]) * (x[t] @ w_up[e])) @ w_down[e], with no rounding between the products;
  differentiable (plain jnp). The products are gmm_reference's masked dense products per expert
  (E times the FLOPs, no per-row weight tensor), so GPU checks can use it at a few thousand rows."""
  t, k = gates.shape
  x_rows = jnp.take(x.astype(jnp.float32), sorted_flat // k, axis=0)
  f32 = jnp.float32
  g = gmm_reference(x_rows, w_gate.astype(f32), group_sizes, out_dtype=f32)
  u = gmm_reference(x_rows, w_up.astype(f32), group_sizes, out_dtype=f32)
  rows = gmm_reference(activation(g) * u, w_down.astype(f32), group_sizes, out_dtype=f32)
  flat = jnp.zeros_like(rows).at[sorted_flat].set(rows)   # token-choice order
  return jnp.einsum("tk,tkn->tn", gates.astype(f32), flat.reshape(t, k, -1),
                    precision=jax.lax.Precision.HIGHEST)
