"""Memory-lean optimizer step (DeepSpeed-TED's tiled optimizer, arXiv 2303.06318, section 4.3).

A plain `tx.update` + `optax.apply_updates` over the whole parameter tree lets XLA materialize the
optimizer's temporaries (the update tree, moment intermediates) for every parameter at once: with
the train state donated (updated in place), XLA's plan for an AdamW step holds a temporary as
large as all the parameters. Here the leaves are split into chunks of about equal bytes and updated
one chunk after the other, each chunk's parameters and optimizer state written before the next
chunk starts (an optimization barrier ties the next chunk's inputs to the previous chunk's outputs),
so the temporaries of only one chunk are ever live.

  tx = lean_optimizer.chunked(optax.adamw(schedule, ...), params, num_chunks=4)
  opt_state = tx.init(params)
  params, opt_state = lean_optimizer.lean_step(tx, grads, opt_state, params)   # inside jit

`chunked` needs a *leaf-separable* transformation: one whose update of a leaf depends only on that
leaf's gradient, parameter and state (adam, adamw, lion, sgd with momentum, weight decay, masks...).
Global clipping is built in (`max_grad_norm`): the global norm is one scalar reduction over all
gradients, and the clip itself is applied inside each chunk. That matters: `optax.chain(
optax.clip_by_global_norm(c), optax.adamw(...))` on the whole tree materializes the clipped
gradient tree, a temporary as large as the parameters, which is exactly what this avoids.
The result equals `optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)` on the whole tree
(same clip formula as optax; equal up to float32 rounding, as XLA may fuse a chunk's elementwise
math differently).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class ChunkedState(NamedTuple):
  """State of a chunked transformation: one inner state per chunk."""

  chunks: tuple[Any, ...]


class ChunkedTransformation(NamedTuple):
  """optax-compatible (init, update) plus the chunk layout used by lean_step.

  groups: the leaf indices (in jax.tree.leaves order of the params) of each chunk.
  inner: the wrapped leaf-separable transformation.
  max_grad_norm: global-norm clipping before `inner` (None: none).
  """

  init: Any
  update: Any
  groups: tuple[tuple[int, ...], ...]
  inner: optax.GradientTransformation
  max_grad_norm: float | None


def chunk_groups(params: Any, num_chunks: int) -> tuple[tuple[int, ...], ...]:
  """Splits the leaves of `params` (arrays or ShapeDtypeStructs) into at most num_chunks groups
  of consecutive leaves with about equal bytes (a leaf larger than the target is a group by
  itself). Returns the leaf indices of each non-empty group, in order."""
  if not isinstance(num_chunks, int) or isinstance(num_chunks, bool) or num_chunks < 1:
    raise ValueError(f"num_chunks must be a positive int, got {num_chunks!r}")
  leaves = _slots(params)[0]
  sizes = [sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(v))
           for v in leaves]
  target = sum(sizes) / num_chunks if leaves else 0
  groups, cur, acc = [], [], 0
  for i, s in enumerate(sizes):
    if cur and acc + s > target * (1 + 1e-9) and len(groups) < num_chunks - 1:
      groups.append(tuple(cur))
      cur, acc = [], 0
    cur.append(i)
    acc += s
  if cur:
    groups.append(tuple(cur))
  return tuple(groups)


def _is_slot(x) -> bool:
  return isinstance(x, nnx.Variable)


def _slots(tree: Any):
  """(slots, treedef): the leaves of `tree`, an nnx.Variable (Param) counting as one leaf so its
  metadata (logical axis names: the sharding rules) survives into the chunks' optimizer state."""
  return jax.tree.flatten(tree, is_leaf=_is_slot)


def _select(tree: Any, group: Sequence[int]) -> list:
  leaves = _slots(tree)[0]
  return [leaves[i] for i in group]


def _clipper(grads: Any, max_grad_norm: float | None):
  """Per-leaf clip function of optax.clip_by_global_norm for the whole tree `grads`."""
  if max_grad_norm is None:
    return lambda t: t
  g_norm = optax.tree.norm(grads)
  trigger = jnp.squeeze(g_norm < max_grad_norm)
  return lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_grad_norm)


def chunked(tx: optax.GradientTransformation, params: Any, num_chunks: int = 4,
            max_grad_norm: float | None = None) -> ChunkedTransformation:
  """Wraps a leaf-separable `tx` to run chunk by chunk over the leaves of `params` (a template:
  arrays or ShapeDtypeStructs of the parameter tree the optimizer will see).

  Each chunk is a list of leaves (an nnx.Variable is one leaf, kept whole, so the optimizer state
  of a chunk carries the parameters' logical names and jaxmoe.parallel.tree_shardings places it
  like the parameters). A callable mask, e.g. adamw's weight-decay mask, is applied per chunk and
  must work on a list; a pytree mask must be a callable here. max_grad_norm: clip
  the gradients to this global norm first, as optax.clip_by_global_norm (None: no clipping).
  update(grads, state, params) returns the full update tree, like any optax transformation;
  lean_step applies it chunk by chunk.
  """
  if not isinstance(tx, optax.GradientTransformation):
    raise ValueError(f"tx must be an optax.GradientTransformation, got {type(tx).__name__}")
  if max_grad_norm is not None and (not isinstance(max_grad_norm, (int, float))
                                    or isinstance(max_grad_norm, bool) or not max_grad_norm > 0):
    raise ValueError(f"max_grad_norm must be None or a number > 0, got {max_grad_norm!r}")
  groups = chunk_groups(params, num_chunks)
  treedef = _slots(params)[1]

  def init(params):
    if _slots(params)[1] != treedef:
      raise ValueError("chunked.init: params do not have the template's tree structure")
    return ChunkedState(tuple(tx.init(_select(params, g)) for g in groups))

  def update(grads, state, params=None):
    clip = _clipper(grads, max_grad_norm)
    out = [None] * treedef.num_leaves
    new_chunks = []
    for g, s in zip(groups, state.chunks):
      p = None if params is None else _select(params, g)
      u, s = tx.update(jax.tree.map(clip, _select(grads, g)), s, p)
      new_chunks.append(s)
      for i, leaf in zip(g, u):
        out[i] = leaf
    return jax.tree.unflatten(treedef, out), ChunkedState(tuple(new_chunks))

  return ChunkedTransformation(init, update, groups, tx, max_grad_norm)


def lean_step(tx: ChunkedTransformation, grads: Any, state: ChunkedState, params: Any
              ) -> tuple[Any, ChunkedState]:
  """(new params, new state): the global gradient norm (one scalar), then for each chunk in turn
  clip + tx.update + optax.apply_updates, sequenced by jax.lax.optimization_barrier so chunk i+1
  starts only after chunk i's parameters and state are written. Use inside jit, with the params
  and state donated, to cap the optimizer's temporaries at one chunk.

  grads, params: pytrees of the same structure (as given to chunked); state from tx.init.
  """
  if not isinstance(tx, ChunkedTransformation):
    raise ValueError(f"tx must come from lean_optimizer.chunked, got {type(tx).__name__}")
  p_leaves, treedef = _slots(params)
  clip = _clipper(grads, tx.max_grad_norm)
  g_leaves = _slots(grads)[0]
  new_p = list(p_leaves)
  new_chunks = []
  carry = ()
  for gi, s in zip(tx.groups, state.chunks):
    g = [g_leaves[i] for i in gi]
    p = [p_leaves[i] for i in gi]
    # The barrier makes this chunk's inputs depend on the previous chunk's outputs.
    (g, s, p), _ = jax.lax.optimization_barrier(((g, s, p), carry))
    u, s = tx.inner.update(jax.tree.map(clip, g), s, p)
    p = optax.apply_updates(p, u)
    new_chunks.append(s)
    for i, leaf in zip(gi, p):
      new_p[i] = leaf
    carry = (p, s)
  return jax.tree.unflatten(treedef, new_p), ChunkedState(tuple(new_chunks))
