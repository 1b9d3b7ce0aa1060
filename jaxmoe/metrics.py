"""Run outputs: metrics as JSONL and TensorBoard scalars, and a terminal progress bar.

TensorBoard event files are written by `tensorboardX` (no TensorFlow or tensorboard needed to
write; `tensorboard --logdir RUN/tb` reads them); the bar is `rich.progress` on a terminal and one
plain line per update otherwise, so that logs of a run under a job system stay readable.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, TextIO


class TensorBoardWriter:
  """Scalar event file in `logdir`: a new file per writer (named with the process id, so two
  writers started in the same second never share one), non-finite values left out."""

  def __init__(self, logdir: str, flush_secs: int = 10, purge_step: int | None = None):
    """purge_step: TensorBoard hides the folder's older events of steps >= purge_step (those of
    a run resumed from purge_step - 1)."""
    from tensorboardX import SummaryWriter  # imported here: only runs that log to TensorBoard pay

    os.makedirs(logdir, exist_ok=True)
    self.logdir = logdir
    self._writer = SummaryWriter(logdir, flush_secs=flush_secs, filename_suffix=f".{os.getpid()}",
                                 purge_step=purge_step)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    wall_time = time.time()
    for tag, value in values.items():
      if isinstance(value, (int, float)) and math.isfinite(float(value)):
        self._writer.add_scalar(tag, float(value), global_step=step, walltime=wall_time)

  def close(self) -> None:
    self._writer.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All records of a metrics JSONL file (a torn last line from a killed run is skipped)."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def truncate_jsonl(path: str, last_step: int) -> bool:
  """Drop the records of steps after `last_step` (and torn lines) from a metrics file, rewriting
  it atomically (a temporary file, then os.replace); records without a step stay. True if the
  file held any record (it was rewritten only if something was dropped)."""
  if not os.path.exists(path):
    return False
  with open(path) as f:
    lines = f.read().splitlines()
  keep = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    step = record.get("step") if isinstance(record, dict) else None
    if not isinstance(step, int) or step <= last_step:
      keep.append(line)
  if len(keep) < len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
  return bool(lines)


class MetricsLogger:
  """Writes each record to RUN/metrics.jsonl and its numeric fields to TensorBoard (RUN/tb).

  resume_step: the step a run starts from (0 for a fresh one). Records the folder holds for later
  steps (written after the checkpoint a killed run resumes from) are dropped from metrics.jsonl,
  and TensorBoard is told to hide their events, so every step appears once, in order.
  """

  def __init__(self, run_dir: str, tensorboard: bool = True, resume_step: int | None = None):
    os.makedirs(run_dir, exist_ok=True)
    self.path = os.path.join(run_dir, "metrics.jsonl")
    had_records = resume_step is not None and truncate_jsonl(self.path, resume_step)
    self._f = open(self.path, "a")
    purge = resume_step + 1 if had_records else None
    self._tb = TensorBoardWriter(os.path.join(run_dir, "tb"), purge_step=purge) \
        if tensorboard else None

  def log(self, record: dict[str, Any]) -> None:
    self._f.write(json.dumps(record, default=float) + "\n")
    self._f.flush()
    if self._tb is not None and "step" in record:
      self._tb.scalars(int(record["step"]), {k: v for k, v in record.items() if k != "step"})

  def close(self) -> None:
    self._f.close()
    if self._tb is not None:
      self._tb.close()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
  """Training progress: on a terminal a `rich` bar (`step/total`, bar, loss, tokens/s, ETA) on one
  updating line; otherwise (a log file, a pipe) one line per update,
  `step/total loss 2.3100 | 12.3k tok/s | ETA 01:23`."""

  def __init__(self, total: int, start: int = 0, stream: TextIO | None = None):
    self.total, self.start = total, start
    self.stream = stream or sys.stderr
    self.t0 = time.perf_counter()
    self._progress = None
    if self.stream.isatty():
      from rich.console import Console
      from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

      self._progress = Progress(
          MofNCompleteColumn(), BarColumn(),
          TextColumn("loss {task.fields[loss]:.4f} | {task.fields[tokens_per_s]:.1f}k tok/s | ETA"),
          TimeRemainingColumn(), console=Console(file=self.stream))
      self._task = self._progress.add_task("train", total=total, completed=start,
                                           loss=float("nan"), tokens_per_s=0.0)
      self._progress.start()

  def update(self, step: int, loss: float, tokens_per_s: float) -> None:
    if self._progress is not None:
      self._progress.update(self._task, completed=step, loss=loss, tokens_per_s=tokens_per_s / 1e3)
      return
    done = step - self.start
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
    self.stream.write(f"{step}/{self.total} loss {loss:.4f} | {tokens_per_s / 1e3:.1f}k tok/s | "
                      f"ETA {_duration(eta)}\n")
    self.stream.flush()

  def close(self) -> None:
    if self._progress is not None:
      self._progress.stop()
