"""TrainConfig.expert_compute_copy: the expert weights kept in bf16 in the train state, written by
the optimizer's update. It trains as the step's own cast does, stays the cast of the current
parameters, is left out of checkpoints and remade on resume, and is refused where it does not
apply."""

import json
import os

import chex
import jax
import numpy as np
import pytest

from jaxmoe.config import ConfigError, ModelConfig, TrainConfig
from jaxmoe.presets import get_preset
from jaxmoe.train import build_program, compute_copy, run, train_mesh

QUIET = dict(progress=False, log=lambda *a: None)


def _configs(model=None, **train):
  p = get_preset("test")
  p["model"].update({"dtype": "bfloat16", **(model or {})})
  p["train"].update(steps=6, ckpt_every=0, log_every=1, eval_batches=1, tensorboard=False,
                    mesh_data=1)
  p["train"].update(train)
  return ModelConfig(**p["model"]), TrainConfig(**p["train"])


def _losses(out_dir) -> list[float]:
  return [json.loads(line)["loss"] for line in open(os.path.join(out_dir, "metrics.jsonl"))]


@pytest.mark.slow
def test_trains_as_the_cast_and_resumes_exactly(tmp_path):
  one = jax.devices()[:1]
  model_cfg, plain = _configs(expert_compute_copy=False)
  _, copied = _configs()              # on by default here: bf16 MoE, no data axis, no remat_mlp
  want = run(model_cfg, plain, str(tmp_path / "plain"), devices=one, **QUIET)
  got = run(model_cfg, copied, str(tmp_path / "copy"), devices=one, **QUIET)
  # The same values: the model casts its expert weights either way; only where the cast runs moves.
  np.testing.assert_allclose(_losses(tmp_path / "copy"), _losses(tmp_path / "plain"), rtol=1e-6)
  chex.assert_trees_all_close(jax.device_get(got.state["params"]),
                              jax.device_get(want.state["params"]), rtol=1e-5, atol=1e-7)
  # The copy is the cast of the parameters the update wrote, one array per expert weight.
  copy = got.state["compute"]
  n = model_cfg.num_moe_layers * 3            # w_gate, w_up, w_out (SwiGLU experts)
  assert model_cfg.activation == "swiglu"
  assert len(copy) == len(compute_copy.expert_leaves(got.state["params"])) == n
  for c, w in zip(copy, compute_copy.make_copy(got.state["params"], jax.numpy.bfloat16)):
    assert c.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(c, np.float32), np.asarray(w, np.float32))
  assert "compute" not in want.state

  # Stopped at step 3 and resumed: the checkpoint holds no copy, the resumed run remakes it and
  # ends where the uninterrupted one did.
  run(model_cfg, copied, str(tmp_path / "split"), devices=one, stop_at=3, **QUIET)
  meta = open(tmp_path / "split" / "ckpt" / "3" / "state" / "_METADATA").read()
  assert '"params"' in meta and '"compute"' not in meta
  resumed = run(model_cfg, copied, str(tmp_path / "split"), devices=one, **QUIET)
  chex.assert_trees_all_equal(jax.device_get(resumed.state["params"]),
                              jax.device_get(got.state["params"]))
  chex.assert_trees_all_equal(jax.device_get(resumed.state["compute"]), jax.device_get(copy))


def test_copy_is_split_as_its_parameters():
  model_cfg, train_cfg = _configs(expert_compute_copy=True, mesh_expert=4, mesh_tensor=2)
  model_cfg = ModelConfig(**{**model_cfg.to_dict(), "moe_impl": "grouped"})
  mesh = train_mesh(model_cfg, train_cfg)
  program = build_program(model_cfg, train_cfg, mesh)
  state = jax.eval_shape(program.init_state)
  params_sh = program.state_shardings["params"]
  want = [jax.tree.leaves(params_sh)[i] for i in compute_copy.expert_leaves(params_sh)]
  assert list(program.state_shardings["compute"]) == want
  assert {str(a.dtype) for a in state["compute"]} == {"bfloat16"}
  assert "compute" not in program.restore_target()


@pytest.mark.parametrize("model,train,match", [
    ({"dtype": "float32"}, {}, r"needs a 16-bit model.dtype .* got model.dtype='float32'"),
    ({"ffn": "dense"}, {}, r"needs routed experts, and this model has no MoE layer "
                           r"\(model.ffn='dense'\)"),
    ({}, {"mesh_data": -1}, r"needs a mesh without a data axis .* got mesh \{'data': 8"),
])
def test_asked_for_where_it_does_not_apply(model, train, match):
  model_cfg, train_cfg = _configs(model, expert_compute_copy=True, **train)
  devices = jax.devices() if train else jax.devices()[:1]
  with pytest.raises(ConfigError, match="train.expert_compute_copy " + match):
    train_mesh(model_cfg, train_cfg, devices)
  # Left to the default, the same configurations train without it.
  model_cfg, train_cfg = _configs(model, **train)
  mesh = train_mesh(model_cfg, train_cfg, devices)
  assert not compute_copy.enabled(model_cfg, train_cfg, dict(mesh.shape))


def test_default_is_on_where_it_holds_no_more_memory():
  mesh = {"data": 1, "expert": 1, "tensor": 1}
  for model, train, want in (({}, {}, True), ({"remat": True}, {}, True),
                             ({"remat_mlp": True}, {}, False),
                             ({"remat_mlp": True}, {"expert_compute_copy": True}, True),
                             ({}, {"expert_compute_copy": False}, False)):
    model_cfg, train_cfg = _configs(model, **train)
    assert compute_copy.enabled(model_cfg, train_cfg, mesh) is want, (model, train)
  with pytest.raises(ConfigError, match="train.expert_compute_copy must be a bool or None, got 1"):
    TrainConfig(expert_compute_copy=1)
