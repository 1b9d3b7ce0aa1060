"""The training loop: jit-compiled steps on a device mesh, AdamW + warmup/cosine, checkpoints, metrics.

State (a pytree, all float32 master copies): {"params", "rest" (non-trainable model variables such
as router biases), "opt" (optax state), "step" (int32)}. Compute runs in the model's dtype (bf16 by
default). The loss is cross-entropy + the MoE layers' weighted aux/z losses.

Mesh (`make_mesh`): axes ("data", "expert", "tensor") (TrainConfig.mesh_data/expert/tensor). The
state is sharded by the parameters' logical axis names through jaxmoe.sharding.RULES
(`state_shardings`): the routed experts' stacked weights (E, d, f) are split E over "expert" and
d_ff over "tensor"; the optax moments mirror the parameters and are split the same way; everything
else (attention, embeddings, norms, router, dense MLPs, step counters) is replicated. The batch is
split over ("data", "expert"). With expert > 1 or tensor > 1 the MoE layers run the expert-parallel
path (jaxmoe.expert_parallel: dropless all-to-all dispatch in a shard_map, Megatron split of d_ff;
`parallel_config`); with expert = tensor = 1 they run the single-device path, partitioned over the
batch by XLA. The state is created sharded (`init_sharded_state`: jit with out_shardings, never
materialized whole on one device) and the train/eval steps take and return it with those
shardings. `make_mesh` checks that the model fits the mesh (ConfigError naming the field).

Resuming: `run` continues from the newest checkpoint in OUT/ckpt: parameters, optimizer state,
step, data position (batch i is a pure function of (seed, i)) and RNG (derived from seed and step).
The checkpoint is restored straight onto the current mesh's shardings, so a run saved on one mesh
(say data=8) resumes on another (data=2, expert=4). SIGTERM/SIGINT finish the current step, save a
checkpoint and return.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmoe import data as data_lib
from jaxmoe import expert_parallel as ep
from jaxmoe import sharding as sh
from jaxmoe.checkpointing import Checkpointer, abstract_like
from jaxmoe.metrics import MetricsLogger, ProgressBar
from jaxmoe.model import ModelConfig, TransformerLM, cross_entropy, flops_per_token, \
    param_counts, update_router_biases

# bf16 dense peak per device kind, TFLOP/s (MFU denominator).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


class ConfigError(ValueError):
  """A user configuration mistake (bad value, does not fit the mesh, mismatched resume)."""


@dataclasses.dataclass
class TrainConfig:
  steps: int = 200
  batch_size: int = 16        # global batch (sequences)
  seq_len: int = 128
  lr: float = 3e-3
  min_lr_ratio: float = 0.1   # cosine decays to lr * min_lr_ratio
  warmup_steps: int = 30
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.95
  seed: int = 0
  eval_every: int = 100       # 0: only at the end
  eval_batches: int = 4
  ckpt_every: int = 100       # 0: only at the end / on a signal
  keep: int = 3
  log_every: int = 10
  data: str | None = None     # None: embedded corpus; else text file/folder, .npy or .bin
  data_dtype: str = "uint16"  # for .bin
  val_fraction: float = 0.05
  corpus_bytes: int = 8 << 20
  mesh_data: int = -1         # -1: all devices not used by expert * tensor
  mesh_expert: int = 1
  mesh_tensor: int = 1
  # All-to-all of the expert-parallel MoE layers (mesh_expert or mesh_tensor > 1): "padded" runs
  # everywhere; "ragged" moves only the real rows but XLA:CPU cannot compile it (GPU only).
  ep_a2a: str = "padded"
  peak_tflops: float | None = None  # per device; None: from the device kind (H100: 989)
  bias_rate: float = 1e-3     # aux-loss-free router bias step (model.bias_balancing)
  tensorboard: bool = True

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "eval_batches", "keep", "log_every",
                 "mesh_expert", "mesh_tensor", "corpus_bytes"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"train.{name} must be a positive int, got {v!r}")
    for name in ("warmup_steps", "eval_every", "ckpt_every", "seed"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ConfigError(f"train.{name} must be an int >= 0, got {v!r}")
    if not isinstance(self.mesh_data, int) or (self.mesh_data < 1 and self.mesh_data != -1):
      raise ConfigError(f"train.mesh_data must be a positive int or -1, got {self.mesh_data!r}")
    for name in ("lr", "grad_clip"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"train.{name} must be a finite number > 0, got {v!r}")
    for name in ("min_lr_ratio", "b1", "b2"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise ConfigError(f"train.{name} must be in [0, 1], got {v!r}")
    if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
      raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay!r}")
    if self.ep_a2a not in ep.A2A_MODES:
      raise ConfigError(f"train.ep_a2a must be one of {ep.A2A_MODES}, got {self.ep_a2a!r}")

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f"unknown train config keys {unknown}; allowed: {sorted(known)}")
    return cls(**d)


def make_mesh(model: ModelConfig, train: TrainConfig, devices=None) -> Mesh:
  """Mesh ("data", "expert", "tensor") over `devices` (default all), validated against the model.

  ConfigError (naming the field) unless the sharded model and the batch fit the mesh: experts
  divisible by "expert", the expert width d_ff by "tensor", the batch by data x expert, (the
  expert-parallel layer's duplicate token dropping) each device's tokens by "tensor", an
  expert-parallel moe_impl when expert or tensor > 1, and MoE layers when tensor > 1.
  """
  devices = list(jax.devices() if devices is None else devices)
  e, t = train.mesh_expert, train.mesh_tensor
  d = train.mesh_data if train.mesh_data != -1 else len(devices) // (e * t)
  if d < 1 or d * e * t > len(devices) or (train.mesh_data == -1 and d * e * t != len(devices)):
    raise ConfigError(f"mesh data={train.mesh_data} x expert={e} x tensor={t} does not fit the "
                      f"{len(devices)} available devices")
  moe = model.num_moe_layers > 0
  if moe and model.num_experts % e:
    raise ConfigError(f"num_experts={model.num_experts} is not divisible by the mesh's expert "
                      f"axis ({e})")
  if t > 1 and not moe:
    # Only the routed experts are tensor-parallel; on a model without them every tensor rank
    # would repeat the same work.
    raise ConfigError(f"train.mesh_tensor={t} splits only MoE expert weights, and this model has "
                      f"no MoE layer (model.ffn={model.ffn!r}); use mesh_data/mesh_expert")
  expert_d_ff = model.expert_d_ff or model.d_ff
  if moe and expert_d_ff % t:
    field = "expert_d_ff" if model.expert_d_ff else "d_ff"
    raise ConfigError(f"model.{field}={expert_d_ff} (the expert width) must be divisible by the "
                      f"mesh's tensor axis (train.mesh_tensor={t})")
  if moe and (e > 1 or t > 1) and model.moe_impl not in ep.EP_IMPLS:
    raise ConfigError(f"model.moe_impl={model.moe_impl!r} has no expert-parallel version; with "
                      f"mesh_expert={e} / mesh_tensor={t} use one of {ep.EP_IMPLS}")
  if train.batch_size % (d * e):
    raise ConfigError(f"batch_size={train.batch_size} is not divisible by the data-parallel size "
                      f"data x expert = {d * e}")
  local_tokens = train.batch_size // (d * e) * train.seq_len
  if moe and t > 1 and local_tokens % t:
    raise ConfigError(f"tokens per device batch_size/(data x expert) x seq_len = {local_tokens} "
                      f"must be divisible by the mesh's tensor axis ({t}): each tensor rank "
                      f"dispatches 1/{t} of them (change train.batch_size or train.seq_len)")
  try:
    return sh.make_mesh(sh.MeshConfig(data=d, expert=e, tensor=t), devices)
  except ValueError as err:
    raise ConfigError(str(err)) from None


def parallel_config(model: ModelConfig, train: TrainConfig, mesh: Mesh) -> ep.ParallelConfig | None:
  """How the MoE layers run on `mesh`: expert-parallel (a ParallelConfig) when the mesh has
  expert > 1 or tensor > 1 and the model has MoE layers; else None (the single-device layer,
  which XLA partitions over the batch axes like every other layer)."""
  shape = sh.mesh_shape(mesh)
  if model.num_moe_layers == 0 or (shape["expert"] == 1 and shape["tensor"] == 1):
    return None
  return ep.ParallelConfig(mesh, a2a=train.ep_a2a)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "expert"), None))


def make_optimizer(train: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Clip by global norm, then AdamW with linear warmup and cosine decay (no decay on vectors)."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.lr, warmup_steps=train.warmup_steps,
      decay_steps=max(train.steps, train.warmup_steps + 1), end_value=train.lr * train.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  tx = optax.chain(
      optax.clip_by_global_norm(train.grad_clip),
      optax.adamw(schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay,
                  mask=decay_mask))
  return tx, schedule


def init_state(model_cfg: ModelConfig, train: TrainConfig, tx) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, state) of a fresh model (the graphdef of the single-device layers: the steps
  build their own, with the mesh's ParallelConfig, in `_jitted_steps`)."""
  model = TransformerLM(model_cfg, rngs=nnx.Rngs(train.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = {"params": params, "rest": rest, "opt": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  return graphdef, state


def abstract_state(model_cfg: ModelConfig, train: TrainConfig, tx) -> dict:
  """The state's structure with jax.ShapeDtypeStruct leaves (nnx Variables keep their logical
  names), computed without allocating anything."""
  return jax.eval_shape(lambda: init_state(model_cfg, train, tx)[1])


def state_shardings(model_cfg: ModelConfig, train: TrainConfig, mesh: Mesh, tx=None) -> dict:
  """NamedShardings of the train state on `mesh` (same structure as the state).

  Parameters by their logical names through jaxmoe.sharding.RULES; the optax moments are built from
  the parameter tree (nnx Variables keep the names), so they are split exactly like their
  parameters; unannotated arrays (attention, embeddings, norms, router, counters, "step") are
  replicated.
  """
  tx = make_optimizer(train)[0] if tx is None else tx
  try:
    return sh.tree_shardings(abstract_state(model_cfg, train, tx), mesh)
  except ValueError as err:   # an indivisible dimension the mesh checks did not foresee
    raise ConfigError(f"the model does not fit the mesh {dict(mesh.shape)}: {err}") from None


def init_sharded_state(model_cfg: ModelConfig, train: TrainConfig, mesh: Mesh, tx=None) -> dict:
  """A fresh train state created directly in its `state_shardings` on `mesh` (jit with
  out_shardings: each device computes only its own shards; the random initialization does not
  depend on the layout, jax's partitionable threefry)."""
  tx = make_optimizer(train)[0] if tx is None else tx
  shardings = state_shardings(model_cfg, train, mesh, tx)
  return jax.jit(lambda: init_state(model_cfg, train, tx)[1], out_shardings=shardings)()


def make_steps(graphdef, model_cfg: ModelConfig, train: TrainConfig, tx, schedule):
  """(train_step(state, x, y) -> (state, metrics), eval_step(state, x, y) -> loss), not jitted."""

  def loss_fn(params, rest, x, y, deterministic):
    model = nnx.merge(graphdef, params, rest)
    logits, stats = model(x, deterministic=deterministic)
    ce = cross_entropy(logits, y)
    return ce + stats["moe_loss"], (ce, stats)

  def train_step(state, x, y):
    (_, (ce, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["rest"], x, y, False)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    rest = state["rest"]
    if model_cfg.ffn == "moe" and model_cfg.bias_balancing:
      model = nnx.merge(graphdef, params, rest)
      update_router_biases(model, stats["tokens_per_expert"], train.bias_rate)
      _, _, rest = nnx.split(model, nnx.Param, ...)
    metrics = {"loss": ce, "aux_loss": stats["aux_loss"], "z_loss": stats["z_loss"],
               "dropped_fraction": stats["dropped_fraction"],
               "tokens_per_expert": stats["tokens_per_expert"],
               "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
    return {"params": params, "rest": rest, "opt": opt, "step": state["step"] + 1}, metrics

  def eval_step(state, x, y):
    return loss_fn(state["params"], state["rest"], x, y, True)[1][0]

  return train_step, eval_step


@functools.lru_cache(maxsize=8)
def _jitted_steps(model_cfg: ModelConfig, train_json: str, mesh: Mesh):
  """jit-wrapped (train_step, eval_step) taking and returning the state in its `state_shardings`
  on `mesh` (the state argument is donated), batches split over ("data", "expert"); cached per
  (model, train config, mesh) so that several runs in one process (stop and resume, tests)
  compile once."""
  train = TrainConfig(**json.loads(train_json))
  tx, schedule = make_optimizer(train)
  abstract_model = nnx.eval_shape(lambda: TransformerLM(model_cfg, rngs=nnx.Rngs(0)))
  # The MoE layers' ParallelConfig is a static attribute: it lives in the graphdef.
  ep.set_parallel(abstract_model, parallel_config(model_cfg, train, mesh))
  graphdef = nnx.split(abstract_model, nnx.Param, ...)[0]
  train_step, eval_step = make_steps(graphdef, model_cfg, train, tx, schedule)
  state_sh = state_shardings(model_cfg, train, mesh, tx)
  repl, bs = replicated(mesh), batch_sharding(mesh)
  jit_train = jax.jit(train_step, in_shardings=(state_sh, bs, bs), out_shardings=(state_sh, repl),
                      donate_argnums=0)
  jit_eval = jax.jit(eval_step, in_shardings=(state_sh, bs, bs), out_shardings=repl)
  return jit_train, jit_eval


class _StopFlag:
  """Set by SIGTERM/SIGINT: the loop saves a checkpoint after the current step and returns."""

  def __init__(self):
    self.signum: int | None = None
    self._old: dict[int, Any] = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None:   # a second signal: stop now
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _peak_flops(train: TrainConfig, num_devices: int) -> float | None:
  if train.peak_tflops is not None:
    return train.peak_tflops * 1e12 * num_devices
  kind = getattr(jax.devices()[0], "device_kind", "")
  for name, tf in PEAK_TFLOPS.items():
    if name in kind:
      return tf * 1e12 * num_devices
  return None


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


@dataclasses.dataclass
class RunResult:
  step: int                    # the step reached (checkpointed)
  state: Any                   # final train state (device arrays)
  interrupted_by: int | None   # signal number if a signal stopped the run
  out_dir: str
  last_metrics: dict[str, Any]


def run(model_cfg: ModelConfig, train: TrainConfig, out_dir: str, *, stop_at: int | None = None,
        devices=None, progress: bool = True, log=print) -> RunResult:
  """Train (or resume) into out_dir until train.steps (or stop_at); checkpoint at the end.

  Outputs: out_dir/config.json, out_dir/metrics.jsonl, out_dir/tb/, out_dir/ckpt/<step>/.
  """
  mesh = make_mesh(model_cfg, train, devices)
  tokens = data_lib.load_tokens(train.data, dtype=train.data_dtype, max_bytes=train.corpus_bytes)
  data_lib.check_vocab(tokens, model_cfg.vocab_size)
  if train.seq_len > model_cfg.max_seq_len:
    raise ConfigError(f"train.seq_len={train.seq_len} exceeds model.max_seq_len="
                      f"{model_cfg.max_seq_len}")
  train_tokens, val_tokens = data_lib.split(tokens, train.val_fraction)
  batches = data_lib.Batches(train_tokens, train.batch_size, train.seq_len, seed=train.seed)
  val_batches = data_lib.Batches(val_tokens, train.batch_size, train.seq_len, seed=train.seed + 1) \
      if val_tokens.size > train.seq_len else None

  ckpt = Checkpointer(os.path.join(out_dir, "ckpt"), keep=train.keep)
  latest = ckpt.latest_step()
  if latest is not None:
    _, meta = ckpt.read_meta(latest)
    diff = _model_diff(meta.get("model"), model_cfg)
    if diff:
      raise ConfigError(f"{out_dir} holds a checkpoint of a different model ({diff}); use another "
                        f"--out, or the saved settings to resume")
  os.makedirs(out_dir, exist_ok=True)
  _write_json(os.path.join(out_dir, "config.json"),
              {"model": model_cfg.to_dict(), "train": dataclasses.asdict(train)})

  tx, _ = make_optimizer(train)
  # Every jit below carries explicit shardings: no ambient mesh is needed.
  if latest is not None:
    # Restored straight into this mesh's shardings, whatever mesh wrote the checkpoint.
    target = abstract_like(abstract_state(model_cfg, train, tx),
                           state_shardings(model_cfg, train, mesh, tx))
    state, meta = ckpt.restore(target, latest)
    log(f"resuming from {ckpt.directory}/{latest}")
  else:
    state = init_sharded_state(model_cfg, train, mesh, tx)
  step = int(state["step"])
  batches.position = step

  jit_train, jit_eval = _jitted_steps(model_cfg, json.dumps(dataclasses.asdict(train)), mesh)
  pcfg = parallel_config(model_cfg, train, mesh)

  end = train.steps if stop_at is None else min(stop_at, train.steps)
  counts = param_counts(model_cfg)
  fpt = flops_per_token(model_cfg, train.seq_len)
  peak = _peak_flops(train, mesh.size)
  tokens_per_step = train.batch_size * train.seq_len
  logger = MetricsLogger(out_dir, tensorboard=train.tensorboard)
  if latest is None:
    log(f"model: {counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active; "
        f"mesh {dict(mesh.shape)}{' (expert-parallel MoE layers)' if pcfg else ''}; "
        f"{train_tokens.size:,} train / {val_tokens.size:,} val tokens")
  bar = ProgressBar(train.steps, start=step) if progress else None
  last: dict[str, Any] = {}
  interrupted = None
  t_last, step_last = time.perf_counter(), step

  def evaluate():
    if val_batches is None:
      return None
    losses = [jit_eval(state, *val_batches.batch(i)) for i in range(train.eval_batches)]
    return float(np.mean([float(v) for v in losses]))

  try:
    with _StopFlag() as stop:
      while step < end and stop.signum is None:
        x, y = next(batches)
        state, m = jit_train(state, x, y)
        step += 1
        at_end = step == end
        if step % train.log_every == 0 or at_end or stop.signum is not None:
          m = jax.device_get(m)
          now = time.perf_counter()
          tps = tokens_per_step * (step - step_last) / max(now - t_last, 1e-9)
          t_last, step_last = now, step
          tpe = np.asarray(m["tokens_per_expert"])
          record = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]),
                    "grad_norm": float(m["grad_norm"]), "tokens_per_s": tps,
                    "mfu": fpt * tps / peak if peak else None,
                    "tokens": step * tokens_per_step}
          if model_cfg.ffn == "moe":
            load = tpe.sum(0) / max(tpe.sum(), 1.0)
            record.update(aux_loss=float(m["aux_loss"]), z_loss=float(m["z_loss"]),
                          dropped_fraction=float(m["dropped_fraction"]),
                          expert_load_max=float(load.max() * load.size),
                          tokens_per_expert=[float(v) for v in tpe.sum(0)])
          if (train.eval_every and step % train.eval_every == 0) or at_end:
            record["val_loss"] = evaluate()
          logger.log(record)
          last = record
          if bar is not None:
            bar.update(step, record["loss"], tps)
        if train.ckpt_every and step % train.ckpt_every == 0 and not at_end:
          ckpt.save(step, state, _meta(step, model_cfg, train))
      interrupted = stop.signum
    ckpt.save(step, state, _meta(step, model_cfg, train))
  finally:
    if bar is not None:
      bar.close()
    logger.close()
    ckpt.close()
  if interrupted is not None:
    log(f"stopped by signal {interrupted} at step {step}; checkpoint saved in {ckpt.directory}")
  return RunResult(step=step, state=state, interrupted_by=interrupted, out_dir=out_dir,
                   last_metrics=last)


def _model_diff(saved: Any, model_cfg: ModelConfig) -> str:
  """'' if the saved model config equals model_cfg (fields missing from an older save count as
  their defaults), else 'field: saved X, requested Y; ...'."""
  if not isinstance(saved, dict):
    return "no model config saved"
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  current = model_cfg.to_dict()
  keys = sorted(set(saved) | set(current))
  return "; ".join(f"{k}: saved {saved.get(k, defaults.get(k))!r}, requested {current.get(k)!r}"
                   for k in keys if saved.get(k, defaults.get(k)) != current.get(k))


def _meta(step: int, model_cfg: ModelConfig, train: TrainConfig) -> dict[str, Any]:
  # The data position is the step: batch i is a function of (seed, i); the RNG is the seed.
  return {"step": step, "data_position": step, "seed": train.seed, "model": model_cfg.to_dict(),
          "train": dataclasses.asdict(train)}
