"""A run's token stream and its tokenizer, from `--data` and `--tokenizer`, cached on disk.

  tokenizer "byte": text is read as bytes (vocab 256); .npy/.bin data are token ids as they are.
  tokenizer "bpe": a byte-level BPE of the model's vocab_size is trained on the training share of
    the text (jaxmoe.tokenizer.cached_bpe), and the text is encoded with it.
  tokenizer PATH: a tokenizer.json (a user's, or a Hugging Face model's) encodes the text.

Encoded corpora are cached as .npy under the cache folder (JAXMOE_CACHE, else ~/.cache/jaxmoe),
keyed by a hash of the documents and the tokenizer, so the second run of a preset starts at once.
The run stores the tokenizer it used as <run>/tokenizer.json (BPE) for `jaxmoe sample`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from jaxmoe import data as data_lib
from jaxmoe import tokenizer as tok_lib

EMBEDDED = ("builtin", "python")
PRETOKENIZED_SUFFIXES = (".npy", ".bin")


@dataclasses.dataclass(frozen=True)
class Corpus:
  tokens: np.ndarray           # (n,) integer token ids
  tokenizer: tok_lib.Tokenizer
  source: str                  # what was read, for the log


def cache_dir() -> str:
  return os.environ.get("JAXMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxmoe")


def documents(data: str | None, corpus_bytes: int) -> tuple[list[str], str]:
  """The text documents of --data (an embedded corpus, a text file or a folder of them)."""
  if data in (None, "", "builtin"):
    raw = data_lib.stdlib_corpus(corpus_bytes).tobytes()
    return [raw.decode("utf-8", errors="replace")], "embedded corpus (Python standard library)"
  if data == "python":
    return (data_lib.python_corpus_documents(corpus_bytes),
            "embedded corpus (Python standard library and installed packages' sources)")
  if not os.path.exists(data):
    raise data_lib.DataError(f"data path {data!r} does not exist")
  raw = data_lib.text_tokens(data, corpus_bytes).tobytes()
  return [raw.decode("utf-8", errors="replace")], data


def load(data: str | None, tokenizer: str, *, vocab_size: int, data_dtype: str = "uint16",
         corpus_bytes: int = 8 << 20, val_fraction: float = 0.05, log=print) -> Corpus:
  """The token stream of `data` under `tokenizer` ("byte", "bpe" or a tokenizer.json path)."""
  pretokenized = isinstance(data, str) and data.endswith(PRETOKENIZED_SUFFIXES)
  if tokenizer == "byte":
    if data == "python":
      docs, source = documents(data, corpus_bytes)
      tokens = np.frombuffer("\n".join(docs).encode(), np.uint8)
      if tokens.size == 0:
        raise data_lib.DataError(f"corpus is empty: {source}")
      return Corpus(tokens, tok_lib.ByteTokenizer(), source)
    tokens = data_lib.load_tokens(data, dtype=data_dtype, max_bytes=corpus_bytes)
    return Corpus(tokens, tok_lib.ByteTokenizer(), data or "embedded corpus")
  if pretokenized:
    if tokenizer == "bpe":
      raise data_lib.DataError(f"--tokenizer bpe trains on text, but --data {data!r} holds token "
                               "ids; give the tokenizer.json that made them, or --tokenizer byte")
    tokens = data_lib.load_tokens(data, dtype=data_dtype, max_bytes=corpus_bytes)
    return Corpus(tokens, tok_lib.BPETokenizer.from_file(tokenizer), data)
  docs, source = documents(data, corpus_bytes)
  if not any(d.strip() for d in docs):
    raise data_lib.DataError(f"corpus is empty: {source}")
  if tokenizer == "bpe":
    tok = tok_lib.cached_bpe(_training_share(docs, val_fraction), vocab_size, cache_dir(), log=log)
  else:
    if not os.path.isfile(tokenizer):
      raise tok_lib.TokenizerError(f"--tokenizer must be 'byte', 'bpe' or a tokenizer.json file, "
                                   f"got {tokenizer!r} (no such file)")
    tok = tok_lib.BPETokenizer.from_file(tokenizer)
  if tok.vocab_size > vocab_size:
    raise tok_lib.TokenizerError(f"the tokenizer has {tok.vocab_size} tokens, more than the "
                                 f"model's vocab_size={vocab_size}; set --vocab-size")
  return Corpus(_encoded(docs, tok, log), tok, source)


def _training_share(docs: list[str], val_fraction: float) -> list[str]:
  """The documents before the validation share (the stream's last val_fraction): the tokenizer
  never sees validation text. A single document is cut at the same fraction."""
  total = sum(len(d) for d in docs)
  budget = int(total * (1.0 - val_fraction))
  out, used = [], 0
  for d in docs:
    if used + len(d) > budget:
      out.append(d[:budget - used])
      break
    out.append(d)
    used += len(d)
  return [d for d in out if d]


def _encoded(docs: list[str], tok: tok_lib.BPETokenizer, log) -> np.ndarray:
  h = hashlib.sha256(tok.fingerprint().encode())
  for d in docs:
    h.update(hashlib.sha256(d.encode()).digest())
  path = os.path.join(cache_dir(), f"tokens-{h.hexdigest()[:16]}.npy")
  if os.path.exists(path):
    return np.load(path, mmap_mode="r")
  log(f"encoding {sum(len(d) for d in docs) / 1e6:.0f} MB of text with the tokenizer; cached as "
      f"{path}")
  tokens = tok.encode_documents(docs)
  tokens = tokens.astype(np.uint16 if tok.vocab_size <= 1 << 16 else np.int32)
  os.makedirs(cache_dir(), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.npy"
  np.save(tmp, tokens)
  os.replace(tmp, path)
  return tokens
