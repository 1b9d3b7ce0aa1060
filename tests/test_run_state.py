"""Runs that keep their state: a diverging run stops unsaved (exit 3); a resume keeps the
learning-rate schedule (--stop-at ends early); a damaged newest checkpoint is skipped and kept;
metrics stay in step order after a resume; one run at a time per folder (RUN/.lock)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxmoe import cli
from jaxmoe.checkpointing import Checkpointer
from jaxmoe.config import ConfigError, ModelConfig, TrainConfig
from jaxmoe.metrics import read_jsonl
from jaxmoe.presets import get_preset
from jaxmoe.train import run
from jaxmoe.train.loop import _check_schedule
from jaxmoe.train.lock import RunFolderLocked, RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(progress=False, log=lambda *a: None)
# The test preset without validation (no eval step to compile) or TensorBoard.
FLAGS = ["--preset", "test", "--eval-every", "0", "--val-fraction", "0", "--tensorboard", "false",
         "--no-progress"]


def _configs(**train):
  p = get_preset("test")
  p["train"].update(eval_every=0, val_fraction=0.0, tensorboard=False, log_every=1)
  p["train"].update(train)
  return ModelConfig(**p["model"]), TrainConfig(**p["train"])


def _steps(run_dir) -> list[int]:
  return [r["step"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.mark.slow
def test_diverging_run_stops_at_the_first_non_finite_step_and_saves_nothing_of_it(tmp_path, capsys):
  """--lr 1e6 turns the gradient norm NaN within a few steps. Checkpoints every 2 steps, logging
  every 5: the bad step falls between logging steps and is caught before the next save; the
  checkpoints before it stay, finite; exit status 3, one line naming the step and the values."""
  out = tmp_path / "run"
  code = cli.main(["train", *FLAGS, "--lr", "1e6", "--steps", "20", "--ckpt-every", "2",
                   "--keep", "2", "--log-every", "5", "--out", str(out)])
  err = capsys.readouterr().err.strip()
  assert code == cli.DIVERGED == 3, err
  assert len(err.splitlines()) == 1 and "Traceback" not in err
  first_bad = int(err.split("step ")[1].split(":")[0])
  assert "not finite" in err and "lower --lr (now 1e+06)" in err
  ck = Checkpointer(str(out / "ckpt"), create=False)
  saved = ck.all_steps()
  assert saved and max(saved) < first_bad and max(saved) >= first_bad - 2
  assert f"the newest checkpoint is step {max(saved)}" in err
  from jaxmoe.sample import load_model
  model, _ = load_model(str(out))
  from flax import nnx
  params = jax.device_get(nnx.split(model, nnx.Param, ...)[1])
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
  ck.close()
  # Only finite records were logged, and the folder is unlocked again.
  assert all(np.isfinite(r["loss"]) for r in read_jsonl(str(out / "metrics.jsonl")))
  assert not (out / ".lock").exists()


@pytest.mark.slow
def test_resume_refuses_another_schedule_and_stop_at_keeps_it(tmp_path, capsys):
  out = tmp_path / "run"
  code = cli.main(["train", *FLAGS, "--steps", "8", "--stop-at", "4", "--log-every", "1",
                   "--out", str(out)])
  assert code == 0, capsys.readouterr().err
  assert Checkpointer(str(out / "ckpt")).latest_step() == 4
  config = (out / "config.json").read_text()
  assert "stop_at" not in json.loads(config)["train"]
  # A changed --steps (even one below the saved step) and a changed --lr are refused by name,
  # before config.json is rewritten.
  for flags, named in ((["--steps", "6"], "steps: saved 8, requested 6"),
                       (["--steps", "2"], "steps: saved 8, requested 2"),
                       (["--steps", "8", "--lr", "0.5"], "lr: saved 0.01, requested 0.5")):
    capsys.readouterr()
    code = cli.main(["train", *FLAGS, *flags, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and named in err, err
    assert "--stop-at" in err and "another --out" in err
    assert (out / "config.json").read_text() == config
  # The same schedule continues to the end: the same as one straight run of 8 steps.
  assert cli.main(["train", *FLAGS, "--steps", "8", "--log-every", "1", "--out", str(out)]) == 0
  model_cfg, train_cfg = _configs(steps=8)
  straight = run(model_cfg, train_cfg, str(tmp_path / "straight"), **QUIET)
  assert _steps(out) == list(range(1, 9))
  assert [r["loss"] for r in read_jsonl(str(out / "metrics.jsonl"))] == \
      [r["loss"] for r in read_jsonl(str(tmp_path / "straight" / "metrics.jsonl"))]
  assert straight.step == 8


def test_schedule_check_accepts_checkpoints_that_saved_no_schedule():
  _, train_cfg = _configs(steps=8)
  _check_schedule(None, train_cfg, "run")                    # no train config saved
  _check_schedule({"seed": 0}, train_cfg, "run")             # saved without these fields
  _check_schedule({"steps": 8, "lr": 0.01, "warmup_steps": 3, "min_lr_ratio": 0.1}, train_cfg, "run")
  with pytest.raises(ConfigError, match="warmup_steps: saved 5, requested 3"):
    _check_schedule({"warmup_steps": 5}, train_cfg, "run")


def _damage_arrays(step_dir) -> None:
  for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(dirpath) == "d":
      for f in files:
        with open(os.path.join(dirpath, f), "r+b") as fh:
          fh.truncate(10)


def _cli(*argv):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  return subprocess.run([sys.executable, "-m", "jaxmoe.cli", *argv], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_skipped_renamed_and_kept(tmp_path):
  """Steps 4, 8, 12 saved; step 12's arrays truncated. `sample` uses step 8 and says so in one
  line (renaming nothing); `train` resumes from step 8 with one line naming the damaged
  checkpoint, which it renames to ckpt/12.corrupt, and trains steps 9-12 again exactly as before;
  neither prints a traceback or orbax's dump."""
  out = tmp_path / "run"
  proc = _cli("train", *FLAGS, "--steps", "12", "--ckpt-every", "4", "--log-every", "1",
              "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-2000:]
  losses = {r["step"]: r["loss"] for r in read_jsonl(str(out / "metrics.jsonl"))}
  _damage_arrays(out / "ckpt" / "12")

  proc = _cli("sample", str(out), "--tokens", "4", "--temperature", "0")
  assert proc.returncode == 0, proc.stderr[-2000:]
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith("jaxmoe: checkpoint ") and f"ckpt/12 is unreadable" in line
  assert "using step 8" in line and "renamed" not in line
  assert sorted(os.listdir(out / "ckpt")) == ["12", "4", "8"]

  proc = _cli("train", *FLAGS, "--steps", "12", "--ckpt-every", "4", "--log-every", "1",
              "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-2000:]
  for text in (proc.stdout, proc.stderr):
    assert "Traceback" not in text and "TensorStore" not in text and "asyncio" not in text
  skipped = [l for l in proc.stdout.splitlines() if "unreadable" in l]
  assert len(skipped) == 1 and f"renamed to {out}/ckpt/12.corrupt; using step 8" in skipped[0]
  assert f"resuming from {out}/ckpt/8" in proc.stdout
  assert sorted(os.listdir(out / "ckpt")) == ["12", "12.corrupt", "4", "8"]
  assert os.listdir(out / "ckpt" / "12.corrupt" / "state")     # kept, not emptied
  # Metrics: steps 9-12 once each (the first run's records past step 8 dropped), same losses.
  assert _steps(out) == list(range(1, 13))
  assert {r["step"]: r["loss"] for r in read_jsonl(str(out / "metrics.jsonl"))} == losses


@pytest.mark.slow
def test_resume_after_a_kill_keeps_metrics_in_step_order(tmp_path):
  """A run killed after logging step 6 whose last checkpoint is step 4 (the step-6 one never
  written) resumes from 4: metrics.jsonl holds steps 1..8 once each, strictly increasing."""
  model_cfg, train_cfg = _configs(steps=8, ckpt_every=4)
  out = str(tmp_path / "run")
  run(model_cfg, train_cfg, out, stop_at=6, **QUIET)
  shutil.rmtree(os.path.join(out, "ckpt", "6"))          # as if killed before saving step 6
  assert _steps(out) == [1, 2, 3, 4, 5, 6]
  run(model_cfg, train_cfg, out, **QUIET)
  steps = _steps(out)
  assert steps == list(range(1, 9)) and all(a < b for a, b in zip(steps, steps[1:]))


def test_run_lock_names_its_holder_and_a_dead_holder_is_taken_over(tmp_path):
  lines = []
  with RunLock(str(tmp_path), log=lines.append):
    holder = json.loads((tmp_path / ".lock").read_text())
    assert holder["pid"] == os.getpid()
    with pytest.raises(RunFolderLocked, match=rf"in use by process {os.getpid()} on host "
                                              rf"{holder['host']} \(since "):
      RunLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / ".lock").read_text()) == holder    # untouched
  assert not (tmp_path / ".lock").exists() and lines == []
  # A lock file whose process died (kill -9 leaves it; the kernel dropped its flock) is taken over.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  (tmp_path / ".lock").write_text(json.dumps({"pid": int(dead), "host": "h", "since": 0}))
  with RunLock(str(tmp_path), log=lines.append):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  assert len(lines) == 1 and f"process {dead} on host h" in lines[0] and "no longer runs" in lines[0]


def test_a_second_process_cannot_train_into_a_locked_folder(tmp_path):
  """The lock holds across processes: a run started while another holds the folder exits 2 with
  one line naming the holder and leaves the folder as it was."""
  out = tmp_path / "run"
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from jaxmoe.train.lock import RunLock\n"
       f"lock = RunLock({str(out)!r}); lock.acquire(); print('held', flush=True); time.sleep(60)"],
      cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    before = sorted(os.listdir(out))
    proc = _cli("train", *FLAGS, "--out", str(out))
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert f"is in use by process {holder.pid} on host " in line and "another --out" in line
    assert sorted(os.listdir(out)) == before == [".lock"]
  finally:
    holder.kill()
    holder.wait()
