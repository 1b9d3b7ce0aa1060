"""Softmax cross-entropy over a large vocabulary, reading the 16-bit logits instead of float32 copies.

cross_entropy:  logits (..., V) floating, targets (...) int -> per-token loss (...) float32
                loss = logsumexp(logits) - logits[target], computed in float32

The usual form, `-take(log_softmax(logits.astype(float32)), targets)`, left to autodiff writes the
float32 logits and the float32 log-probabilities (each 4 B per logit) in the forward pass and keeps
them for the backward one, which then writes a float32 softmax before casting its cotangent back
to the head matmul's dtype. At the Small preset's batch of 64 x 1024 tokens and the GPT-2 vocabulary
(50304) each of those arrays is 13 GB: ~29 ms of elementwise passes in a 270 ms step (H100).

Here the forward pass reads the (16-bit) logits once to get the float32 log-sum-exp per token and
keeps only the logits (already written by the head matmul) and that (...) vector; the backward
pass reads the logits once more and writes dlogits = (softmax - onehot(target)) * g in the logits'
dtype, one fused pass. The math is the same float32 math in both passes.

Reverse-mode only (a custom_vjp): jax.jvp through it raises. Targets outside [0, V) give NaN
losses (jnp.take_along_axis's fill), as the plain form does.

linear_cross_entropy:  x (B, T, D), w (D, V), targets (B, T) int -> the mean loss, float32
                       = mean(cross_entropy(x @ w, targets)), the logits never all in memory

Even read once, the (B T, V) logits are the largest activation of an LM's training step: 6.1 GiB
in bf16 at the Small preset (65536 tokens, V 50304), kept from the forward pass for the backward
one. This op runs the head's matmul, the loss and the whole backward of both chunk by chunk along
the sequence (`num_chunks` pieces of T, each (B, T / num_chunks) tokens: with the batch split over
devices, every chunk is too), inside the forward pass: per chunk the logits, their log-sum-exp,
dlogits = (softmax - onehot) / (B T) in x's dtype, dx = dlogits w^T and dw += x^T dlogits (float32;
per block of `batch_shards` rows, so that a batch split over devices sums dw across them once).
It keeps dx (B, T, D) and dw (D, V) for the backward pass, which only scales them by the
cotangent. The same matmuls and elementwise passes as the logits path, in the same dtypes
(dlogits and dx rounded to x's dtype; dw summed over chunks in float32, rounded once to w's
dtype): a value the same to float32 rounding, gradients to the rounding of their 16-bit parts.
Without differentiation only the loss is computed, chunk by chunk as well; under differentiation
both gradients are computed, whichever is used (the forward pass cannot know). Reverse-mode only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _lse_combine(a, b):
  """Merges two (max, sum of exp(x - max)) partials of a log-sum-exp."""
  (m1, s1), (m2, s2) = a, b
  m = jnp.maximum(m1, m2)
  # The side holding the max is taken as it is: exp(m - m) is 1, and for m = +-inf it would be
  # NaN. The other side's exp(-inf) is 0, so -inf entries add nothing.
  return m, (jnp.where(m1 == m, s1, s1 * jnp.exp(m1 - m))
             + jnp.where(m2 == m, s2, s2 * jnp.exp(m2 - m)))


def _lse(logits: jax.Array) -> jax.Array:
  """float32 log-sum-exp over the last axis in one read of the logits: a variadic reduction of
  (running max, sum of exp(x - running max)) pairs, the online softmax's recurrence.
  jax.nn.logsumexp reads them twice (a max pass, then a sum-of-exp pass): at 8192 tokens x 50304
  two passes of 0.3 ms each on the H100 (experiments/results/h100/
  2026-12-07-profile-small-b64-lean-dmoe.json)."""
  x = logits.astype(jnp.float32)
  m, s = jax.lax.reduce((x, jnp.ones_like(x)), (jnp.float32(-jnp.inf), jnp.float32(0.0)),
                        _lse_combine, (x.ndim - 1,))
  return m + jnp.log(s)


def _target_logit(logits: jax.Array, targets: jax.Array) -> jax.Array:
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1,
                               mode="fill", fill_value=jnp.nan)
  return picked[..., 0].astype(jnp.float32)


@jax.custom_vjp
def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return _lse(logits) - _target_logit(logits, targets)


def _cross_entropy_fwd(logits, targets):
  lse = _lse(logits)
  return lse - _target_logit(logits, targets), (logits, targets, lse)


def _cross_entropy_bwd(residuals, g):
  logits, targets, lse = residuals
  probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
  vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  onehot = (vocab == targets[..., None].astype(jnp.int32)).astype(jnp.float32)
  dlogits = (probs - onehot) * g.astype(jnp.float32)[..., None]
  # Integer targets have no cotangent (None: a zero one).
  return dlogits.astype(logits.dtype), None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token softmax cross-entropy, float32: logsumexp(logits) - logits[targets].

  Args:
    logits: (..., V) floating array (bf16 from a bf16 head matmul: it is read as it is, never
      copied to float32 in memory); its gradient comes back in the same dtype.
    targets: (...) integer array, logits.shape[:-1], values in [0, V) (others give NaN).
  Returns: (...) float32 losses. Take the mean (or a masked mean) for the objective.
  """
  if not jnp.issubdtype(logits.dtype, jnp.floating) or logits.ndim < 1:
    raise ValueError(f"logits: must be a floating array with a vocabulary axis, got "
                     f"{logits.dtype}{list(logits.shape)}")
  if not jnp.issubdtype(targets.dtype, jnp.integer) or targets.shape != logits.shape[:-1]:
    raise ValueError(f"targets: must be an integer array of shape logits.shape[:-1] = "
                     f"{tuple(logits.shape[:-1])}, got {targets.dtype}{list(targets.shape)}")
  return _cross_entropy(logits, targets)


def cross_entropy_reference(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """The plain autodiff form: -log_softmax(float32 logits)[targets], per token."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _chunked(a: jax.Array, num_chunks: int, t: int) -> jax.Array:
  """(B, T, ...) -> (num_chunks, B, T / num_chunks, ...), T zero-padded to a multiple of num_chunks
  first (`t` is the padded length)."""
  a = jnp.pad(a, [(0, 0), (0, t - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
  return jnp.moveaxis(a.reshape(a.shape[0], num_chunks, t // num_chunks, *a.shape[2:]), 1, 0)


def _unchunked(a: jax.Array, t: int) -> jax.Array:
  """The inverse of _chunked: (num_chunks, B, T / num_chunks, ...) -> (B, t, ...)."""
  a = jnp.moveaxis(a, 0, 1)
  return a.reshape(a.shape[0], -1, *a.shape[3:])[:, :t]


def _chunk_logits(x_c: jax.Array, w: jax.Array) -> jax.Array:
  # The head's matmul as the logits path runs it: operands and result in x's dtype, float32
  # accumulation inside. Not preferred_element_type=float32 and a cast: XLA then has the GEMM
  # write float32 logits and converts them in a pass of its own (0.8 ms per chunk of 8192 tokens
  # at the GPT-2 vocabulary on the H100, 6.4 ms of a Small step).
  return jnp.einsum("btd,dv->btv", x_c, w)


def _scan_chunks(x, w, targets, num_chunks: int, batch_shards: int, with_grads: bool):
  """(sum of the valid tokens' losses, dx (B, T, D) | None, dw (D, V) float32 | None).

  dw is carried as (batch_shards, D, V), each block of B / batch_shards rows summing its own
  rows: with the batch split over devices in those blocks, every device adds into its own slice
  and the sum across devices happens once, after the loop (a (D, V) carry would be summed across
  devices in every chunk)."""
  b, t, d = x.shape
  s = batch_shards
  t_pad = -(-t // num_chunks) * num_chunks
  valid = _chunked(jnp.ones((b, t), jnp.bool_), num_chunks, t_pad)
  xs = (_chunked(x, num_chunks, t_pad), _chunked(targets, num_chunks, t_pad), valid)
  inv_n = 1.0 / (b * t)

  def body(dw, chunk):
    x_c, y_c, ok = chunk
    logits = _chunk_logits(x_c, w)
    lse = _lse(logits)
    loss = jnp.where(ok, lse - _target_logit(logits, y_c), 0.0)
    # The per-token losses leave the loop and are summed after it: a sum here would be one more
    # reduction across devices in every chunk.
    if not with_grads:
      return dw, (loss, None)
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    onehot = (vocab == y_c[..., None]).astype(jnp.float32)
    dlogits = jnp.where(ok[..., None], (probs - onehot) * inv_n, 0.0).astype(x.dtype)
    dx_c = jnp.einsum("btv,dv->btd", dlogits, w)   # in x's dtype, as _chunk_logits
    blocks = lambda a: a.reshape(s, b // s, *a.shape[1:])   # noqa: E731
    dw = dw + jnp.einsum("sbtd,sbtv->sdv", blocks(x_c), blocks(dlogits),
                         preferred_element_type=jnp.float32)
    return dw, (loss, dx_c)

  dw0 = jnp.zeros((s, *w.shape), jnp.float32) if with_grads else jnp.zeros((), jnp.float32)
  dw, (losses, dx) = jax.lax.scan(body, dw0, xs)
  if not with_grads:
    return jnp.sum(losses), None, None
  return jnp.sum(losses), _unchunked(dx, t), jnp.sum(dw, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _linear_cross_entropy(x, w, targets, num_chunks, batch_shards):
  total, _, _ = _scan_chunks(x, w, targets, num_chunks, batch_shards, with_grads=False)
  return total / (x.shape[0] * x.shape[1])


def _linear_cross_entropy_fwd(x, w, targets, num_chunks, batch_shards):
  total, dx, dw = _scan_chunks(x, w, targets, num_chunks, batch_shards, with_grads=True)
  return total / (x.shape[0] * x.shape[1]), (dx, dw, jnp.zeros((0,), w.dtype))


def _linear_cross_entropy_bwd(num_chunks, batch_shards, residuals, g):
  dx, dw, w_like = residuals
  g = g.astype(jnp.float32)
  return (dx.astype(jnp.float32) * g).astype(dx.dtype), (dw * g).astype(w_like.dtype), None


_linear_cross_entropy.defvjp(_linear_cross_entropy_fwd, _linear_cross_entropy_bwd)


def linear_cross_entropy(x: jax.Array, w: jax.Array, targets: jax.Array, *,
                         num_chunks: int, batch_shards: int = 1) -> jax.Array:
  """The mean softmax cross-entropy of the logits x @ w, computed in chunks of the sequence (see
  the module docstring): the (B, T, V) logits are never all in memory.

  Args:
    x: (B, T, D) floating, the features before the head (the logits are in x's dtype, float32
      accumulation).
    w: (D, V) the head's weight, of x's dtype (its gradient comes back in it).
    targets: (B, T) integer, values in [0, V) (others give a NaN loss).
    num_chunks: pieces the sequence is cut into (T need not be a multiple: the last piece is
      padded and its padding masked); each holds (B, ceil(T / num_chunks), V) logits at a time.
    batch_shards: the blocks of rows the batch is split into over devices (the data-parallel
      degree; it divides B): the head's gradient is then summed across devices once, not in
      every chunk. 1 on one device.
  Returns: the float32 mean over the B T tokens.
  """
  for name, value in (("num_chunks", num_chunks), ("batch_shards", batch_shards)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name}: must be a positive int, got {value!r}")
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim != 3 or 0 in x.shape:
    raise ValueError(f"x: must be a non-empty floating (B, T, D) array, got "
                     f"{x.dtype}{list(x.shape)}")
  if w.ndim != 2 or w.shape[0] != x.shape[2] or jnp.dtype(w.dtype) != jnp.dtype(x.dtype):
    raise ValueError(f"w: must be a (D={x.shape[2]}, V) array of x's dtype {x.dtype}, got "
                     f"{w.dtype}{list(w.shape)}")
  if not jnp.issubdtype(targets.dtype, jnp.integer) or targets.shape != x.shape[:2]:
    raise ValueError(f"targets: must be an integer array of shape (B, T) = {tuple(x.shape[:2])}, "
                     f"got {targets.dtype}{list(targets.shape)}")
  if num_chunks > x.shape[1]:
    raise ValueError(f"num_chunks: must be at most T = {x.shape[1]}, got {num_chunks}")
  if x.shape[0] % batch_shards:
    raise ValueError(f"batch_shards: must divide B = {x.shape[0]}, got {batch_shards}")
  return _linear_cross_entropy(x, w, targets.astype(jnp.int32), num_chunks, batch_shards)
