"""Stop a diverging run: the first step whose loss or gradient norm is not finite ends it, unsaved.

Reading a value from the device waits for the step that makes it, so the loop does not read every
step: FiniteWatch keeps the (loss, grad_norm) device scalars of the steps not yet checked and reads
them all at once where the loop waits anyway, at a logging step and before every checkpoint. A
state that became non-finite between two checks is so never saved, and the error names the first
bad step, not the one where it was noticed.
"""

from __future__ import annotations

import math
from typing import Any

import jax


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss or gradient norm (the CLI exits with DIVERGED = 3)."""

  def __init__(self, step: int, loss: float, grad_norm: float, lr: float, saved: int | None):
    self.step, self.loss, self.grad_norm, self.saved = step, loss, grad_norm, saved
    kept = f"the newest checkpoint is step {saved}" if saved else "no checkpoint was saved"
    super().__init__(
        f"step {step}: loss {loss:.6g}, grad_norm {grad_norm:.6g} (not finite); training stopped "
        f"without saving that state ({kept}); lower --lr (now {lr:g}) or raise --warmup-steps "
        f"and train into a new --out (a resume keeps the saved schedule)")


class FiniteWatch:
  """The unchecked steps' loss and grad_norm (device scalars); `check` reads them in one transfer."""

  def __init__(self, lr: float):
    self.lr = lr
    self._pending: list[tuple[int, Any, Any]] = []

  def add(self, step: int, metrics: dict[str, Any]) -> None:
    self._pending.append((step, metrics["loss"], metrics["grad_norm"]))

  def check(self, saved: int | None) -> None:
    """NonFiniteError for the first pending step with a non-finite loss or grad_norm.
    saved: the newest checkpoint's step (named in the error)."""
    pending, self._pending = self._pending, []
    values = jax.device_get([(loss, norm) for _, loss, norm in pending])
    for (step, _, _), (loss, norm) in zip(pending, values):
      loss, norm = float(loss), float(norm)
      if not (math.isfinite(loss) and math.isfinite(norm)):
        raise NonFiniteError(step, loss, norm, self.lr, saved)
