"""Checkpoints with orbax CheckpointManager: train state (arrays) + metadata (JSON), keep the last N.

Layout: DIR/<step>/{state,meta}. Orbax writes each save into a temporary folder and renames it
only once complete, so a failed or interrupted save never replaces the last good checkpoint (an
unfinished temporary folder is ignored by `latest_step`). Saves are synchronous: a save requested
by a signal handler is on disk before the process exits.

Restoring takes an abstract state (jax.ShapeDtypeStruct leaves carrying the target shardings), so a
checkpoint written on one mesh is restored directly onto another.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A missing, empty or unreadable checkpoint (a user-facing error)."""


class Checkpointer:
  """Save/restore (state pytree, metadata dict) by step under `directory`, keeping `keep` newest."""

  def __init__(self, directory: str, keep: int = 3, *, create: bool = True):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    self.directory = os.path.abspath(directory)
    if not create and not os.path.isdir(self.directory):
      raise CheckpointError(f"checkpoint directory {directory!r} does not exist")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    self._manager.reload()
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    self._manager.reload()
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Write checkpoint `step` (blocking). Overwrites nothing: an existing step is left alone."""
    if step in self.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()

  def read_meta(self, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, metadata) of checkpoint `step` (default: the latest)."""
    step = self._resolve(step)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable: "
                            f"{type(e).__name__}: {e}") from None
    if not isinstance(out.meta, dict):
      raise CheckpointError(f"checkpoint {self.directory}/{step} has no metadata")
    return step, out.meta

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(state, metadata) of checkpoint `step`, state placed per abstract_state's shardings."""
    step, meta = self.read_meta(step)
    try:
      out = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:
      raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable or does not match "
                            f"the model: {type(e).__name__}: {e}") from None
    return out.state, meta

  def restore_partial(self, abstract_subtree: dict[str, Any],
                      step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Like restore, for a dict holding only some top-level keys of the saved state."""
    step, meta = self.read_meta(step)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item=abstract_subtree,
              restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_subtree),
              partial_restore=True)))
    except Exception as e:
      raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable or does not match "
                            f"the model: {type(e).__name__}: {e}") from None
    missing = [jax.tree_util.keystr(path) for path, leaf in
               jax.tree_util.tree_flatten_with_path(out.state)[0] if not isinstance(leaf, jax.Array)]
    if missing:  # orbax hands back the abstract leaf where the checkpoint has no such array
      raise CheckpointError(f"checkpoint {self.directory}/{step} does not match the model: no "
                            f"arrays for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return out.state, meta

  def _resolve(self, step: int | None) -> int:
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint found in {self.directory}")
    if step is None:
      return max(steps)
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; have {steps}")
    return step

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree: Any, sharding: jax.sharding.Sharding | Any) -> Any:
  """ShapeDtypeStruct leaves of tree's shapes/dtypes (a restore target) placed with `sharding`:
  one Sharding for every leaf, or a pytree of Shardings of tree's structure (one per leaf, e.g.
  jaxmoe.parallel.tree_shardings(tree, mesh))."""
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      sharding)
