"""The training loop: jit-compiled steps on a device mesh, AdamW + warmup/cosine, checkpoints, metrics.

State (a pytree, all float32 master copies): {"params", "rest" (non-trainable model variables such
as router biases), "opt" (optax state), "step" (int32)}. Compute runs in the model's dtype (bf16 by
default). The loss is cross-entropy + the MoE layers' weighted aux/z losses.

Gradient accumulation (TrainConfig.grad_accum = k, `--grad-accum`): each step takes the global
batch of batch_size sequences and runs forward + backward on k microbatches of batch_size / k in a
jax.lax.scan (one microbatch's activations live at a time), summing float32 gradients; the clip +
AdamW update (and the router-bias step) then runs once on their mean, so its cost (memory-bound:
it reads and writes every parameter and both moments) is paid once per k microbatches. Microbatch
i is rows i, i + k, ... (`microbatches`): each one is split over all data-parallel devices with no
data movement (batch_size must be divisible by k x data x expert). Reported loss / aux / z /
dropped fraction are microbatch means, tokens_per_expert the whole batch's counts; for a model
without MoE layers the step equals the k = 1 step (float32 rounding aside), with MoE layers it
differs slightly (the aux loss is not linear in the batch). k = 1 compiles the plain step (no scan).
Adam's first moment can be stored in bfloat16 (TrainConfig.adam_mu_dtype, `--adam-mu-dtype`;
the second moment and the parameters stay float32): 2 bytes per parameter less memory and
optimizer traffic.

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
Only the model config must match the checkpoint's; grad_accum may change on resume (same global
batch), and adam_mu_dtype too (the saved first moment is cast to the new dtype on restore).
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
from jaxmoe.model import DTYPES, ModelConfig, TransformerLM, cross_entropy, flops_per_token, \
    param_counts, update_router_biases, with_saved_defaults

# bf16 dense peak per device kind, TFLOP/s (MFU denominator).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

# TrainConfig.adam_mu_dtype -> optax's mu_dtype (None: the parameters' dtype, float32).
MU_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
  """A user configuration mistake (bad value, does not fit the mesh, mismatched resume)."""


@dataclasses.dataclass
class TrainConfig:
  steps: int = 200
  batch_size: int = 16        # global batch (sequences), per optimizer step
  grad_accum: int = 1         # microbatches per step: batch_size / grad_accum sequences at a time
  seq_len: int = 128
  lr: float = 3e-3
  min_lr_ratio: float = 0.1   # cosine decays to lr * min_lr_ratio
  warmup_steps: int = 30
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.95
  adam_mu_dtype: str = "float32"   # Adam's first moment: "float32" or "bfloat16" (2 B/param less)
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
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "keep",
                 "log_every", "mesh_expert", "mesh_tensor", "corpus_bytes"):
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
    if self.batch_size % self.grad_accum:
      raise ConfigError(f"train.batch_size={self.batch_size} is not divisible by train.grad_accum="
                        f"{self.grad_accum} (the microbatches are equal parts of the batch)")
    if self.adam_mu_dtype not in MU_DTYPES:
      raise ConfigError(f"train.adam_mu_dtype must be one of {tuple(MU_DTYPES)}, got "
                        f"{self.adam_mu_dtype!r}")
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
  divisible by "expert", the expert width d_ff by "tensor", the batch by grad_accum x data x
  expert, (the expert-parallel layer's duplicate token dropping) each device's tokens per
  microbatch by "tensor", an
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
  k = train.grad_accum
  if train.batch_size % (d * e * k):
    if k == 1:
      raise ConfigError(f"batch_size={train.batch_size} is not divisible by the data-parallel "
                        f"size data x expert = {d * e}")
    raise ConfigError(f"batch_size={train.batch_size} is not divisible by train.grad_accum x the "
                      f"data-parallel size data x expert = {k} x {d * e} = {k * d * e} (each "
                      f"microbatch is split over all data-parallel devices)")
  local_tokens = train.batch_size // (d * e * k) * train.seq_len
  if moe and t > 1 and local_tokens % t:
    what = "batch_size/(data x expert)" if k == 1 else "batch_size/(grad_accum x data x expert)"
    raise ConfigError(f"tokens per device {what} x seq_len = {local_tokens} "
                      f"must be divisible by the mesh's tensor axis ({t}): each tensor rank "
                      f"dispatches 1/{t} of them (change train.batch_size or train.seq_len)")
  try:
    return sh.make_mesh(sh.MeshConfig(data=d, expert=e, tensor=t), devices)
  except ValueError as err:
    raise ConfigError(str(err)) from None


def parallel_config(model: ModelConfig, train: TrainConfig, mesh: Mesh) -> ep.ParallelConfig | None:
  """How the MoE layers run on `mesh`: expert-parallel (a ParallelConfig) when the mesh has
  expert > 1 or tensor > 1 and the model has MoE layers; else None (the single-device layer,
  which XLA partitions over the batch axes like every other layer). model.remat_mlp becomes the
  expert-parallel layer's communication-aware remat: its backward pass recomputes the expert
  computation but keeps the all-to-all results."""
  shape = sh.mesh_shape(mesh)
  if model.num_moe_layers == 0 or (shape["expert"] == 1 and shape["tensor"] == 1):
    return None
  return ep.ParallelConfig(mesh, a2a=train.ep_a2a,
                           remat="comm_aware" if model.remat_mlp else "none")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "expert"), None))


def make_optimizer(train: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Clip by global norm, then AdamW with linear warmup and cosine decay (no decay on vectors);
  Adam's first moment mu is stored in train.adam_mu_dtype (with bfloat16 optax forms b1 * mu in
  bf16 and the rest of the update in float32, then rounds the new mu to bf16)."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.lr, warmup_steps=train.warmup_steps,
      decay_steps=max(train.steps, train.warmup_steps + 1), end_value=train.lr * train.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  tx = optax.chain(
      optax.clip_by_global_norm(train.grad_clip),
      optax.adamw(schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay,
                  mask=decay_mask, mu_dtype=MU_DTYPES[train.adam_mu_dtype]))
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


def microbatches(a: jax.Array, k: int, mesh: Mesh | None = None) -> jax.Array:
  """(B, ...) -> (k, B/k, ...): microbatch i holds rows i, i + k, i + 2k, ...

  The batch is split over ("data", "expert") in contiguous blocks of B/n rows (n = data x
  expert); with B divisible by k n each block is B/(k n) whole groups of k rows, so the reshape to
  (B/k, k, ...) keeps the same rows on every device and the swap puts every microbatch on all n
  devices (B/(k n) rows each): no data moves. With `mesh`, a sharding constraint states that layout.
  """
  b = a.shape[0]
  a = a.reshape(b // k, k, *a.shape[1:]).swapaxes(0, 1)
  if mesh is not None:
    a = jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(None, ("data", "expert"))))
  return a


def _loss_fn(graphdef):
  def loss_fn(params, rest, x, y, deterministic):
    model = nnx.merge(graphdef, params, rest)
    logits, stats = model(x, deterministic=deterministic)
    ce = cross_entropy(logits, y)
    return ce + stats["moe_loss"], (ce, stats)
  return loss_fn


def step_graphdef(model_cfg: ModelConfig, train: TrainConfig, mesh: Mesh) -> nnx.GraphDef:
  """The graphdef the steps merge the state into: the model with its MoE layers' ParallelConfig
  for `mesh` (a static attribute, so it lives in the graphdef; None on a mesh without expert or
  tensor parallelism)."""
  abstract_model = nnx.eval_shape(lambda: TransformerLM(model_cfg, rngs=nnx.Rngs(0)))
  ep.set_parallel(abstract_model, parallel_config(model_cfg, train, mesh))
  return nnx.split(abstract_model, nnx.Param, ...)[0]


# The routed experts' weight matrices: used only through `.astype(compute dtype)` (RoutedExperts._w
# and the expert-parallel path), so casting them once before the microbatch loop changes no value.
_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_out")


def cast_expert_weights(params, dtype):
  """params with the routed experts' weight matrices cast to `dtype` (the compute dtype).

  With gradient accumulation the step casts these once per step instead of once per microbatch
  (XLA redoes the cast inside the scan body, forward and backward: on the Small preset's 3.6B
  expert parameters that was 89 ms of a 473 ms step at 8 microbatches). Their gradients then come
  back in `dtype`, as they already did through the cast inside the model; the accumulator and the
  update stay float32. With remat and one microbatch the cast likewise runs once, outside the
  checkpointed blocks, instead of again in the recompute. make_grad_fn does either only on meshes
  without a data axis (see there)."""
  def cast(path, x):
    # A leaf's path ends [..., "experts", "w_gate"] or, through the Param, [..., "w_gate", "value"].
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    hit = "experts" in names and any(n in _EXPERT_WEIGHTS for n in names[-2:])
    return x.astype(dtype) if hit else x
  return jax.tree_util.tree_map_with_path(cast, params)


def make_grad_fn(graphdef, model_cfg: ModelConfig, train: TrainConfig, mesh: Mesh | None = None):
  """grad_fn(params, rest, x, y) -> (grads, ce, stats) for a global batch (B, T), not jitted.

  grad_accum = 1: one value_and_grad of cross-entropy + the MoE losses over the whole batch.
  grad_accum = k > 1: the batch is cut into k microbatches (`microbatches`) and a lax.scan runs
  forward + backward on one at a time (so only one microbatch's activations are live), adding
  each microbatch's gradients / k to a float32 carry: grads = the mean of the microbatch gradients,
  the gradient of the mean microbatch loss (for a
  model without MoE layers the full-batch gradient: every microbatch has B T / k tokens). ce and
  the stats' aux_loss / z_loss / moe_loss / dropped_fraction are the microbatch means;
  tokens_per_expert (num_moe_layers, E) is summed, i.e. the whole batch's counts, as with k = 1.
  The MoE aux loss is not linear in the batch (a product of per-batch means), so with k > 1 an MoE
  model's gradient is that of the mean microbatch aux loss, not of the full batch's aux loss.
  With `mesh`, sharding constraints keep every microbatch split over ("data", "expert") and the
  accumulator in the parameters' shardings. On a data-parallel mesh XLA all-reduces each
  microbatch's gradients inside the scan (k reductions per step, not one; none on one device).
  """
  k = train.grad_accum
  dtype = DTYPES[model_cfg.dtype]
  loss_fn = _loss_fn(graphdef)
  # With a data axis the expert weights' gradients are summed over it, in the dtype they have
  # at that point: the bf16 copy's would be summed in bf16 (float32 through the model's own cast).
  hoist = mesh is None or mesh.shape.get("data", 1) == 1

  def one(params, rest, x, y, cast_outside: bool = False):
    # cast_outside: differentiate through the expert weights' cast done here, outside the model
    # (its transpose returns float32 gradients), so that the model's own cast is a no-op.
    f = (lambda p, *a: loss_fn(cast_expert_weights(p, dtype), *a)) if cast_outside else loss_fn
    (_, (ce, stats)), grads = jax.value_and_grad(f, has_aux=True)(params, rest, x, y, False)
    return grads, ce, stats

  if k == 1:
    # Under remat the cast inside the model would run twice (forward and recompute); cast once,
    # outside the checkpointed blocks. Not for remat_mlp alone: there the bf16 copies would be
    # kept for the backward pass (6.8 GiB at the Small preset), where the MLP's checkpoint keeps
    # only the float32 parameters (no new memory) and recasts them (~7 ms a step, from the H100
    # profile's cast times): remat_mlp is chosen to save memory.
    return functools.partial(one, cast_outside=hoist and model_cfg.remat)

  param_sh = None if mesh is None else state_shardings(model_cfg, train, mesh)["params"]
  batch_sh = None if mesh is None else batch_sharding(mesh)

  def accumulated(params, rest, x, y):
    compute_params = cast_expert_weights(params, dtype) if hoist else params
    if param_sh is not None:
      compute_params = jax.lax.with_sharding_constraint(compute_params, param_sh)

    def body(acc, xy):
      xb, yb = xy
      if batch_sh is not None:
        xb, yb = (jax.lax.with_sharding_constraint(a, batch_sh) for a in (xb, yb))
      grads, ce, stats = one(compute_params, rest, xb, yb)
      # Scaled by 1/k as it is added (fused into the add): the carry ends as the mean.
      acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32) * (1.0 / k), acc, grads)
      return acc, (ce, stats)

    acc = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if param_sh is not None:
      acc = jax.lax.with_sharding_constraint(acc, param_sh)
    acc, (ce, stats) = jax.lax.scan(body, acc, (microbatches(x, k, mesh), microbatches(y, k, mesh)))
    stats = {name: v.sum(0) if name == "tokens_per_expert" else v.mean(0)
             for name, v in stats.items()}
    return acc, ce.mean(), stats

  return accumulated


def make_steps(graphdef, model_cfg: ModelConfig, train: TrainConfig, tx, schedule,
               mesh: Mesh | None = None):
  """(train_step(state, x, y) -> (state, metrics), eval_step(state, x, y) -> loss), not jitted.

  x, y: the global batch (B, T). With train.grad_accum = k > 1 both steps run it as k microbatches
  (`make_grad_fn`; the eval step averages the k forward losses), and the clip + AdamW update (and
  the router-bias step) runs once on the averaged gradients. `mesh`: see make_grad_fn.
  """
  grad_fn = make_grad_fn(graphdef, model_cfg, train, mesh)
  k = train.grad_accum

  def train_step(state, x, y):
    grads, ce, stats = grad_fn(state["params"], state["rest"], x, y)
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

  loss_fn = _loss_fn(graphdef)

  def eval_loss(params, rest, x, y):
    return loss_fn(params, rest, x, y, True)[1][0]

  def eval_step(state, x, y):
    if k == 1:
      return eval_loss(state["params"], state["rest"], x, y)
    losses = jax.lax.map(lambda xy: eval_loss(state["params"], state["rest"], *xy),
                         (microbatches(x, k, mesh), microbatches(y, k, mesh)))
    return losses.mean()

  return train_step, eval_step


@functools.lru_cache(maxsize=8)
def _jitted_steps(model_cfg: ModelConfig, train_json: str, mesh: Mesh):
  """jit-wrapped (train_step, eval_step) taking and returning the state in its `state_shardings`
  on `mesh` (the state argument is donated), batches split over ("data", "expert"); cached per
  (model, train config, mesh) so that several runs in one process (stop and resume, tests)
  compile once."""
  train = TrainConfig(**json.loads(train_json))
  tx, schedule = make_optimizer(train)
  graphdef = step_graphdef(model_cfg, train, mesh)
  train_step, eval_step = make_steps(graphdef, model_cfg, train, tx, schedule, mesh)
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
        + (f"batch {train.batch_size} in {train.grad_accum} microbatches of "
           f"{train.batch_size // train.grad_accum}; " if train.grad_accum > 1 else "") +
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
      # The first call compiles the step (minutes for a large GPU model) before it returns.
      t_compile = None
      if step < end:
        log("compiling the train step")
        t_compile = time.perf_counter()
      while step < end and stop.signum is None:
        x, y = next(batches)
        state, m = jit_train(state, x, y)
        if t_compile is not None:
          log(f"train step compiled in {time.perf_counter() - t_compile:.1f} s")
          t_compile = None
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
  saved = with_saved_defaults(saved)
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  current = model_cfg.to_dict()
  keys = sorted(set(saved) | set(current))
  return "; ".join(f"{k}: saved {saved.get(k, defaults.get(k))!r}, requested {current.get(k)!r}"
                   for k in keys if saved.get(k, defaults.get(k)) != current.get(k))


def _meta(step: int, model_cfg: ModelConfig, train: TrainConfig) -> dict[str, Any]:
  # The data position is the step: batch i is a function of (seed, i); the RNG is the seed.
  return {"step": step, "data_position": step, "seed": train.seed, "model": model_cfg.to_dict(),
          "train": dataclasses.asdict(train)}
