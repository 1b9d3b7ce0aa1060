"""Every bad input tried against `jaxmoe train`, `sample` and `plot`, in one table: each gives one
error line naming the mistake, exit status 2, no traceback, and leaves nothing behind.

docs/bad-inputs.md lists the same cases (the last test holds the two together).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest

from jaxmoe import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics_run(tmp_path) -> str:
  run = tmp_path / "run"
  run.mkdir()
  (run / "metrics.jsonl").write_text("".join(
      json.dumps({"step": s, "loss": 5.0 - s, "tokens_per_s": 100.0}) + "\n" for s in (1, 2)))
  return str(run)


def _config_file(tmp_path, content: dict) -> str:
  path = tmp_path / "cfg.json"
  path.write_text(json.dumps(content))
  return str(path)


def _file(tmp_path, name="a_file", data=b"text\n") -> str:
  path = tmp_path / name
  path.write_bytes(data)
  return str(path)


def _saved_run(tmp_path, steps: int = 30) -> str:
  """A run folder whose checkpoint (step 3) saved the test preset's model and --steps `steps`."""
  import jax.numpy as jnp
  from jaxmoe.checkpointing import Checkpointer
  from jaxmoe.config import ModelConfig, TrainConfig
  from jaxmoe.presets import get_preset

  preset = get_preset("test")
  train = dataclasses.asdict(TrainConfig(**{**preset["train"], "steps": steps}))
  run = str(tmp_path / "run")
  ck = Checkpointer(os.path.join(run, "ckpt"))
  ck.save(3, {"x": jnp.ones(3)}, {"step": 3, "model": ModelConfig(**preset["model"]).to_dict(),
                                  "train": train})
  ck.close()
  return run


_HELD: list = []   # locks a case holds while `jaxmoe` runs; released after the case


def _locked_run(tmp_path) -> str:
  from jaxmoe.train.lock import RunLock

  lock = RunLock(str(tmp_path / "run"))
  lock.acquire()
  _HELD.append(lock)
  return lock.run_dir


# id -> (argv builder from tmp_path, a regular expression the one error line must match)
CASES = {
    "flag-prefix": (lambda p: ["train", "--preset", "test", "--num-expert", "8"],
                    r"unrecognized arguments: --num-expert"),
    "unknown-preset": (lambda p: ["train", "--preset", "bogus"],
                       r"unknown preset 'bogus'; allowed: .*tiny"),
    "config-bool-as-string": (
        lambda p: ["train", "--preset", "test", "--config",
                   _config_file(p, {"model": {"bias_balancing": "false"}})],
        r"model\.bias_balancing must be true or false, got 'false'"),
    "config-remat-yes": (
        lambda p: ["train", "--preset", "test", "--config", _config_file(p, {"model": {"remat": "yes"}})],
        r"model\.remat must be true or false, got 'yes'"),
    "config-float-steps": (
        lambda p: ["train", "--preset", "test", "--config", _config_file(p, {"train": {"steps": 1.5}})],
        r"train\.steps must be an integer, got 1\.5"),
    "config-string-lr": (
        lambda p: ["train", "--preset", "test", "--config", _config_file(p, {"train": {"lr": "fast"}})],
        r"train\.lr must be a number, got 'fast'"),
    "loss-chunks-over-seq": (lambda p: ["train", "--preset", "test", "--loss-chunks", "33"],
                             r"model\.loss_chunks must be an int in \[0, max_seq_len=32\], got 33"),
    "recompute-activation-glu": (
        lambda p: ["train", "--preset", "test", "--recompute-activation", "true"],
        r"recompute_activation=True needs impl='grouped' with fuse_activation=True, a plain "
        r"\(non-GLU\) activation and no biases; got .*activation='swiglu'"),
    "expert-compute-copy-float32": (
        lambda p: ["train", "--preset", "test", "--expert-compute-copy", "true"],
        r"train\.expert_compute_copy needs a 16-bit model\.dtype \(the copy is the experts' "
        r"weights in it\), got model\.dtype='float32'"),
    "out-is-a-file": (lambda p: ["train", "--preset", "test", "--out", _file(p)],
                      r"is a file, not a run folder"),
    "out-under-a-file": (lambda p: ["train", "--preset", "test", "--out",
                                    os.path.join(_file(p), "run")],
                         r"is a file, so the run folder cannot be made there"),
    "gpu-only-backend": (lambda p: ["train", "--preset", "test", "--out", str(p / "r"),
                                    "--backend", "mosaic"],
                         r"--backend mosaic needs a GPU.*use --backend xla"),
    "gpu-only-attention": (lambda p: ["train", "--preset", "test", "--out", str(p / "r"),
                                      "--dtype", "bfloat16", "--attention", "cudnn"],
                           r"--attention cudnn needs a GPU"),
    "gpu-only-ragged-a2a": (lambda p: ["train", "--preset", "test", "--out", str(p / "r"),
                                       "--ep-a2a", "ragged"],
                            r"--ep-a2a ragged needs a GPU.*--ep-a2a padded"),
    "binary-text-data": (lambda p: ["train", "--preset", "test", "--out", str(p / "r"),
                                    "--data", _file(p, "blob.dat", b"\0\1\2" * 64)],
                         r"is binary, not text"),
    "sample-negative-temperature": (lambda p: ["sample", str(p), "--temperature", "-1"],
                                    r"--temperature must be >= 0"),
    "sample-negative-top-k": (lambda p: ["sample", str(p), "--top-k", "-3"],
                              r"--top-k must be >= 0"),
    "plot-missing-folder": (lambda p: ["plot", _metrics_run(p), "--out",
                                       str(p / "no" / "such" / "dir" / "c.png")],
                            r"cannot write .*c\.png"),
    "plot-unknown-image-type": (lambda p: ["plot", _metrics_run(p), "--out", str(p / "c.xyz")],
                                r"unknown image type 'xyz'"),
    "plot-not-a-run": (lambda p: ["plot", str(p)], r"no metrics file"),
    "resume-changed-steps": (
        lambda p: ["train", "--preset", "test", "--steps", "20", "--out", _saved_run(p)],
        r"another learning-rate schedule \(steps: saved 30, requested 20\).*resume with "
        r"--steps 30 \(stop earlier with --stop-at STEP\)"),
    "resume-steps-below-saved-step": (
        lambda p: ["train", "--preset", "test", "--steps", "2", "--out", _saved_run(p)],
        r"steps: saved 30, requested 2"),
    "resume-changed-lr": (
        lambda p: ["train", "--preset", "test", "--lr", "0.5", "--out", _saved_run(p)],
        r"lr: saved 0\.01, requested 0\.5.*--lr 0\.01"),
    "stop-at-zero": (lambda p: ["train", "--preset", "test", "--stop-at", "0"],
                     r"--stop-at must be a step >= 1, got 0"),
    "run-folder-locked": (
        lambda p: ["train", "--preset", "test", "--out", _locked_run(p)],
        rf"is in use by process {os.getpid()} on host .* \(since .*\); wait for that run"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_left(case, tmp_path, capsys):
  build, pattern = CASES[case]
  try:
    argv = build(tmp_path)
    before = _snapshot(tmp_path)
    try:
      code = cli.main(argv)
    except SystemExit as e:   # argparse's own errors (usage line + error line)
      code = e.code
    after = _snapshot(tmp_path)
  finally:
    while _HELD:
      _HELD.pop().release()
  err = capsys.readouterr().err.strip()
  assert code == 2, (code, err)
  assert "Traceback" not in err
  last = err.splitlines()[-1]
  assert last.startswith("jaxmoe") and re.search(pattern, last), err
  if not err.startswith("usage:"):
    assert len(err.splitlines()) == 1, err
  assert after == before or case.startswith("plot"), \
      f"changed: {set(after.items()) ^ set(before.items())}"


def _snapshot(root) -> dict[str, int]:
  """Every file and folder under root with its modification time (files) or 0 (folders)."""
  return {os.path.join(d, n): (os.stat(os.path.join(d, n)).st_mtime_ns if n in files else 0)
          for d, dirs, files in os.walk(root) for n in dirs + files}


def test_plot_prints_the_file_it_wrote(tmp_path, capsys):
  run = _metrics_run(tmp_path)
  assert cli.main(["plot", run, "--out", str(tmp_path / "curves")]) == 0
  printed = capsys.readouterr().out.strip()
  assert printed == str(tmp_path / "curves.png") and os.path.isfile(printed)


def test_docs_table_lists_every_case():
  with open(os.path.join(ROOT, "docs", "bad-inputs.md")) as f:
    text = f.read()
  missing = [case for case in CASES if f"`{case}`" not in text]
  assert not missing, f"docs/bad-inputs.md lacks {missing}"
