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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _lse(logits: jax.Array) -> jax.Array:
  return jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)


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
