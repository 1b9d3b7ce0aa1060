"""Tokenizers and the tokenized corpus: deterministic BPE training, exact round trips, caching,
the embedded "python" corpus, and clear errors on data a tokenizer cannot take."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxmoe import corpus as corpus_lib
from jaxmoe import data as data_lib
from jaxmoe import tokenizer as tok_lib

TEXT = ["def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
        "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
        "# Ünïcode, emoji 🙂 and tabs\t survive a round trip.\n"] * 20


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXMOE_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache"


def test_bpe_training_is_deterministic_and_round_trips():
  a = tok_lib.train_bpe(TEXT, 300)
  b = tok_lib.train_bpe(TEXT, 300)
  assert a.fingerprint() == b.fingerprint()
  assert a.vocab_size == 300 and a.eot_id == 0
  for text in TEXT[:3] + ["never seen: żółw ∑ 🙂\n"]:
    ids = a.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 300
    assert a.decode(ids) == text
  # Merges compress: fewer ids than bytes on the training text.
  assert a.encode(TEXT[0]).size < len(TEXT[0].encode())


def test_bpe_vocab_size_is_checked():
  with pytest.raises(tok_lib.TokenizerError, match="vocab_size >= 258"):
    tok_lib.train_bpe(TEXT, 100)


def test_cached_bpe_trains_once(cache):
  logs = []
  a = tok_lib.cached_bpe(TEXT, 300, str(cache), log=logs.append)
  b = tok_lib.cached_bpe(TEXT, 300, str(cache), log=logs.append)
  assert len(logs) == 1 and a.fingerprint() == b.fingerprint()
  assert [f for f in os.listdir(cache) if f.endswith(".json")]


def test_corpus_bpe_on_a_text_folder(tmp_path, cache):
  folder = tmp_path / "text"
  folder.mkdir()
  for i, t in enumerate(TEXT[:3]):
    (folder / f"{i}.py").write_text(t * 30)
  logs = []
  c = corpus_lib.load(str(folder), "bpe", vocab_size=320, log=logs.append)
  assert isinstance(c.tokenizer, tok_lib.BPETokenizer) and c.tokenizer.vocab_size == 320
  assert int(np.max(c.tokens)) < 320 and c.tokens.size > 100
  assert "def add(a, b)" in c.tokenizer.decode(np.asarray(c.tokens[:200]))
  again = corpus_lib.load(str(folder), "bpe", vocab_size=320, log=logs.append)
  np.testing.assert_array_equal(c.tokens, again.tokens)
  assert len(logs) == 2   # trained and encoded once; the second load reads both caches
  # The user's tokenizer.json encodes the same text the same way.
  path = tmp_path / "tokenizer.json"
  c.tokenizer.save(str(path))
  mine = corpus_lib.load(str(folder), str(path), vocab_size=320)
  np.testing.assert_array_equal(c.tokens, mine.tokens)


def test_corpus_refuses_what_a_tokenizer_cannot_take(tmp_path, cache):
  np.save(tmp_path / "ids.npy", np.arange(100, dtype=np.uint16))
  with pytest.raises(data_lib.DataError, match="holds token ids"):
    corpus_lib.load(str(tmp_path / "ids.npy"), "bpe", vocab_size=512)
  with pytest.raises(tok_lib.TokenizerError, match="no such file"):
    corpus_lib.load(None, str(tmp_path / "missing.json"), vocab_size=512)
  (tmp_path / "t.txt").write_text("some text " * 200)
  small = tok_lib.train_bpe(["some text " * 50], 300)
  small.save(str(tmp_path / "tok.json"))
  with pytest.raises(tok_lib.TokenizerError, match="vocab_size=256"):
    corpus_lib.load(str(tmp_path / "t.txt"), str(tmp_path / "tok.json"), vocab_size=256)


def test_binary_file_as_text_data_is_named(tmp_path):
  path = tmp_path / "blob.dat"
  path.write_bytes(b"\x00\x01\x02" * 100)
  with pytest.raises(data_lib.DataError, match="is binary, not text"):
    data_lib.load_tokens(str(path))


def test_python_corpus_is_deduplicated_and_ordered():
  docs = data_lib.python_corpus_documents(4 << 20)
  assert sum(len(d.encode()) for d in docs) >= 4 << 20   # it stops after reaching max_bytes
  assert len(set(docs)) == len(docs)
  assert docs == data_lib.python_corpus_documents(4 << 20)


def test_run_tokenizer_falls_back_to_bytes(tmp_path):
  assert isinstance(tok_lib.load_run_tokenizer(str(tmp_path), 256), tok_lib.ByteTokenizer)
  with pytest.raises(tok_lib.TokenizerError, match="no tokenizer.json"):
    tok_lib.load_run_tokenizer(str(tmp_path), 128)
  tok_lib.train_bpe(TEXT, 300).save(str(tmp_path / "tokenizer.json"))
  assert tok_lib.load_run_tokenizer(str(tmp_path), 300).vocab_size == 300


def _train(out, **train):
  from jaxmoe.config import ModelConfig, TrainConfig
  from jaxmoe.presets import get_preset
  from jaxmoe.train import run
  p = get_preset("test")
  model = {**p["model"], **train.pop("model", {})}
  return run(ModelConfig.from_dict(model), TrainConfig.from_dict({**p["train"], **train}),
             str(out), progress=False, log=lambda *_: None)


def test_a_bpe_run_keeps_its_tokenizer_and_sample_decodes_with_it(tmp_path, cache, capsys):
  from jaxmoe import cli
  folder = tmp_path / "text"
  folder.mkdir()
  for i, t in enumerate(TEXT[:3]):
    (folder / f"{i}.py").write_text(t * 40)
  _train(tmp_path / "run", steps=4, ckpt_every=0, eval_every=0, data=str(folder),
         tokenizer="bpe", model={"vocab_size": 320})
  saved = tok_lib.load_run_tokenizer(str(tmp_path / "run"), 320)
  assert isinstance(saved, tok_lib.BPETokenizer) and saved.vocab_size == 320
  capsys.readouterr()
  assert cli.main(["sample", str(tmp_path / "run"), "--prompt", "def add", "--tokens", "8"]) == 0
  assert capsys.readouterr().out.startswith("def add")


@pytest.mark.slow
def test_init_from_starts_with_the_saved_parameters(tmp_path):
  import jax
  from flax import nnx

  from jaxmoe.config import ConfigError
  from jaxmoe.sample import load_model
  _train(tmp_path / "a", steps=3, ckpt_every=0, eval_every=0)
  _train(tmp_path / "b", steps=3, ckpt_every=0, eval_every=0, init_from=str(tmp_path / "a"))
  # b's first logged loss continues from a's parameters: lower than a fresh model's first loss.
  first = lambda run: [json.loads(l) for l in open(run / "metrics.jsonl")][0]["loss"]
  assert first(tmp_path / "b") < first(tmp_path / "a")
  # A changed runtime field is fine; a changed architecture is named.
  with pytest.raises(ConfigError, match=r"differs in d_model \(saved 32, requested 64\)"):
    _train(tmp_path / "c", steps=1, init_from=str(tmp_path / "a"),
           model={"d_model": 64, "n_heads": 4})
  assert not os.path.exists(tmp_path / "c")
  a, _ = load_model(str(tmp_path / "a"))
  assert jax.tree.leaves(nnx.state(a, nnx.Param))
