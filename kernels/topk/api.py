"""kernels.top_k: the k largest scores of each row and their indices, on a registry backend.

Values are differentiable in x as jax.lax.top_k's are: the tangent of the values is the tangent
of x at the chosen indices (a custom_jvp, so forward and reverse mode both work and the backward
is a scatter of the cotangent to the chosen lanes). The kernels themselves only choose.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np

from kernels.common import validation
from kernels.topk.backends import TOPK_BACKENDS
from kernels.topk.shapes import TopKShape


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _differentiable(x, k, run):
  return run(x, k)


@_differentiable.defjvp
def _differentiable_jvp(k, run, primals, tangents):
  (x,), (dx,) = primals, tangents
  values, indices = run(x, k)
  dvalues = jnp.take_along_axis(dx, indices, axis=-1)
  return (values, indices), (dvalues, np.zeros(indices.shape, jax.dtypes.float0))


def _check_k(k, e: int) -> int:
  try:
    if isinstance(k, bool):
      raise TypeError
    k = operator.index(k)
  except TypeError:
    raise ValueError(f"k must be an int in [1, E={e}], got {k!r}") from None
  if not 1 <= k <= e:
    raise ValueError(f"k must be in [1, E={e}] (E: x.shape[1]), got {k}")
  return k


def top_k(x: jax.Array, k: int, *, backend: str | None = None,
          config=None) -> tuple[jax.Array, jax.Array]:
  """The k largest scores of each row of x, best first, and their indices; as jax.lax.top_k.

  Args:
    x: (T, E) float32, bfloat16 or float16 scores.
    k: 1 <= k <= E.
    backend: a name of kernels.TOPK_BACKENDS (None: "pallas" on a GPU, "xla" elsewhere; "pallas"
      runs the Triton kernel for E <= 1024, else jax.lax.top_k).
    config: a kernels.topk.TritonTopKConfig for the Triton backends (None: its default).
  Returns:
    values (T, k) of x's dtype and indices (T, k) int32. Among equal scores the lowest index
    comes first; scores rank in XLA's float total order (-NaN < -inf < -0 < +0 < +inf < +NaN),
    the order jax.lax.top_k uses, so NaN scores are chosen first as there.
  """
  validation.check_float_operand("x", x, 2)
  t, e = x.shape
  if e < 1:
    raise ValueError(f"x must have at least one column (E >= 1), got shape {tuple(x.shape)}")
  k = _check_k(k, e)
  shape, dtypes = TopKShape(t, e, k), (jnp.dtype(x.dtype),)
  chosen = TOPK_BACKENDS.select(backend, shape, dtypes)
  if config is not None and not isinstance(config, chosen.config_classes or ()):
    raise ValueError(f"config must be one of {[c.__name__ for c in chosen.config_classes]} for "
                     f"backend {chosen.name!r}, got {type(config).__name__}")
  # The kernel's own limits (not the platform: a "triton" call may be lowered for a GPU from a
  # CPU host, as the other ops' may).
  why = chosen.check(shape, dtypes, config if config is not None
                     else chosen.default_config(shape, dtypes))
  if why is not None:
    raise ValueError(f"backend {chosen.name!r} cannot run kernels.top_k on x {x.dtype}"
                     f"{list(x.shape)}, k={k}: it needs {why}")
  if chosen.name == "xla":   # lax.top_k has its own derivative rules
    return chosen.fn(x, k)
  run = functools.partial(chosen.fn, config=config) if config is not None else chosen.fn
  return _differentiable(x, k, run)
