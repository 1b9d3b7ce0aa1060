"""Data: embedded corpus, text/npy/bin loading, split, deterministic resumable batches, errors."""

import numpy as np
import pytest

from jaxmoe.data import Batches, DataError, check_vocab, load_tokens, split, stdlib_corpus


def test_embedded_corpus_is_real_text_and_deterministic():
  a = stdlib_corpus(1 << 18)
  b = load_tokens(None, max_bytes=1 << 18)
  assert a.dtype == np.uint8 and a.size == 1 << 18
  np.testing.assert_array_equal(a, b)
  text = a.tobytes().decode("utf-8", errors="replace")
  assert "def " in text and "import " in text and "return" in text


def test_text_folder_npy_bin(tmp_path, rng):
  (tmp_path / "txt").mkdir()
  (tmp_path / "txt" / "b.txt").write_text("world")
  (tmp_path / "txt" / "a.txt").write_text("hello ")
  np.testing.assert_array_equal(load_tokens(str(tmp_path / "txt")),
                                np.frombuffer(b"hello \nworld", np.uint8))
  np.testing.assert_array_equal(load_tokens(str(tmp_path / "txt" / "a.txt")),
                                np.frombuffer(b"hello ", np.uint8))
  toks = rng.integers(0, 1000, 500).astype(np.uint16)
  np.save(tmp_path / "t.npy", toks)
  toks.tofile(tmp_path / "t.bin")
  np.testing.assert_array_equal(load_tokens(str(tmp_path / "t.npy")), toks)
  np.testing.assert_array_equal(load_tokens(str(tmp_path / "t.bin"), dtype="uint16"), toks)
  check_vocab(toks, 1000)
  with pytest.raises(DataError, match="vocab_size=999"):
    check_vocab(np.append(toks, 999), 999)


@pytest.mark.parametrize("kind", ["empty_file", "empty_dir", "missing", "empty_bin", "odd_bin",
                                  "2d_npy"])
def test_bad_data(tmp_path, kind):
  path = tmp_path / "x"
  if kind == "empty_file":
    path.write_text("")
  elif kind == "empty_dir":
    path.mkdir()
  elif kind == "empty_bin":
    path = tmp_path / "x.bin"
    path.write_bytes(b"")
  elif kind == "odd_bin":
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
  elif kind == "2d_npy":
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 2), np.int32))
  match = {"missing": "does not exist", "odd_bin": "not a multiple", "2d_npy": "1-D"}.get(kind, "empty")
  with pytest.raises(DataError, match=match):
    load_tokens(str(path))


def test_split():
  train, val = split(np.arange(100), 0.1)
  np.testing.assert_array_equal(train, np.arange(90))
  np.testing.assert_array_equal(val, np.arange(90, 100))
  with pytest.raises(DataError, match="val_fraction"):
    split(np.arange(10), 1.0)


def test_batches_deterministic_and_resumable():
  tokens = np.arange(1000, dtype=np.uint16)
  it = Batches(tokens, batch_size=4, seq_len=8, seed=3)
  first = [next(it) for _ in range(5)]
  x, y = first[0]
  assert x.shape == (4, 8) and x.dtype == np.int32
  np.testing.assert_array_equal(y, x + 1)  # targets are the next tokens
  resumed = Batches(tokens, batch_size=4, seq_len=8, seed=3, position=3)
  np.testing.assert_array_equal(next(resumed)[0], first[3][0])
  np.testing.assert_array_equal(next(resumed)[0], first[4][0])
  assert not np.array_equal(first[0][0], first[1][0])
  other = Batches(tokens, batch_size=4, seq_len=8, seed=4)
  assert not np.array_equal(next(other)[0], first[0][0])
  with pytest.raises(DataError, match="fewer than seq_len"):
    Batches(tokens[:8], batch_size=1, seq_len=8)
