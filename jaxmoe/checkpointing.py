"""Checkpoints with orbax CheckpointManager: train state (arrays) + metadata (JSON), keep the last N.

Layout: DIR/<step>/{state,meta}. Orbax writes each save into a temporary folder and renames it
only once complete, so a failed or interrupted save never replaces the last good checkpoint (an
unfinished temporary folder is ignored by `latest_step`). Saves are synchronous: a save requested
by a signal handler is on disk before the process exits.

Restoring takes an abstract state (jax.ShapeDtypeStruct leaves carrying the target shardings), so a
checkpoint written on one mesh is restored directly onto another.

A damaged checkpoint (a truncated or garbled file) is reported in one line with the innermost
reason (orbax wraps TensorStore's errors in a dump of the whole array spec). `restore_newest` falls
back to the newest checkpoint that restores and renames the damaged newer ones to
DIR/<step>.corrupt, a name orbax does not list as a step: kept for inspection, never deleted, and
never rotated out by `keep` or overwritten by a new save of that step.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, TypeVar

import jax
import orbax.checkpoint as ocp


T = TypeVar("T")

# A reason longer than this is cut: the error line stays one readable line.
_REASON_CHARS = 240


class CheckpointError(ValueError):
  """A missing, empty or unreadable checkpoint (a user-facing error)."""


def short_reason(err: BaseException) -> str:
  """One line saying why a restore failed: the innermost cause's first line (orbax wraps
  TensorStore's own message, e.g. `OUT_OF_RANGE: ... is not valid for value of size 50`, in an
  exception whose text is the whole array spec), its type name first, cut to _REASON_CHARS."""
  seen = []
  while err is not None and err not in seen:
    seen.append(err)
    err = err.__cause__ or err.__context__
  inner = seen[-1]
  lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
  text = f"{type(inner).__name__}: {lines[0] if lines else ''}".rstrip(": ")
  return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS - 3] + "..."


def _is_orbax_leftover(exc: BaseException | None, obj: Any) -> bool:
  """True for what a failed orbax read leaves behind once the restore has already failed: its
  other array reads' coroutines finalized with their own copy of the error, and TensorStore
  callbacks landing on orbax's closed event loop."""
  code = getattr(obj, "cr_code", None)
  if code is not None and "orbax" in code.co_filename:
    return True
  return obj is None and isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


class _OrbaxLeftoverFilter(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    return not ("exception was never retrieved" in text and "orbax" in text)


_muted = False


def mute_failed_read_leftovers() -> None:
  """Keep a failed restore to its one CheckpointError line: without this, the sibling reads orbax
  leaves running print dozens of lines of tracebacks and TensorStore specs (through
  sys.unraisablehook and the asyncio logger) after the error, even after a fallback succeeded.
  Only those are dropped; anything else reaches the previous hook. Installed once, for good (the
  leftovers arrive from other threads, after the restore has returned)."""
  global _muted
  if _muted:
    return
  _muted = True
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_orbax_leftover(unraisable.exc_value, unraisable.object):
      previous(unraisable)

  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_OrbaxLeftoverFilter())


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
    mute_failed_read_leftovers()
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable: "
                            f"{short_reason(e)}") from None
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
                            f"the model: {short_reason(e)}") from None
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
                            f"the model: {short_reason(e)}") from None
    missing = [jax.tree_util.keystr(path) for path, leaf in
               jax.tree_util.tree_flatten_with_path(out.state)[0] if not isinstance(leaf, jax.Array)]
    if missing:  # orbax hands back the abstract leaf where the checkpoint has no such array
      raise CheckpointError(f"checkpoint {self.directory}/{step} does not match the model: no "
                            f"arrays for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return out.state, meta

  def restore_newest(self, restore: Callable[[int], T], *, set_aside: bool = True,
                     log: Callable[[str], Any] = print) -> tuple[int, T]:
    """(step, restore(step)) for the newest step whose restore raises no CheckpointError.

    Each newer checkpoint that failed is named in one log line with the reason and, with
    set_aside, renamed to DIR/<step>.corrupt (kept; orbax no longer lists it). Nothing is renamed
    unless an older checkpoint restores: when none does (say the code no longer matches every
    checkpoint), the newest one's CheckpointError is raised and the folder is left as it is.
    Other errors from `restore` (a refused resume) propagate at once.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"no checkpoint found in {self.directory}")
    failed: list[tuple[int, CheckpointError]] = []
    for step in steps:
      try:
        value = restore(step)
      except CheckpointError as e:
        failed.append((step, e))
        continue
      for bad, err in failed:
        moved = f", renamed to {self.set_aside(bad)}" if set_aside else ""
        log(f"{err}; skipped{moved}; using step {step}")
      return step, value
    newest = failed[0][1]
    older = len(failed) - 1
    more = "" if not older else " (nor does the older one)" if older == 1 else \
        f" (nor do the {older} older ones)"
    raise CheckpointError(f"{newest}{more}") from None

  def set_aside(self, step: int) -> str:
    """Rename checkpoint `step` to DIR/<step>.corrupt (or .corrupt-2, ...); returns the new path."""
    source = os.path.join(self.directory, str(step))
    target, n = source + ".corrupt", 1
    while os.path.exists(target):
      n += 1
      target = f"{source}.corrupt-{n}"
    os.rename(source, target)
    self._manager.reload()
    return target

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
