"""Training: the loss falls; stop + resume equals an uninterrupted run; resume onto another mesh;
SIGTERM leaves a restorable checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from jaxmoe.checkpointing import Checkpointer
from jaxmoe.model import ModelConfig
from jaxmoe.presets import get_preset
from jaxmoe.sample import generate, load_model
from jaxmoe.train import ConfigError, TrainConfig, make_mesh, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _configs(**train):
  p = get_preset("test")
  p["train"].update(ckpt_every=0, log_every=1000, eval_batches=1, tensorboard=False)
  p["train"].update(train)
  return ModelConfig(**p["model"]), TrainConfig(**p["train"])


def _params(result):
  return jax.device_get(result.state["params"])


def test_loss_falls_on_embedded_corpus(tmp_path):
  model_cfg, train_cfg = _configs(steps=40, log_every=5, tensorboard=True)
  result = run(model_cfg, train_cfg, str(tmp_path), progress=False, log=lambda *a: None)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  losses = [r["loss"] for r in records]
  assert len(records) == 8 and result.step == 40
  assert losses[0] > 4.0                       # near log(256) = 5.5 at the start
  assert losses[-1] < losses[0] - 1.0          # and clearly lower after 40 steps
  assert records[-1]["val_loss"] < 4.0
  for key in ("tokens_per_s", "aux_loss", "z_loss", "dropped_fraction", "tokens_per_expert"):
    assert key in records[-1]
  assert sum(records[-1]["tokens_per_expert"]) == 2 * 8 * 32 * 2   # layers * tokens * top_k
  assert os.listdir(tmp_path / "tb")
  # The trained model samples text.
  model, meta = load_model(str(tmp_path))
  assert meta["step"] == 40
  out = generate(model, np.frombuffer(b"def ", np.uint8), 8, seed=1)
  assert out.shape == (12,) and out.max() < 256


def test_resume_is_exact_and_restores_onto_another_mesh(tmp_path):
  quiet = dict(progress=False, log=lambda *a: None)
  model_cfg, train_cfg = _configs(steps=8)
  full = run(model_cfg, train_cfg, str(tmp_path / "full"), **quiet)
  half = run(model_cfg, train_cfg, str(tmp_path / "split"), stop_at=4, **quiet)
  assert half.step == 4 and Checkpointer(str(tmp_path / "split" / "ckpt")).latest_step() == 4
  shutil.copytree(tmp_path / "split", tmp_path / "remesh")
  resumed = run(model_cfg, train_cfg, str(tmp_path / "split"), **quiet)
  assert resumed.step == 8
  chex.assert_trees_all_equal(_params(resumed), _params(full))
  chex.assert_trees_all_equal(jax.device_get(resumed.state["opt"]), jax.device_get(full.state["opt"]))
  # Same checkpoint (written on 8 devices), resumed on a 2-device mesh: same training up to
  # float32 reduction order.
  _, train2 = _configs(steps=8, mesh_data=2)
  other = run(model_cfg, train2, str(tmp_path / "remesh"), devices=jax.devices()[:2], **quiet)
  leaf = jax.tree.leaves(other.state["params"])[0]
  assert len(leaf.sharding.device_set) == 2
  chex.assert_trees_all_close(_params(other), _params(full), rtol=2e-4, atol=2e-5)


def test_mesh_validation():
  model_cfg, train_cfg = _configs()
  with pytest.raises(ConfigError, match="num_experts=4 is not divisible"):
    make_mesh(model_cfg, TrainConfig(batch_size=8, mesh_data=1, mesh_expert=8))
  with pytest.raises(ConfigError, match="n_heads=4 and n_kv_heads=2 must be divisible"):
    make_mesh(model_cfg, TrainConfig(batch_size=8, mesh_data=2, mesh_tensor=4))
  with pytest.raises(ConfigError, match="batch_size=6 is not divisible"):
    make_mesh(model_cfg, TrainConfig(batch_size=6))
  with pytest.raises(ConfigError, match="does not fit"):
    make_mesh(model_cfg, TrainConfig(mesh_data=16))
  mesh = make_mesh(model_cfg, TrainConfig(batch_size=8, mesh_data=2, mesh_expert=2, mesh_tensor=2))
  assert dict(mesh.shape) == {"data": 2, "expert": 2, "tensor": 2}


def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
  out = tmp_path / "run"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  proc = subprocess.Popen(
      [sys.executable, "-m", "jaxmoe.cli", "train", "--preset", "test", "--steps", "100000",
       "--log-every", "1", "--ckpt-every", "0", "--eval-every", "0", "--no-progress",
       "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
      metrics = out / "metrics.jsonl"
      if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
        break
      time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
  assert b"Traceback" not in err
  step = Checkpointer(str(out / "ckpt")).latest_step()
  assert step is not None and step >= 3
  model, meta = load_model(str(out))
  assert meta["step"] == step and meta["data_position"] == step


def test_tensorboard_event_file(tmp_path):
  """The hand-written event file: CRC32C test vector, TFRecord framing and the scalar protobufs."""
  import struct

  from jaxmoe.metrics import TensorBoardWriter, _masked_crc, crc32c
  assert crc32c(b"123456789") == 0xE3069283     # the standard CRC-32C check value
  writer = TensorBoardWriter(str(tmp_path))
  writer.scalars(7, {"loss": 2.5, "skipped": float("nan")})
  writer.close()
  raw = open(writer.path, "rb").read()
  records, pos = [], 0
  while pos < len(raw):
    (n,) = struct.unpack_from("<Q", raw, pos)
    assert struct.unpack_from("<I", raw, pos + 8)[0] == _masked_crc(raw[pos:pos + 8])
    data = raw[pos + 12:pos + 12 + n]
    assert struct.unpack_from("<I", raw, pos + 12 + n)[0] == _masked_crc(data)
    records.append(data)
    pos += 16 + n
  assert len(records) == 2 and b"brain.Event:2" in records[0]
  event = records[1]
  assert event[9:11] == b"\x10\x07"                                # step = 7
  assert b"loss" in event and b"skipped" not in event
  value_at = event.index(b"loss\x15") + 5   # tag "loss", then simple_value (fixed32)
  assert struct.unpack("<f", event[value_at:value_at + 4])[0] == 2.5
