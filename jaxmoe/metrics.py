"""Run outputs: metrics as JSONL and TensorBoard scalars, and a terminal progress bar.

The TensorBoard writer encodes the event-file format itself (TFRecord framing with masked CRC32C
around `Event{wall_time, step, summary{value{tag, simple_value}}}` protobufs), so neither
TensorFlow nor tensorboard is needed to write; `tensorboard --logdir RUN/tb` reads the files.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from typing import Any, TextIO


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    byte = n & 0x7F
    n >>= 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
  msg = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
  if file_version is not None:
    msg += _field_bytes(3, file_version.encode())
  if scalars:
    values = b"".join(
        _field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
        for tag, value in scalars.items())
    msg += _field_bytes(5, values)
  return msg


def tfrecord(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


class TensorBoardWriter:
  """Append-only scalar event file in `logdir` (a new file per writer, like TensorFlow's)."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "ab")
    self._f.write(tfrecord(_event(time.time(), 0, file_version="brain.Event:2")))
    self._f.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    finite = {k: float(v) for k, v in values.items()
              if isinstance(v, (int, float)) and math.isfinite(float(v))}
    if finite:
      self._f.write(tfrecord(_event(time.time(), step, scalars=finite)))
      self._f.flush()

  def close(self) -> None:
    self._f.close()


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


class MetricsLogger:
  """Writes each record to RUN/metrics.jsonl and its numeric fields to TensorBoard (RUN/tb)."""

  def __init__(self, run_dir: str, tensorboard: bool = True):
    os.makedirs(run_dir, exist_ok=True)
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self._f = open(self.path, "a")
    self._tb = TensorBoardWriter(os.path.join(run_dir, "tb")) if tensorboard else None

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
  """`step/total [#####.....] loss 2.31 | 12.3k tok/s | ETA 01:23` on one updating line (a TTY),
  or one line per update otherwise (logs)."""

  def __init__(self, total: int, start: int = 0, stream: TextIO | None = None, width: int = 24):
    self.total, self.start, self.width = total, start, width
    self.stream = stream or sys.stderr
    self.tty = self.stream.isatty()
    self.t0 = time.perf_counter()

  def update(self, step: int, loss: float, tokens_per_s: float) -> None:
    done = step - self.start
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
    filled = int(self.width * step / max(self.total, 1))
    bar = "#" * filled + "." * (self.width - filled)
    line = (f"{step}/{self.total} [{bar}] loss {loss:.4f} | {tokens_per_s / 1e3:.1f}k tok/s | "
            f"ETA {_duration(eta)}")
    if self.tty:
      self.stream.write("\r" + line)
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()
