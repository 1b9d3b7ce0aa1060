"""One run at a time per run folder: an exclusive flock on RUN/.lock for the whole run.

The lock is the kernel's (fcntl.flock), so it ends with the process however that ends (an
exception, a signal, SIGKILL, a crash): a lock file left by a dead process holds no lock and the
next run takes it over, saying whose it was. The file holds the holder's pid, host and start time
(JSON), which a second run reads to say who has the folder. A clean release deletes the file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Any, Callable

LOCK_FILE = ".lock"


class RunFolderLocked(Exception):
  """Another live process holds the run folder's lock (a user-facing error: one line, exit 2)."""


def _describe(holder: dict[str, Any] | None) -> str:
  if not holder:
    return "another process (which has not written its name yet)"
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
  return f"process {holder.get('pid')} on host {holder.get('host')} (since {since})"


def _read_holder(fd: int) -> dict[str, Any] | None:
  try:
    raw = os.pread(fd, 4096, 0)
    holder = json.loads(raw) if raw.strip() else None
  except (OSError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None


class RunLock:
  """`with RunLock(run_dir):` holds run_dir/.lock (run_dir is created if missing).

  A second RunLock on the same folder, in this or another process, raises RunFolderLocked naming
  the holder and changes nothing.
  """

  def __init__(self, run_dir: str, log: Callable[[str], Any] = print):
    self.run_dir = run_dir
    self.path = os.path.join(run_dir, LOCK_FILE)
    self.log = log
    self._fd: int | None = None

  def acquire(self) -> None:
    os.makedirs(self.run_dir, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = _read_holder(fd)
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise
        raise RunFolderLocked(
            f"run folder {self.run_dir!r} is in use by {_describe(holder)}; wait for that run to "
            f"end (or stop it), or train into another --out") from None
      # A holder releasing the lock deletes the file: if it did so between our open and our
      # flock, we hold a lock on a deleted file, and must lock the new one instead.
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    stale = _read_holder(fd)
    if stale:
      self.log(f"taking over the lock of {self.run_dir}: {_describe(stale)} no longer runs")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "since": time.time()}).encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)   # while still locked: no other run can have locked this file
    except FileNotFoundError:
      pass
    os.close(self._fd)       # closing the last descriptor releases the flock
    self._fd = None

  def __enter__(self) -> "RunLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
