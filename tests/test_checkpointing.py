"""Checkpointer: round trip, keep-last-N, unfinished saves ignored, corrupt/missing errors, new mesh."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmoe.checkpointing import Checkpointer, CheckpointError, abstract_like


def _state(seed):
  r = np.random.default_rng(seed)
  return {"w": jnp.asarray(r.standard_normal((8, 4)), jnp.float32),
          "opt": {"mu": jnp.asarray(r.standard_normal(4), jnp.float32)},
          "step": jnp.asarray(seed, jnp.int32)}


def test_round_trip_keep_and_new_mesh(tmp_path):
  ck = Checkpointer(str(tmp_path / "ckpt"), keep=2)
  for step in (1, 2, 3):
    ck.save(step, _state(step), {"step": step, "note": "x"})
  assert ck.all_steps() == [2, 3]     # keep the last 2
  assert ck.latest_step() == 3
  # Restore onto a 4-device mesh with the array sharded over it (written unsharded).
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  target = abstract_like(_state(0), NamedSharding(mesh, P()))
  target["w"] = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  state, meta = ck.restore(target)
  assert meta == {"step": 3, "note": "x"}
  chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(_state(3)))
  assert state["w"].sharding.spec == P("data") and len(state["w"].sharding.device_set) == 4
  ck.save(3, _state(99), {"step": 99})   # an existing step is never overwritten
  assert ck.read_meta(3)[1]["step"] == 3
  ck.close()


def test_unfinished_save_is_ignored(tmp_path):
  ck = Checkpointer(str(tmp_path / "ckpt"), keep=3)
  ck.save(5, _state(5), {"step": 5})
  # What an interrupted orbax save leaves behind: a temporary folder for a later step.
  os.makedirs(tmp_path / "ckpt" / "6.orbax-checkpoint-tmp-123" / "state")
  ck2 = Checkpointer(str(tmp_path / "ckpt"), keep=3)
  assert ck2.latest_step() == 5
  state, _ = ck2.restore(abstract_like(_state(0), NamedSharding(
      Mesh(np.array(jax.devices()[:1]), ("d",)), P())))
  assert int(state["step"]) == 5


def test_missing_and_corrupt(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    Checkpointer(str(tmp_path / "nope"), create=False)
  ck = Checkpointer(str(tmp_path / "empty"))
  with pytest.raises(CheckpointError, match="no checkpoint found"):
    ck.read_meta()
  ck.save(1, _state(1), {"step": 1})
  with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
    ck.read_meta(7)
  # Damage every file of the saved arrays.
  for dirpath, _, files in os.walk(tmp_path / "empty" / "1" / "state"):
    for f in files:
      with open(os.path.join(dirpath, f), "wb") as fh:
        fh.write(b"garbage")
  sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("d",)), P())
  with pytest.raises(CheckpointError, match="unreadable"):
    ck.restore(abstract_like(_state(0), sharding))
  with open(tmp_path / "empty" / "1" / "meta" / "metadata", "w") as fh:
    fh.write("{not json")
  with pytest.raises(CheckpointError, match="unreadable"):
    ck.read_meta()


def _damage_arrays(step_dir) -> None:
  """Truncate every array data file of a saved state (what a disk fault or a torn copy leaves)."""
  for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(dirpath) == "d":
      for f in files:
        with open(os.path.join(dirpath, f), "r+b") as fh:
          fh.truncate(10)


def test_restore_newest_skips_a_damaged_checkpoint_and_keeps_it(tmp_path):
  ck = Checkpointer(str(tmp_path / "ckpt"), keep=2)
  for step in (1, 2, 3):
    ck.save(step, _state(step), {"step": step})
  _damage_arrays(tmp_path / "ckpt" / "3")
  target = abstract_like(_state(0), NamedSharding(Mesh(np.array(jax.devices()[:1]), ("d",)), P()))
  lines = []
  step, (state, meta) = ck.restore_newest(lambda s: ck.restore(target, s), log=lines.append)
  assert step == 2 and meta == {"step": 2} and int(state["step"]) == 2
  # One line: which checkpoint, why (the innermost reason, not orbax's array-spec dump), where.
  (line,) = lines
  assert f"{tmp_path}/ckpt/3 is unreadable" in line and "renamed to" in line and "\n" not in line
  assert "TensorStore({" not in line and len(line) < 500
  # Kept under a name orbax does not list, so neither `keep` nor a new save of step 3 touches it.
  assert ck.all_steps() == [2] and (tmp_path / "ckpt" / "3.corrupt" / "state").is_dir()
  for step in (3, 4, 5):
    ck.save(step, _state(step), {"step": step})
  assert ck.all_steps() == [4, 5] and (tmp_path / "ckpt" / "3.corrupt" / "state").is_dir()
  ck.close()


def test_restore_newest_renames_nothing_when_nothing_restores(tmp_path):
  ck = Checkpointer(str(tmp_path / "ckpt"))
  for step in (1, 2):
    ck.save(step, _state(step), {"step": step})
    _damage_arrays(tmp_path / "ckpt" / str(step))
  target = abstract_like(_state(0), NamedSharding(Mesh(np.array(jax.devices()[:1]), ("d",)), P()))
  with pytest.raises(CheckpointError, match=r"ckpt/2 is unreadable.*nor does the older one"):
    ck.restore_newest(lambda s: ck.restore(target, s), log=pytest.fail)
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["1", "2"]
  ck.close()
