"""SIGTERM/SIGINT during training: finish the current step, save a checkpoint, return."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopFlag:
  """Set by SIGTERM/SIGINT: the loop saves a checkpoint after the current step and returns."""

  def __init__(self):
    self.signum: int | None = None
    self._old: dict[int, Any] = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None:   # a second signal: stop now
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
