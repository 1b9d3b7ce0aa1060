"""Tokenizers: raw bytes, or byte-level BPE through Hugging Face `tokenizers`.

- `ByteTokenizer`: one token per byte (vocab 256): the tiny CPU presets, no training.
- `BPETokenizer`: a `tokenizers.Tokenizer` (GPT-2-style byte-level BPE, so any text encodes and
  decodes back exactly), either a user's or a model's own `tokenizer.json`, or trained here on the
  corpus by `train_bpe`: deterministically (a fixed document order, one thread), so the same
  corpus and vocabulary size give the same merges on any machine; the result is cached by a hash
  of both (`cached_bpe`). A run stores its tokenizer as `<run>/tokenizer.json`, which
  `jaxmoe sample` decodes with.

Shapes: encode(str) -> (n,) int32 ids; decode(ids) -> str.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Protocol

import numpy as np

# Separates documents in a BPE token stream (id 0), as GPT-2's <|endoftext|> does.
END_OF_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
  """A tokenizer that cannot be read, trained or used with the model (a user problem)."""


class Tokenizer(Protocol):
  vocab_size: int

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
  """One token per UTF-8 byte; decoding replaces invalid byte sequences."""

  vocab_size = 256
  name = "byte"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(int(t) for t in ids).decode("utf-8", errors="replace")


class BPETokenizer:
  """A Hugging Face `tokenizers.Tokenizer` behind the Tokenizer protocol."""

  name = "bpe"

  def __init__(self, tokenizer):
    self.hf = tokenizer
    self.vocab_size = tokenizer.get_vocab_size()
    self.eot_id = tokenizer.token_to_id(END_OF_TEXT)

  @classmethod
  def from_file(cls, path: str) -> "BPETokenizer":
    from tokenizers import Tokenizer as HFTokenizer
    try:
      return cls(HFTokenizer.from_file(path))
    except Exception as e:  # tokenizers raises its own Exception subclass on any bad file
      raise TokenizerError(f"cannot read tokenizer file {path!r}: {e}") from None

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.hf.encode(text).ids, np.int32)

  def encode_documents(self, docs: list[str]) -> np.ndarray:
    """One stream: each document's ids followed by END_OF_TEXT (if the vocabulary has it)."""
    sep = [] if self.eot_id is None else [self.eot_id]
    parts = [np.asarray(e.ids + sep, np.int32) for e in self.hf.encode_batch(docs)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self.hf.decode([int(t) for t in ids], skip_special_tokens=False)

  def save(self, path: str) -> None:
    self.hf.save(path)

  def fingerprint(self) -> str:
    return hashlib.sha256(self.hf.to_str().encode()).hexdigest()[:16]


def train_bpe(docs: Iterable[str], vocab_size: int) -> BPETokenizer:
  """Byte-level BPE with vocab_size entries (256 bytes + END_OF_TEXT + merges) on docs, in order.

  Deterministic: the trainer runs on one thread (RAYON_NUM_THREADS=1 while it trains) over the
  documents in the order given.
  """
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import decoders, models, pre_tokenizers, trainers

  if not isinstance(vocab_size, int) or vocab_size < 258:
    raise TokenizerError(f"a BPE vocabulary needs vocab_size >= 258 (256 bytes, {END_OF_TEXT} and "
                         f"at least one merge), got {vocab_size!r}")
  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  with _single_thread():
    tok.train_from_iterator(docs, trainer=trainer)
  return BPETokenizer(tok)


def cached_bpe(docs: list[str], vocab_size: int, cache_dir: str, log=print) -> BPETokenizer:
  """train_bpe(docs, vocab_size), cached in cache_dir under a hash of the documents and size."""
  h = hashlib.sha256(f"bpe-v1 {vocab_size}\n".encode())
  for d in docs:
    h.update(hashlib.sha256(d.encode()).digest())
  path = os.path.join(cache_dir, f"bpe-{vocab_size}-{h.hexdigest()[:16]}.json")
  if os.path.exists(path):
    return BPETokenizer.from_file(path)
  log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {len(docs):,} documents "
      f"({sum(len(d) for d in docs) / 1e6:.0f} MB); cached as {path}")
  tok = train_bpe(docs, vocab_size)
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  tok.save(tmp)
  os.replace(tmp, path)   # a reader never sees a half-written file
  return tok


def load_run_tokenizer(run_dir: str, vocab_size: int) -> Tokenizer:
  """The tokenizer a run (or a converted model folder) stores: its tokenizer.json, else bytes."""
  path = os.path.join(run_dir, TOKENIZER_FILE)
  if os.path.exists(path):
    return BPETokenizer.from_file(path)
  if vocab_size < 256:
    raise TokenizerError(f"{run_dir} has no {TOKENIZER_FILE} and its vocab_size={vocab_size} is "
                         "below 256, so it is not byte-level either")
  return ByteTokenizer()


def describe(tokenizer: Tokenizer) -> dict:
  """A JSON-able record of the tokenizer for a run's config."""
  if isinstance(tokenizer, BPETokenizer):
    return {"kind": "bpe", "vocab_size": tokenizer.vocab_size, "sha256": tokenizer.fingerprint()}
  return {"kind": "byte", "vocab_size": 256}


class _single_thread:
  """RAYON_NUM_THREADS=1 for the duration (tokenizers reads it when its thread pool starts)."""

  def __enter__(self):
    self.old = os.environ.get("RAYON_NUM_THREADS")
    os.environ["RAYON_NUM_THREADS"] = "1"

  def __exit__(self, *exc):
    if self.old is None:
      os.environ.pop("RAYON_NUM_THREADS", None)
    else:
      os.environ["RAYON_NUM_THREADS"] = self.old


__all__ = ["BPETokenizer", "ByteTokenizer", "END_OF_TEXT", "TOKENIZER_FILE", "Tokenizer",
           "TokenizerError", "cached_bpe", "describe", "load_run_tokenizer", "train_bpe"]
