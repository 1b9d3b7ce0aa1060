"""The jaxmoe command: configuration precedence, and each user mistake -> one error line, exit 2."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from jaxmoe import cli
from jaxmoe.checkpointing import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(capsys, *argv):
  code = cli.main(list(argv))
  return code, capsys.readouterr().err


def test_precedence_preset_file_flags(tmp_path):
  cfg = tmp_path / "c.toml"
  cfg.write_text('[model]\nd_model = 64\nn_heads = 8\n[train]\nsteps = 7\nlr = 0.5\n')
  args = cli.build_parser().parse_args(["train", "--preset", "test", "--config", str(cfg),
                                        "--lr", "0.25", "--moe-impl", "capacity",
                                        "--remat", "true", "--backend", "none"])
  model, train = cli.resolve_configs(args)
  assert (model.d_model, model.n_heads, model.moe_impl, model.remat, model.backend) == \
      (64, 8, "capacity", True, None)
  assert (model.n_layers, train.steps, train.lr, train.batch_size) == (2, 7, 0.25, 8)


@pytest.mark.parametrize("argv", [["train", "--steps", "ten"],
                                  ["train", "--remat", "maybe"], ["frobnicate"]])
def test_argparse_errors_exit_2(argv, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--moe-impl", "magic"], "moe_impl must be one of"),
    (["--n-heads", "3"], "divisible by n_heads=3"),
    (["--mesh-data", "1", "--mesh-expert", "8"], "num_experts=4 is not divisible"),
    (["--mesh-tensor", "3", "--mesh-data", "1"], "must be divisible by the mesh's tensor axis"),
    (["--batch-size", "12"], "batch_size=12 is not divisible"),
    (["--lr", "-1"], "lr must be a finite number > 0"),
    (["--seq-len", "64"], "exceeds model.max_seq_len"),
])
def test_bad_config_exit_2(flags, message, tmp_path, capsys):
  code, err = _main(capsys, "train", "--preset", "test", "--out", str(tmp_path / "r"), *flags)
  assert code == 2 and message in err and "Traceback" not in err, err
  assert not os.path.exists(tmp_path / "r" / "ckpt")


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"), ('{"model": {"widht": 3}}', "unknown model config keys"),
    ('{"optim": {}}', "only 'model' and 'train'"), (None, "cannot read config file")])
def test_bad_config_file_exit_2(content, message, tmp_path, capsys):
  path = tmp_path / "c.json"
  if content is not None:
    path.write_text(content)
  code, err = _main(capsys, "train", "--preset", "test", "--config", str(path))
  assert code == 2 and message in err, err


def test_empty_corpus_and_bad_tokens_exit_2(tmp_path, capsys):
  (tmp_path / "empty.txt").write_text("")
  code, err = _main(capsys, "train", "--preset", "test", "--data", str(tmp_path / "empty.txt"),
                    "--out", str(tmp_path / "r"))
  assert code == 2 and "corpus is empty" in err
  import numpy as np
  np.save(tmp_path / "t.npy", np.arange(1000, dtype=np.int32))
  code, err = _main(capsys, "train", "--preset", "test", "--data", str(tmp_path / "t.npy"),
                    "--out", str(tmp_path / "r"))
  assert code == 2 and "vocab_size=256" in err


def _tree_snapshot(root):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(root) for f in files}


def test_resume_with_other_model_refused_and_nothing_destroyed(tmp_path, capsys):
  run_dir = tmp_path / "r"
  ck = Checkpointer(str(run_dir / "ckpt"))
  ck.save(3, {"x": jnp.ones(3)}, {"step": 3, "model": {"d_model": 999}})
  ck.close()
  before = _tree_snapshot(run_dir)
  code, err = _main(capsys, "train", "--preset", "test", "--out", str(run_dir))
  assert code == 2 and "different model" in err
  assert _tree_snapshot(run_dir) == before


def test_sample_missing_and_corrupt_checkpoint_exit_2(tmp_path, capsys):
  code, err = _main(capsys, "sample", str(tmp_path / "nothing"))
  assert code == 2 and "does not exist" in err
  (tmp_path / "emptyrun" / "ckpt").mkdir(parents=True)
  code, err = _main(capsys, "sample", str(tmp_path / "emptyrun"))
  assert code == 2 and "no checkpoint found" in err
  ck = Checkpointer(str(tmp_path / "bad" / "ckpt"))
  ck.save(1, {"x": jnp.ones(3)}, {"step": 1, "model": {"d_model": 32}})
  ck.save(2, {"x": jnp.ones(3)}, {"step": 2, "model": {"widht": 32}})
  ck.close()
  code, err = _main(capsys, "sample", str(tmp_path / "bad" / "ckpt" / "1"))
  assert code == 2 and "does not match the model" in err
  code, err = _main(capsys, "sample", str(tmp_path / "bad"))
  assert code == 2 and "no valid model config" in err
  assert (tmp_path / "bad" / "ckpt" / "1" / "meta" / "metadata").is_file()
  (tmp_path / "bad" / "ckpt" / "1" / "meta" / "metadata").write_text("{garbage")
  code, err = _main(capsys, "sample", str(tmp_path / "bad" / "ckpt" / "1"))
  assert code == 2 and "unreadable" in err


def test_plot(tmp_path, capsys):
  code, err = _main(capsys, "plot", str(tmp_path))
  assert code == 2 and "no metrics file" in err
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step in range(1, 6):
      f.write(json.dumps({"step": step, "loss": 5.0 / step, "tokens_per_s": 1000.0 + step,
                          "aux_loss": 1.1, "val_loss": 4.0 / step if step % 2 else None}) + "\n")
    f.write('{"step": 6, "loss"')   # a torn last line (killed run) is skipped
  code = cli.main(["plot", str(tmp_path)])
  assert code == 0
  png = tmp_path / "curves.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000


def test_console_error_has_no_traceback(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "jaxmoe.cli", "train", "--preset", "test",
                         "--n-kv-heads", "3", "--out", str(tmp_path / "r")],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("jaxmoe: error: ")
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("preset_value,want", [(None, "0.92"), ("0.5", "0.5")])
def test_gpu_memory_fraction_default_does_not_override(preset_value, want, monkeypatch, tmp_path,
                                                       capsys):
  """`jaxmoe` lets JAX preallocate 92% of GPU memory (large presets need more than its 75%
  default) unless XLA_PYTHON_CLIENT_MEM_FRACTION is already set; no effect on CPU."""
  # setenv first records the variable's state, so teardown restores it (unset or not).
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "unused")
  if preset_value is None:
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
  else:
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", preset_value)
  code, _ = _main(capsys, "train", "--preset", "test", "--out", str(tmp_path / "r"),
                  "--lr", "-1")
  assert code == 2
  assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == want
