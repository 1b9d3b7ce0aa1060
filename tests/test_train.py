"""Training: the loss falls; stop + resume equals an uninterrupted run; resume onto another mesh;
training on expert/tensor meshes (sharded state, expert-parallel MoE) equals data parallelism;
gradient accumulation (grad_accum) and a bf16 Adam first moment; SIGTERM leaves a restorable
checkpoint; the expert weights' compute copy (expert_compute_copy)."""

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
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxmoe import parallel as par
from jaxmoe.checkpointing import Checkpointer
from jaxmoe.config import ConfigError, ModelConfig, TrainConfig
from jaxmoe.model import TransformerLM
from jaxmoe.presets import get_preset
from jaxmoe.sample import generate, load_model
from jaxmoe import cli
from jaxmoe.train import batch_sharding, build_program, compute_copy, loss_fn, make_grad_fn, \
    microbatches, parallel_config, run, train_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _configs(model=None, **train):
  p = get_preset("test")
  p["model"].update(model or {})
  p["train"].update(ckpt_every=0, log_every=1000, eval_batches=1, tensorboard=False)
  p["train"].update(train)
  return ModelConfig(**p["model"]), TrainConfig(**p["train"])


def _params(result):
  return jax.device_get(result.state["params"])


def _mesh_kw(shape):
  return dict(mesh_data=shape[0], mesh_expert=shape[1], mesh_tensor=shape[2])


def _records(out_dir):
  return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def _losses(out_dir):
  return [r["loss"] for r in _records(out_dir)]


def _w_gate(params):
  """The first layer's stacked expert weight w_gate (E, d, f) of a params (or moment) tree."""
  return params["blocks"][0]["ffn"]["experts"]["w_gate"][...]


def test_loss_falls_on_embedded_corpus(tmp_path):
  model_cfg, train_cfg = _configs(steps=40, log_every=5, tensorboard=True)
  lines = []
  result = run(model_cfg, train_cfg, str(tmp_path), progress=False, log=lines.append)
  # The first step's compile is announced (on a GPU it can take minutes), and timed.
  assert lines[1] == "compiling the train step" and lines[2].startswith("train step compiled in")
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


@pytest.mark.slow
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
    train_mesh(model_cfg, TrainConfig(batch_size=8, mesh_data=1, mesh_expert=8))
  with pytest.raises(ConfigError, match=r"model.d_ff=64 \(the expert width\) must be divisible"):
    train_mesh(model_cfg, TrainConfig(batch_size=8, mesh_data=2, mesh_tensor=3))
  dense = ModelConfig(**{**get_preset("test")["model"], "ffn": "dense"})
  with pytest.raises(ConfigError, match="mesh_tensor=2 splits only MoE expert weights"):
    train_mesh(dense, TrainConfig(batch_size=8, mesh_data=4, mesh_tensor=2))
  capacity = ModelConfig(**{**get_preset("test")["model"], "moe_impl": "capacity"})
  with pytest.raises(ConfigError, match="moe_impl='capacity' has no expert-parallel version"):
    train_mesh(capacity, TrainConfig(batch_size=8, mesh_data=4, mesh_expert=2))
  with pytest.raises(ConfigError, match="tokens per device .* = 3 must be divisible"):
    train_mesh(model_cfg, TrainConfig(batch_size=4, seq_len=3, mesh_data=4, mesh_tensor=2))
  with pytest.raises(ConfigError, match="ep_a2a must be one of"):
    TrainConfig(ep_a2a="fast")
  with pytest.raises(ConfigError, match="batch_size=6 is not divisible"):
    train_mesh(model_cfg, TrainConfig(batch_size=6))
  with pytest.raises(ConfigError, match="does not fit"):
    train_mesh(model_cfg, TrainConfig(mesh_data=16))
  mesh = train_mesh(model_cfg, TrainConfig(batch_size=8, mesh_data=2, mesh_expert=2, mesh_tensor=2))
  assert dict(mesh.shape) == {"data": 2, "expert": 2, "tensor": 2}
  # Attention is not tensor-parallel: heads need not divide the tensor axis (n_kv_heads=2 here).
  mesh = train_mesh(model_cfg, TrainConfig(batch_size=8, mesh_data=2, mesh_tensor=4))
  assert dict(mesh.shape) == {"data": 2, "expert": 1, "tensor": 4}


@pytest.mark.slow
def test_expert_and_tensor_meshes_train_like_data_parallel(tmp_path):
  """A few steps on (data, expert, tensor) = (2,4,1) and (1,4,2) with remat_mlp (expert-parallel
  MoE layers, sharded state; on an expert mesh remat_mlp is the layers' comm-aware remat) give
  the losses, final validation loss and parameters of (8,1,1) (plain data parallelism). (1,4,2)
  without remat is left to the layer tests (test_expert_parallel), which run it at every option.
  The model
  is float32 (the test preset), so the layouts differ only in float32 reduction order (gradient
  all-reduces over different device groups): losses within 1e-5 relative, parameters after 4 Adam
  steps within rtol 1e-4 / atol 1e-5 (measured differences ~1e-6 and ~3e-7)."""
  quiet = dict(progress=False, log=lambda *a: None)
  results = {}
  # The last run: model.remat_mlp on an expert mesh is the layers' comm-aware remat (same values).
  for shape, remat_mlp in (((8, 1, 1), False), ((2, 4, 1), False), ((1, 4, 2), True)):
    model_cfg, train_cfg = _configs(model={"remat_mlp": remat_mlp}, steps=4, log_every=1,
                                    **_mesh_kw(shape))
    assert model_cfg.dtype == "float32"
    out = str(tmp_path / ("x".join(map(str, shape)) + ("_remat" if remat_mlp else "")))
    result = run(model_cfg, train_cfg, out, **quiet)
    results[shape, remat_mlp] = (_losses(out) + [_records(out)[-1]["val_loss"]], _params(result))
    want_spec = {(8, 1, 1): P(), (2, 4, 1): P("expert"), (1, 4, 2): P("expert", None, "tensor")}
    assert _w_gate(result.state["params"]).sharding.spec == want_spec[shape]
  mesh = train_mesh(model_cfg, train_cfg)
  assert parallel_config(model_cfg, train_cfg, mesh).remat == "comm_aware"
  want_losses, want_params = results[(8, 1, 1), False]
  assert len(want_losses) == 5     # 4 training losses, then the final eval step's val_loss
  for shape in (((2, 4, 1), False), ((1, 4, 2), True)):
    losses, params = results[shape]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, err_msg=str(shape))
    chex.assert_trees_all_close(params, want_params, rtol=1e-4, atol=1e-5)


def test_state_is_sharded_by_the_rules():
  """On (1,4,2) the expert weights and their Adam moments are split E over "expert" and d_ff over
  "tensor" (each device holds E/4 experts x d_ff/2); the rest is replicated; the train step runs
  the expert-parallel layer (all-to-alls in its HLO), while on (8,1,1) it has none."""
  model_cfg, train_cfg = _configs(**_mesh_kw((1, 4, 2)))
  mesh = train_mesh(model_cfg, train_cfg)
  pcfg = parallel_config(model_cfg, train_cfg, mesh)
  assert isinstance(pcfg, par.ParallelConfig) and (pcfg.ep, pcfg.tp) == (4, 2)
  state = build_program(model_cfg, train_cfg, mesh).init_state()
  e, d, f = model_cfg.num_experts, model_cfg.d_model, model_cfg.d_ff
  w = _w_gate(state["params"])
  assert w.shape == (e, d, f) and w.sharding.spec == P("expert", None, "tensor")
  assert "expert" in w.sharding.spec[0]
  assert {s.data.shape for s in w.addressable_shards} == {(e // 4, d, f // 2)}
  w_out = state["params"]["blocks"][1]["ffn"]["experts"]["w_out"][...]
  assert w_out.sharding.spec == P("expert", "tensor")
  adam = state["opt"][1][0]          # chain(clip, adamw): adamw's ScaleByAdamState
  for moment in (adam.mu, adam.nu):
    m = _w_gate(moment)
    assert m.sharding.spec == P("expert", None, "tensor")
    assert m.addressable_shards[0].data.shape == (e // 4, d, f // 2)
  assert adam.count.sharding.is_fully_replicated and state["step"].sharding.is_fully_replicated
  for name in ("q", "kv", "o"):
    assert state["params"]["blocks"][0]["attn"][name]["kernel"][...].sharding.is_fully_replicated
  assert state["params"]["blocks"][0]["ffn"]["router"]["kernel"][...].sharding.is_fully_replicated
  assert state["params"]["embed"]["embedding"][...].sharding.is_fully_replicated

  def all_to_alls(shape) -> int:
    """all_to_all ops in the lowered train step (StableHLO: no XLA compile, which takes ~10 s)."""
    model_cfg, train_cfg = _configs(**_mesh_kw(shape))
    mesh = train_mesh(model_cfg, train_cfg)
    program = build_program(model_cfg, train_cfg, mesh)
    st = jax.eval_shape(program.init_state)
    jit_train = program.train_step
    x = jax.ShapeDtypeStruct((train_cfg.batch_size, train_cfg.seq_len), np.int32,
                             sharding=batch_sharding(mesh))
    return jit_train.lower(st, x, x).as_text().count("all_to_all")

  # Dispatch + combine in each of the 2 MoE layers, forward and backward.
  assert all_to_alls((1, 4, 2)) >= 8
  assert all_to_alls((8, 1, 1)) == 0


@pytest.mark.slow
def test_checkpoint_from_one_mesh_continues_on_another(tmp_path):
  """Stopped at step 4 on (2,4,1) (sharded checkpoint), resumed for one step on the same mesh and
  on (1,4,2): the restored state lands in the new mesh's shardings and step 5 has the same loss
  (float32 model: reduction order only, 1e-5 relative) and parameters."""
  quiet = dict(progress=False, log=lambda *a: None)
  # val_fraction=0: no validation set, so no eval step to compile (keeps the test fast).
  model_cfg, train_a = _configs(steps=6, log_every=1, val_fraction=0.0, **_mesh_kw((2, 4, 1)))
  _, train_b = _configs(steps=6, log_every=1, val_fraction=0.0, **_mesh_kw((1, 4, 2)))
  run(model_cfg, train_a, str(tmp_path / "a"), stop_at=4, **quiet)
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  same = run(model_cfg, train_a, str(tmp_path / "a"), stop_at=5, **quiet)
  other = run(model_cfg, train_b, str(tmp_path / "b"), stop_at=5, **quiet)
  assert same.step == other.step == 5
  assert _w_gate(same.state["params"]).sharding.spec == P("expert")
  w = _w_gate(other.state["params"])
  assert w.sharding.spec == P("expert", None, "tensor") and dict(w.sharding.mesh.shape) == \
      {"data": 1, "expert": 4, "tensor": 2}
  loss_same, loss_other = _losses(tmp_path / "a")[-1], _losses(tmp_path / "b")[-1]
  assert len(_losses(tmp_path / "b")) == 5       # 4 steps before the copy, then step 5
  np.testing.assert_allclose(loss_other, loss_same, rtol=1e-5)
  chex.assert_trees_all_close(_params(other), _params(same), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_grad_accum_equals_the_full_batch_for_a_dense_model(tmp_path):
  """Dense float32 model, global batch 16 on data=8: grad_accum=2 (two microbatches of 8, each
  split over all 8 devices) gives the gradients of grad_accum=1 (with equal-size microbatches the
  mean of the microbatch gradients of mean losses is the full-batch gradient; measured ~7e-7 of
  each leaf's largest entry: float32 summation order), and one train step gives the same loss,
  gradient norm, parameters and validation loss (the eval step also runs in microbatches).
  Parameters within 1e-3 lr absolute: AdamW's first update is lr g / (|g| + 1e-8), so an entry
  whose gradient is itself ~1e-8 (an embedding row of a byte the batch lacks, reached only through
  the tied head's softmax) turns a 1e-9 rounding difference of g into up to ~4e-4 lr (measured: 2
  of 26784 entries differ by 2.5e-6 and 4.2e-6; all others by <= 1e-6, a few float32 ulps)."""
  quiet = dict(progress=False, log=lambda *a: None)
  rng = np.random.default_rng(0)
  x, y = (rng.integers(0, 256, (16, 32)) for _ in range(2))
  results = {}
  for k in (1, 2):
    # warmup_steps=0: the first step already has lr > 0 (the warmup starts at lr 0).
    model_cfg, train_cfg = _configs({"ffn": "dense"}, steps=1, batch_size=16, warmup_steps=0,
                                    log_every=1, grad_accum=k)
    mesh = train_mesh(model_cfg, train_cfg)
    program = build_program(model_cfg, train_cfg, mesh)
    state = program.init_state()
    graphdef = nnx.split(nnx.eval_shape(lambda: TransformerLM(model_cfg, rngs=nnx.Rngs(0))),
                         nnx.Param, ...)[0]
    bs = batch_sharding(mesh)
    grads, ce, _ = jax.jit(make_grad_fn(graphdef, model_cfg, train_cfg, mesh,
                                        program.state_shardings["params"]))(
        state["params"], state["rest"], jax.device_put(x, bs), jax.device_put(y, bs))
    out = str(tmp_path / f"k{k}")
    result = run(model_cfg, train_cfg, out, **quiet)
    (record,) = _records(out)
    results[k] = (jax.device_get(grads), float(ce), record, _params(result))
  (g1, ce1, r1, p1), (g2, ce2, r2, p2) = results[1], results[2]
  np.testing.assert_allclose(ce2, ce1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
  for key in ("loss", "grad_norm", "val_loss"):
    np.testing.assert_allclose(r2[key], r1[key], rtol=1e-5, err_msg=key)
  assert r1["val_loss"] < r1["loss"]                   # the step changed the parameters
  chex.assert_trees_all_close(p2, p1, rtol=1e-5, atol=1e-3 * train_cfg.lr)


def _bf16_moe_case(model: dict, **train):
  """(model_cfg, train_cfg, graphdef, params, rest, x, y): the test preset in bf16 with `model`
  overrides, batch 8 of 32 tokens (`train` overrides the rest), its initial split parameters."""
  model_cfg, train_cfg = _configs({"dtype": "bfloat16", **model}, batch_size=8, **train)
  graphdef, params, rest = nnx.split(TransformerLM(model_cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  rng = np.random.default_rng(0)
  x, y = (jax.numpy.asarray(rng.integers(0, 256, (8, 32)), jax.numpy.int32) for _ in range(2))
  return model_cfg, train_cfg, graphdef, params, rest, x, y


def _assert_float32_grads_close(grads, want):
  """Every leaf of grads is float32 and close to want's (relative to the leaf's largest value)."""
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want)):
    assert a.dtype == np.float32, path
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max(),
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_grad_accum_casts_expert_weights_once_and_keeps_the_gradients():
  """bf16 MoE model, 2 microbatches, no mesh: the scan body gets the expert weights already in
  bf16 (make_grad_fn casts them once per step, where XLA alone redoes the cast in every
  microbatch; not on a mesh with a data axis, checked last), and
  the accumulated gradients equal the mean of per-microbatch gradients taken through the model's
  own cast of float32 parameters (the expert-weight cotangents are bf16 either way)."""
  model_cfg, train_cfg, graphdef, params, rest, x, y = _bf16_moe_case({}, grad_accum=2)
  grad_fn = make_grad_fn(graphdef, model_cfg, train_cfg)
  grads, ce, _ = jax.jit(grad_fn)(params, rest, x, y)

  loss = loss_fn(graphdef)
  want, ces = None, []
  for xb, yb in zip(microbatches(x, 2, None), microbatches(y, 2, None)):
    (_, (c, _)), g = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=4)(
        params, rest, xb, yb, False)
    g = jax.tree.map(lambda a: a.astype(np.float32) / 2, g)
    want = g if want is None else jax.tree.map(np.add, want, g)
    ces.append(float(c))
  np.testing.assert_allclose(float(ce), np.mean(ces), rtol=1e-6)
  _assert_float32_grads_close(grads, want)

  # The microbatch loop takes each expert weight in bf16 (so it casts none per microbatch); its
  # float32 (E, d, f) inputs are only the gradient accumulators of those weights.
  e, d, f = model_cfg.num_experts, model_cfg.d_model, model_cfg.d_ff
  top = jax.make_jaxpr(grad_fn)(params, rest, x, y).jaxpr
  (scan,) = [q for q in top.eqns if q.primitive.name == "scan"]
  ins = [(tuple(v.aval.shape), str(v.aval.dtype)) for v in scan.invars]
  n_weights = 2 * model_cfg.n_layers          # w_gate and w_up of each MoE layer are (E, d, f)
  assert ins.count(((e, d, f), "bfloat16")) == n_weights
  assert ins.count(((e, d, f), "float32")) == n_weights

  # On a mesh with a data axis the cast stays in the model: the gradients summed over "data" must
  # be the float32 ones, not those of a bf16 copy.
  mesh_cfg, mesh_train = _configs({"dtype": "bfloat16"}, batch_size=16, grad_accum=2,
                                  **_mesh_kw((2, 4, 1)))
  mesh = train_mesh(mesh_cfg, mesh_train)
  program = build_program(mesh_cfg, mesh_train, mesh)
  x16, y16 = (jax.numpy.concatenate([a, a]) for a in (x, y))
  top = jax.make_jaxpr(make_grad_fn(program.graphdef, mesh_cfg, mesh_train, mesh,
                                    program.state_shardings["params"]))(
      params, rest, x16, y16).jaxpr
  (scan,) = [q for q in top.eqns if q.primitive.name == "scan"]
  ins = [(tuple(v.aval.shape), str(v.aval.dtype)) for v in scan.invars]
  assert ins.count(((e, d, f), "bfloat16")) == 0
  assert ins.count(((e, d, f), "float32")) == 2 * n_weights    # the weights and their accumulators


def test_remat_casts_expert_weights_outside_the_checkpointed_blocks():
  """bf16 MoE model with remat, one microbatch: the checkpointed blocks take the expert weights
  already in bf16 (so the recompute casts none again), and the gradients are float32 and equal
  those taken through the model's own cast inside the blocks. (Not compared with remat off: in
  bf16 the recompute's fusions round differently, which can flip a near-tied routing choice.)"""
  model_cfg, train_cfg, graphdef, params, rest, x, y = _bf16_moe_case({"remat": True})
  grad_fn = make_grad_fn(graphdef, model_cfg, train_cfg)
  grads, ce, _ = jax.jit(grad_fn)(params, rest, x, y)
  loss = loss_fn(graphdef)
  (_, (ce0, _)), want = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=4)(
      params, rest, x, y, False)
  np.testing.assert_allclose(float(ce), float(ce0), rtol=1e-6)
  _assert_float32_grads_close(grads, want)

  e, d, f = model_cfg.num_experts, model_cfg.d_model, model_cfg.d_ff
  top = jax.make_jaxpr(grad_fn)(params, rest, x, y).jaxpr
  # The checkpointed regions that take an expert weight are the blocks (the norms, router logits
  # and combine have small checkpoints of their own): each takes it in bf16, none in float32.
  ins = [[(tuple(v.aval.shape), str(v.aval.dtype)) for v in q.invars] for q in top.eqns
         if q.primitive.name in ("checkpoint", "remat", "remat2")]
  blocks = [i for i in ins if any(shape == (e, d, f) for shape, _ in i)]
  assert len(blocks) == model_cfg.n_layers
  for i in blocks:
    assert i.count(((e, d, f), "float32")) == 0
    assert i.count(((e, d, f), "bfloat16")) >= 1


@pytest.mark.slow
def test_grad_accum_trains_an_moe_model_on_data_and_expert_meshes(tmp_path):
  """MoE model, batch 16 in 2 microbatches. Not equal to grad_accum=1: the load-balancing aux loss
  (E * sum_e f_e P_e, a product of two batch means) is not linear in the batch, so the mean of the
  microbatches' aux gradients differs from the full batch's (and AdamW's first steps amplify tiny
  differences); tested here: it trains (loss falls, finite metrics), tokens_per_expert counts the
  whole global batch (summed over microbatches) and the run on (2,4,1) (expert-parallel layers
  inside the scan, the head fused with the loss) equals the one on (8,1,1) up to float32
  reduction order (the microbatch split does not depend on the mesh); its checkpoint resumes with
  other grad_accum / adam_mu_dtype."""
  quiet = dict(progress=False, log=lambda *a: None)
  # A schedule of 13 steps, stopped at 12 (--stop-at): the resume below adds the 13th (a resume
  # keeps the saved schedule).
  model_cfg, train_cfg = _configs(steps=13, batch_size=16, grad_accum=2, log_every=1,
                                  val_fraction=0.0, **_mesh_kw((8, 1, 1)))
  run(model_cfg, train_cfg, str(tmp_path / "dp"), stop_at=12, **quiet)
  records = _records(tmp_path / "dp")
  losses = [r["loss"] for r in records]
  assert len(losses) == 12 and losses[-1] < losses[0] - 0.5
  for r in records:
    for key in ("loss", "aux_loss", "z_loss", "grad_norm", "dropped_fraction", "expert_load_max"):
      assert np.isfinite(r[key]), (key, r)
    assert r["dropped_fraction"] == 0.0
    assert sum(r["tokens_per_expert"]) == 2 * 16 * 32 * 2      # layers * tokens * top_k
  assert records[-1]["tokens"] == 12 * 16 * 32
  # The (2,4,1) run also fuses the head with the loss (loss_chunks; the head's gradient summed
  # once across the 8 devices the microbatch is split over): the same math.
  model_fused, train_ep = _configs({"loss_chunks": 4}, steps=13, batch_size=16, grad_accum=2,
                                   log_every=1, val_fraction=0.0, **_mesh_kw((2, 4, 1)))
  result = run(model_fused, train_ep, str(tmp_path / "ep"), stop_at=3, **quiet)
  assert _w_gate(result.state["params"]).sharding.spec == P("expert")
  np.testing.assert_allclose(_losses(tmp_path / "ep"), losses[:3], rtol=1e-5)
  # Resuming may change grad_accum and adam_mu_dtype (the float32 first moment is cast to bf16).
  _, train_more = _configs(steps=13, batch_size=16, log_every=1, val_fraction=0.0,
                           adam_mu_dtype="bfloat16")
  more = run(model_cfg, train_more, str(tmp_path / "dp"), **quiet)
  assert more.step == 13 and _w_gate(more.state["opt"][1][0].mu).dtype == jax.numpy.bfloat16
  assert np.isfinite(_losses(tmp_path / "dp")[-1])


def test_microbatches_stay_on_their_devices():
  """microbatches(x, k) of a batch split over ("data", "expert"): every microbatch is spread over
  all 8 devices and each device's rows are rows it already held (no data moves; the compiled
  program has no collective)."""
  model_cfg, train_cfg = _configs(batch_size=32, grad_accum=4, **_mesh_kw((2, 4, 1)))
  mesh = train_mesh(model_cfg, train_cfg)
  x = jax.device_put(np.arange(32 * 3).reshape(32, 3), batch_sharding(mesh))
  fn = jax.jit(lambda a: microbatches(a, 4, mesh))
  mb = fn(x)
  assert mb.shape == (4, 8, 3) and mb.sharding.spec == P(None, ("data", "expert"))
  np.testing.assert_array_equal(np.asarray(mb)[1], np.asarray(x)[1::4])   # rows 1, 5, 9, ...
  held = {s.device: {tuple(r) for r in np.asarray(s.data)} for s in x.addressable_shards}
  for s in mb.addressable_shards:
    assert s.data.shape == (4, 1, 3)
    assert {tuple(r) for r in np.asarray(s.data).reshape(-1, 3)} == held[s.device]
  hlo = fn.lower(x).compile().as_text()
  for op in ("all-to-all", "all-gather", "collective-permute", "all-reduce"):
    assert op not in hlo


def test_grad_accum_and_adam_mu_dtype_validation():
  model_cfg, _ = _configs()
  with pytest.raises(ConfigError, match="train.grad_accum must be a positive int, got 0"):
    TrainConfig(grad_accum=0)
  with pytest.raises(ConfigError, match="train.grad_accum must be a positive int"):
    TrainConfig(grad_accum=True)
  with pytest.raises(ConfigError,
                     match="train.batch_size=6 is not divisible by train.grad_accum=4"):
    TrainConfig(batch_size=6, grad_accum=4)
  with pytest.raises(ConfigError, match=r"batch_size=8 is not divisible by train.grad_accum x the "
                                        r"data-parallel size data x expert = 2 x 8 = 16"):
    train_mesh(model_cfg, TrainConfig(batch_size=8, grad_accum=2))
  with pytest.raises(ConfigError, match=r"tokens per device batch_size/\(grad_accum x data x "
                                        r"expert\) x seq_len = 3 must be divisible"):
    train_mesh(model_cfg, TrainConfig(batch_size=8, grad_accum=2, seq_len=3, mesh_data=4,
                                     mesh_tensor=2))
  with pytest.raises(ConfigError, match="train.adam_mu_dtype must be one of .* got 'int8'"):
    TrainConfig(adam_mu_dtype="int8")
  assert dict(train_mesh(model_cfg, TrainConfig(batch_size=16, grad_accum=2)).shape)["data"] == 8
  # Both are command-line flags (every TrainConfig field is one).
  args = cli.build_parser().parse_args(["train", "--preset", "test", "--batch-size", "32",
                                        "--grad-accum", "4", "--adam-mu-dtype", "bfloat16"])
  _, train = cli.resolve_configs(args)
  assert (train.batch_size, train.grad_accum, train.adam_mu_dtype) == (32, 4, "bfloat16")


def test_bf16_adam_first_moment():
  """adam_mu_dtype="bfloat16": mu is bf16 (nu and the parameters stay float32), sharded like the
  parameters on (2,4,1), and stays bf16 through a train step (with grad_accum=2)."""
  model_cfg, train_cfg = _configs(adam_mu_dtype="bfloat16", batch_size=16, grad_accum=2,
                                  **_mesh_kw((2, 4, 1)))
  mesh = train_mesh(model_cfg, train_cfg)
  state = build_program(model_cfg, train_cfg, mesh).init_state()
  jit_train = build_program(model_cfg, train_cfg, mesh).train_step
  x = jax.device_put(np.arange(16 * 32).reshape(16, 32) % 256, batch_sharding(mesh))
  for _ in range(2):
    state, metrics = jit_train(state, x, x)
    adam = state["opt"][1][0]
    assert {a.dtype for a in jax.tree.leaves(adam.mu)} == {np.dtype(jax.numpy.bfloat16)}
    assert {a.dtype for a in jax.tree.leaves(adam.nu)} == {np.dtype(np.float32)}
    assert {a.dtype for a in jax.tree.leaves(state["params"])} == {np.dtype(np.float32)}
    assert _w_gate(adam.mu).sharding.spec == P("expert") == _w_gate(adam.nu).sharding.spec
    assert np.isfinite(float(metrics["loss"]))
  assert float(np.abs(np.asarray(_w_gate(adam.mu), np.float32)).max()) > 0


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

# TrainConfig.expert_compute_copy: the expert weights kept in bf16 in the train state, written by
# the optimizer's update. It trains as the step's own cast does, stays the cast of the current
# parameters, is left out of checkpoints and remade on resume, and is refused where it does not
# apply.

_QUIET = dict(progress=False, log=lambda *a: None)


def _copy_configs(model=None, **train):
  """The test preset in bf16 on one device's mesh, 6 steps, every step logged."""
  return _configs({"dtype": "bfloat16", **(model or {})},
                  **{"steps": 6, "log_every": 1, "mesh_data": 1, **train})


@pytest.mark.slow
def test_compute_copy_trains_as_the_cast_and_resumes_exactly(tmp_path):
  one = jax.devices()[:1]
  model_cfg, plain = _copy_configs(expert_compute_copy=False)
  _, copied = _copy_configs()              # on by default here: bf16 MoE, no data axis, no remat_mlp
  want = run(model_cfg, plain, str(tmp_path / "plain"), devices=one, **_QUIET)
  got = run(model_cfg, copied, str(tmp_path / "copy"), devices=one, **_QUIET)
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
  run(model_cfg, copied, str(tmp_path / "split"), devices=one, stop_at=3, **_QUIET)
  meta = open(tmp_path / "split" / "ckpt" / "3" / "state" / "_METADATA").read()
  assert '"params"' in meta and '"compute"' not in meta
  resumed = run(model_cfg, copied, str(tmp_path / "split"), devices=one, **_QUIET)
  chex.assert_trees_all_equal(jax.device_get(resumed.state["params"]),
                              jax.device_get(got.state["params"]))
  chex.assert_trees_all_equal(jax.device_get(resumed.state["compute"]), jax.device_get(copy))


def test_compute_copy_is_split_as_its_parameters():
  model_cfg, train_cfg = _copy_configs(expert_compute_copy=True, mesh_expert=4, mesh_tensor=2)
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
def test_compute_copy_asked_for_where_it_does_not_apply(model, train, match):
  model_cfg, train_cfg = _copy_configs(model, expert_compute_copy=True, **train)
  devices = jax.devices() if train else jax.devices()[:1]
  with pytest.raises(ConfigError, match="train.expert_compute_copy " + match):
    train_mesh(model_cfg, train_cfg, devices)
  # Left to the default, the same configurations train without it.
  model_cfg, train_cfg = _copy_configs(model, **train)
  mesh = train_mesh(model_cfg, train_cfg, devices)
  assert not compute_copy.enabled(model_cfg, train_cfg, dict(mesh.shape))


def test_compute_copy_default_is_on_where_it_holds_no_more_memory():
  mesh = {"data": 1, "expert": 1, "tensor": 1}
  for model, train, want in (({}, {}, True), ({"remat": True}, {}, True),
                             ({"remat_mlp": True}, {}, False),
                             ({"remat_mlp": True}, {"expert_compute_copy": True}, True),
                             ({}, {"expert_compute_copy": False}, False)):
    model_cfg, train_cfg = _copy_configs(model, **train)
    assert compute_copy.enabled(model_cfg, train_cfg, mesh) is want, (model, train)
  with pytest.raises(ConfigError, match="train.expert_compute_copy must be a bool or None, got 1"):
    TrainConfig(expert_compute_copy=1)
