"""Training data: the embedded corpora, user text, pre-tokenized arrays; a resumable iterator.

Embedded corpora (no download; `--data` names them):
- "builtin" (or no --data): the running Python's own standard library source (its modules and
  their docstrings, real English + code), read in sorted path order, the first `corpus_bytes`.
- "python": the standard library plus the Python sources of every installed package (about 100 MB
  in the project's own .venv), one document per file: files over 1 MB (generated tables) and test
  folders left out, exact duplicates kept once, in a fixed order (sorted by the path below its
  root: "stdlib/...", then "site-packages/..."), so the order does not depend on where Python is
  installed. The exact bytes depend on the Python build and the installed versions.
Both are text: byte-level tokens (vocab 256), or BPE tokens when the run has a tokenizer
(jaxmoe.tokenizer; the GPU presets train one on the corpus).
- User text: a file or a folder (all files under it, sorted; binary files skipped), byte-level.
- Pre-tokenized: a .npy array (memory-mapped) or a raw .bin memmap of `dtype` (default uint16).

Splits: the last `val_fraction` of the token stream is validation.
Batches: batch `i` draws its windows from np.random.default_rng([seed, i]), so the position is just
the step counter: saving it and starting again from it reproduces the exact same batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig

import numpy as np

TEXT_SUFFIXES_SKIP = (".pyc", ".so", ".dll", ".exe", ".png", ".jpg", ".gif", ".zip", ".gz", ".bz2",
                      ".xz", ".pickle", ".pkl", ".whl", ".npy", ".bin")


class DataError(ValueError):
  """A user data problem (missing path, empty corpus, bad token values)."""


# Folders never read into the embedded corpora: vendored copies, tests (much generated data),
# caches, and the standard library's GUI demos.
_SKIP_DIRS = ("test", "tests", "__pycache__", "idlelib", "lib2to3", "turtledemo", "site-packages",
              "dist-packages")


def stdlib_corpus(max_bytes: int = 8 << 20) -> np.ndarray:
  """Up to max_bytes of the Python standard library's .py sources as uint8 tokens, sorted by path."""
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Skip vendored third-party packages and tests (much generated data in the tests).
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
  return _concat_files(sorted(files), max_bytes)


MAX_FILE_BYTES = 1 << 20


def python_corpus_documents(max_bytes: int | None = None) -> list[str]:
  """The "python" corpus: one str per source file, deduplicated, in a fixed order (module doc).

  max_bytes stops after the documents that reach it (None: all).
  """
  roots = [("stdlib", sysconfig.get_paths()["stdlib"])]
  for key in ("purelib", "platlib"):
    path = sysconfig.get_paths()[key]
    if all(os.path.realpath(path) != os.path.realpath(r) for _, r in roots):
      roots.append(("site-packages", path))
  keyed = []
  for label, root in roots:
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
      rel = os.path.relpath(dirpath, root)
      keyed += [(f"{label}/{rel}/{f}", os.path.join(dirpath, f)) for f in filenames
                if f.endswith(".py")]
  docs, seen, total = [], set(), 0
  for _, path in sorted(keyed):
    try:
      if os.path.getsize(path) > MAX_FILE_BYTES:
        continue
      with open(path, "rb") as f:
        data = f.read()
    except OSError:
      continue
    digest = hashlib.sha1(data).digest()
    if digest in seen or not data.strip() or b"\0" in data:
      continue
    seen.add(digest)
    docs.append(data.decode("utf-8", errors="replace"))
    total += len(data)
    if max_bytes is not None and total >= max_bytes:
      break
  return docs


def _concat_files(paths: list[str], max_bytes: int) -> np.ndarray:
  chunks, total = [], 0
  for path in paths:
    try:
      with open(path, "rb") as f:
        data = f.read(min(max_bytes - total, os.fstat(f.fileno()).st_size))
    except OSError:
      continue
    if b"\0" in data[:4096]:
      continue  # binary file
    chunks.append(data)
    total += len(data)
    if total >= max_bytes:
      break
  # Files are joined by a newline; the cut at max_bytes may fall anywhere.
  return np.frombuffer(b"\n".join(chunks)[:max_bytes], dtype=np.uint8)


def text_tokens(path: str, max_bytes: int = 1 << 40) -> np.ndarray:
  """A text file or a folder of them, byte-level uint8 tokens."""
  if os.path.isdir(path):
    paths = []
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      paths += [os.path.join(dirpath, f) for f in sorted(filenames)
                if not f.startswith(".") and not f.endswith(TEXT_SUFFIXES_SKIP)]
    return _concat_files(sorted(paths), max_bytes)
  try:
    with open(path, "rb") as f:
      head = f.read(4096)
  except OSError as e:
    raise DataError(f"cannot read data file {path!r}: {e.strerror}") from None
  if b"\0" in head:
    raise DataError(f"data file {path!r} is binary, not text; token ids go in a .npy file or a "
                    ".bin file with --data-dtype")
  return _concat_files([path], max_bytes)


def load_tokens(path: str | None, *, dtype: str = "uint16", max_bytes: int = 8 << 20) -> np.ndarray:
  """The token stream: embedded corpus (path None or "builtin"), .npy, .bin, or text/folder."""
  if path in (None, "", "builtin"):
    tokens = stdlib_corpus(max_bytes)
    source = "embedded corpus (Python standard library source)"
  elif not os.path.exists(path):
    raise DataError(f"data path {path!r} does not exist")
  elif path.endswith(".npy"):
    try:
      tokens = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
      raise DataError(f"data file {path!r} is not a readable .npy array: {e}") from None
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise DataError(f"data file {path!r} must hold a 1-D integer token array, got "
                      f"shape {tokens.shape} dtype {tokens.dtype}")
    source = path
  elif path.endswith(".bin"):
    try:
      np_dtype = np.dtype(dtype)
    except TypeError:
      raise DataError(f"data dtype must be a numpy integer dtype, got {dtype!r}") from None
    if not np.issubdtype(np_dtype, np.integer):
      raise DataError(f"data dtype must be a numpy integer dtype, got {dtype!r}")
    if os.path.getsize(path) % np_dtype.itemsize:
      raise DataError(f"data file {path!r} size {os.path.getsize(path)} is not a multiple of "
                      f"{np_dtype.itemsize} (dtype {np_dtype})")
    tokens = np.memmap(path, dtype=np_dtype, mode="r") if os.path.getsize(path) else \
        np.zeros((0,), np_dtype)
    source = path
  else:
    tokens = text_tokens(path)
    source = path
  if tokens.size == 0:
    raise DataError(f"corpus is empty: {source}")
  return tokens


def check_vocab(tokens: np.ndarray, vocab_size: int) -> None:
  """DataError unless every token is in [0, vocab_size) (chunked: works on large memmaps)."""
  step = 1 << 24
  for i in range(0, tokens.size, step):
    chunk = np.asarray(tokens[i:i + step])
    lo, hi = int(chunk.min()), int(chunk.max())
    if lo < 0 or hi >= vocab_size:
      raise DataError(f"token values must be in [0, vocab_size={vocab_size}), found "
                      f"{lo if lo < 0 else hi}; set --vocab-size")


def split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train, val): the last val_fraction of the stream is validation."""
  if not 0.0 <= val_fraction < 1.0:
    raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
  n_val = int(tokens.size * val_fraction)
  return tokens[:tokens.size - n_val], tokens[tokens.size - n_val:]


@dataclasses.dataclass
class Batches:
  """Deterministic, resumable batches of (inputs, targets), each (batch_size, seq_len) int32.

  Windows of seq_len + 1 tokens start at offsets drawn from default_rng([seed, position]).
  `position` is the index of the next batch; set it to resume.
  """

  tokens: np.ndarray
  batch_size: int
  seq_len: int
  seed: int = 0
  position: int = 0

  def __post_init__(self):
    if self.tokens.size < self.seq_len + 1:
      raise DataError(f"corpus has {self.tokens.size} tokens, fewer than seq_len + 1 = "
                      f"{self.seq_len + 1}")

  def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, index])
    starts = rng.integers(0, self.tokens.size - self.seq_len, size=self.batch_size)
    windows = np.stack([np.asarray(self.tokens[s:s + self.seq_len + 1]) for s in starts])
    windows = windows.astype(np.int32)
    return windows[:, :-1], windows[:, 1:]

  def __iter__(self):
    return self

  def __next__(self) -> tuple[np.ndarray, np.ndarray]:
    out = self.batch(self.position)
    self.position += 1
    return out
