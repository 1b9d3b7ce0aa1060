"""Float32 router logits x @ W from 16-bit activations, on bf16 tensor cores.

router_logits:  x (T, d) bfloat16/float16/float32, w (d, E) float32 -> (T, E) float32

A router keeps its weights and logits in float32 (top-k and softmax are sensitive to rounding),
and a float32 matmul at full precision runs on CUDA cores: on an H200 the (40960, 768) x (768, 128)
router of a 1.4B-scale fine-grained layer took 215 us forward and ~400 us backward at
Precision.HIGHEST, about 10% of the whole layer, more than its gather or its combine.

For 16-bit x the same float32 result comes from bf16 tensor-core matmuls. W splits exactly into
three bfloat16 parts, W = W1 + W2 + W3 (each part the bfloat16 rounding of what the earlier parts
left: 3 x 8 mantissa bits cover float32's 24). x is exact in bfloat16 (a float16 x is widened to
float32 and split the same way, since float16 has more mantissa bits than bfloat16), and the
product of two bfloat16 numbers is exact in float32, so x @ [W1 | W2 | W3] with float32
accumulation, summed over the parts, is the float32 product up to the order of the float32
additions, as Precision.HIGHEST is. One matmul of width 3E does it.

Backward (custom_vjp):
  dW = x^T @ dL: dL (float32) splits exactly into three bfloat16 parts, x is exact: one matmul of
       width 3E, as in the forward, so dW keeps float32 accuracy.
  dx = dL @ W^T: the result is rounded to x's 16-bit dtype, so three of the nine part products
       (hi.hi, hi.lo, lo.hi: relative error ~2^-16, far below bfloat16's 2^-8) are enough: one
       matmul over K = 3E.
A float32 x (float32 models, or jitter noise applied in float32) takes the Precision.HIGHEST dot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BF16 = jnp.bfloat16


def split_bf16(a: jax.Array, parts: int) -> list[jax.Array]:
  """bfloat16 arrays whose float32 sum is `a` (exact for parts=3 and finite float32 `a` away from
  the bottom of the exponent range); each part is the rounding of what the earlier ones left."""
  if parts < 1:
    raise ValueError(f"parts must be >= 1, got {parts}")
  out, rest = [], a.astype(jnp.float32)
  for _ in range(parts):
    p = rest.astype(_BF16)
    out.append(p)
    rest = rest - p.astype(jnp.float32)
  return out


def _dot_f32(a: jax.Array, b: jax.Array, dims) -> jax.Array:
  return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


def _sum_parts(y: jax.Array, parts: int) -> jax.Array:
  """(..., parts * E) -> (..., E): the sum over the parts laid side by side."""
  return y.reshape(*y.shape[:-1], parts, y.shape[-1] // parts).sum(axis=-2)


def _x_parts(x: jax.Array) -> list[jax.Array]:
  # bfloat16 x is one exact part; float16 (11 mantissa bits) needs two.
  return [x] if x.dtype == _BF16 else split_bf16(x, 2)


def _forward(x: jax.Array, w: jax.Array) -> jax.Array:
  w_cat = jnp.concatenate(split_bf16(w, 3), axis=1)                    # (d, 3E)
  return sum(_sum_parts(_dot_f32(xp, w_cat, ((1,), (0,))), 3) for xp in _x_parts(x))


@jax.custom_vjp
def _split_logits(x: jax.Array, w: jax.Array) -> jax.Array:
  return _forward(x, w)


def _split_logits_fwd(x, w):
  return _forward(x, w), (x, w)


def _split_logits_bwd(res, dl):
  x, w = res
  dl_parts = split_bf16(dl, 3)
  dl_cat = jnp.concatenate(dl_parts, axis=1)                           # (T, 3E)
  dw = sum(_sum_parts(_dot_f32(xp, dl_cat, ((0,), (0,))), 3) for xp in _x_parts(x))
  w_hi, w_lo = split_bf16(w, 2)
  # hi.hi + hi.lo + lo.hi as one product over K = 3E.
  lhs = jnp.concatenate([dl_parts[0], dl_parts[0], dl_parts[1]], axis=1)   # (T, 3E)
  rhs = jnp.concatenate([w_hi, w_lo, w_hi], axis=1)                        # (d, 3E)
  dx = _dot_f32(lhs, rhs, ((1,), (1,))).astype(x.dtype)
  return dx, dw.astype(w.dtype)


_split_logits.defvjp(_split_logits_fwd, _split_logits_bwd)


@jax.checkpoint
def _highest_logits(x: jax.Array, w: jax.Array) -> jax.Array:
  # Under jax.checkpoint the backward keeps x as given and recasts it, instead of keeping a
  # float32 copy of the (T, d) activations.
  return jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)


def router_logits(x: jax.Array, w: jax.Array) -> jax.Array:
  """Float32 logits x @ w at float32 accuracy; see the module docstring.

  Args:
    x: (T, d) floating activations.
    w: (d, E) float32 router weights.
  """
  if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a 2-D floating array, got {x.dtype}{list(x.shape)}")
  if w.ndim != 2 or w.shape[0] != x.shape[1] or w.dtype != jnp.float32:
    raise ValueError(f"w must be float32 of shape ({x.shape[1]}, E), got {w.dtype}{list(w.shape)}")
  if jnp.dtype(x.dtype).itemsize == 2:
    return _split_logits(x, w)
  return _highest_logits(x, w)

