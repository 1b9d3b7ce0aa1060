"""One helper: run a Flax NNX module's computation under jax.checkpoint.

  checkpointed(module, *args, apply=None) -> apply(module, *args)   (default: module(*args))

The backward pass then keeps only `args` and the module's parameters and recomputes everything in
between. Functional split/merge rather than nnx.remat: the computation mutates no state, and this
works on a module merged inside a jit. The callers say why they recompute (the model's blocks and
norms, the experts' MLP).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx


def checkpointed(module: nnx.Module, *args: Any,
                 apply: Callable[..., Any] | None = None) -> Any:
  """apply(module, *args) (module(*args) when apply is None) under jax.checkpoint."""
  graphdef, state = nnx.split(module)

  def run(state, *args):
    m = nnx.merge(graphdef, state)
    return m(*args) if apply is None else apply(m, *args)

  return jax.checkpoint(run)(state, *args)
