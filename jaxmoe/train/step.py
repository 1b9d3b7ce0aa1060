"""The train and eval steps (not jitted): loss, gradients with accumulation, the AdamW update.

The loss is cross-entropy + the MoE layers' weighted aux/z losses; compute runs in the model's
dtype (bf16 by default) on float32 master parameters.

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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kernels.cross_entropy import linear_cross_entropy
from jaxmoe.config import DTYPES, ModelConfig, TrainConfig
from jaxmoe.train import compute_copy
from jaxmoe.model import cross_entropy, update_router_biases
from jaxmoe.train.mesh import BATCH_AXES, batch_sharding, batch_shards as mesh_batch_shards


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
    a = jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(None, BATCH_AXES)))
  return a


def loss_fn(graphdef, batch_shards: int = 1):
  """loss_fn(params, rest, x, y, deterministic) -> (cross-entropy + the MoE losses, (ce, stats)).

  With the model's loss_chunks > 0 the cross-entropy runs fused with the LM head
  (kernels.cross_entropy.linear_cross_entropy) instead of on the model's logits; batch_shards:
  the devices the batch is split over (jaxmoe.train.mesh.batch_shards), so that the head's
  gradient is summed across them once."""
  def loss(params, rest, x, y, deterministic):
    model = nnx.merge(graphdef, params, rest)
    chunks = model.cfg.loss_chunks
    if chunks:
      feats, stats = model.features(x, deterministic=deterministic)
      ce = linear_cross_entropy(feats, model.head_weight(feats.dtype), y,
                                num_chunks=min(chunks, feats.shape[1]), batch_shards=batch_shards)
    else:
      logits, stats = model(x, deterministic=deterministic)
      ce = cross_entropy(logits, y)
    return ce + stats["moe_loss"], (ce, stats)
  return loss


def cast_expert_weights(params, dtype):
  """params with the routed experts' weight matrices cast to `dtype` (the compute dtype).

  With gradient accumulation the step casts these once per step instead of once per microbatch
  (left inside the scan body, XLA redoes the cast in every microbatch, forward and backward: on
  the Small preset's 3.6B expert parameters 89 ms of a 473 ms step at 8 microbatches on the
  H100, experiments/results/h100/2026-11-23-profile-small-b64-ga8-dmoe-cast-per-microbatch.json). Their gradients then come
  back in `dtype`, as they already did through the cast inside the model; the accumulator and the
  update stay float32. With remat and one microbatch the cast likewise runs once, outside the
  checkpointed blocks, instead of again in the recompute. make_grad_fn does either only on meshes
  without a data axis (see there). A no-op on weights already in `dtype` (the train state's
  compute copy, jaxmoe.train.compute_copy)."""
  def cast(path, x):
    return x.astype(dtype) if compute_copy.is_expert_weight(path) else x
  return jax.tree_util.tree_map_with_path(cast, params)


def make_grad_fn(graphdef, model_cfg: ModelConfig, train: TrainConfig, mesh: Mesh | None = None,
                 param_shardings=None):
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
  accumulator in the parameters' shardings (`param_shardings`, required with `mesh`). On a data-parallel mesh XLA all-reduces each
  microbatch's gradients inside the scan (k reductions per step, not one; none on one device).
  """
  k = train.grad_accum
  dtype = DTYPES[model_cfg.dtype]
  loss = loss_fn(graphdef, mesh_batch_shards(mesh))
  # With a data axis the expert weights' gradients are summed over it, in the dtype they have
  # at that point: the bf16 copy's would be summed in bf16 (float32 through the model's own cast).
  hoist = mesh is None or mesh.shape.get("data", 1) == 1

  def one(params, rest, x, y, cast_outside: bool = False):
    # cast_outside: differentiate through the expert weights' cast done here, outside the model
    # (its transpose returns float32 gradients), so that the model's own cast is a no-op.
    f = (lambda p, *a: loss(cast_expert_weights(p, dtype), *a)) if cast_outside else loss
    (_, (ce, stats)), grads = jax.value_and_grad(f, has_aux=True)(params, rest, x, y, False)
    return grads, ce, stats

  if k == 1:
    # Under remat the cast inside the model would run twice (forward and recompute); cast once,
    # outside the checkpointed blocks. Not for remat_mlp alone: there the bf16 copies would be
    # kept for the backward pass (6.8 GiB at the Small preset), where the MLP's checkpoint keeps
    # only the float32 parameters (no new memory) and recasts them (~7 ms a step, from the H100
    # profile's cast times): remat_mlp is chosen to save memory.
    return functools.partial(one, cast_outside=hoist and model_cfg.remat)

  if mesh is not None and param_shardings is None:
    raise ValueError("make_grad_fn: param_shardings (the parameters' NamedShardings on `mesh`, "
                     "TrainProgram.state_shardings['params']) must be given with mesh, got None")
  param_sh = None if mesh is None else param_shardings
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


def make_steps(graphdef, model_cfg: ModelConfig, train: TrainConfig, tx, schedule, grad_fn,
               mesh: Mesh | None = None):
  """(train_step(state, x, y) -> (state, metrics), eval_step(state, x, y) -> loss), not jitted.

  x, y: the global batch (B, T). With train.grad_accum = k > 1 both steps run it as k microbatches
  (`make_grad_fn`; the eval step averages the k forward losses), and the clip + AdamW update (and
  the router-bias step) runs once on the averaged gradients. grad_fn: make_grad_fn(graphdef,
  model_cfg, train, mesh, ...), which the train step runs; `mesh`: see make_grad_fn.
  """
  k = train.grad_accum
  dtype = DTYPES[model_cfg.dtype]

  def model_params(state):
    # A state with the compute copy (jaxmoe.train.compute_copy) runs the model on it: its expert
    # weights are already in the compute dtype, so the model's own casts (and
    # cast_expert_weights) are no-ops.
    if compute_copy.KEY in state:
      return compute_copy.with_copy(state["params"], state[compute_copy.KEY])
    return state["params"]

  def train_step(state, x, y):
    copy = compute_copy.KEY in state
    grads, ce, stats = grad_fn(model_params(state), state["rest"], x, y)
    if copy:
      # The copy's gradients are in the compute dtype: float32 for the clip and the update, as
      # the transpose of the cast would have made them (XLA fuses the convert into both).
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state["params"])
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
    new = {"params": params, "rest": rest, "opt": opt, "step": state["step"] + 1}
    if copy:
      # Elementwise on the update's output: XLA writes it from the update's own fusion.
      new[compute_copy.KEY] = compute_copy.make_copy(params, dtype)
    return new, metrics

  loss = loss_fn(graphdef, mesh_batch_shards(mesh))

  def eval_loss(params, rest, x, y):
    return loss(params, rest, x, y, True)[1][0]

  def eval_step(state, x, y):
    params = model_params(state)
    if k == 1:
      return eval_loss(params, state["rest"], x, y)
    losses = jax.lax.map(lambda xy: eval_loss(params, state["rest"], *xy),
                         (microbatches(x, k, mesh), microbatches(y, k, mesh)))
    return losses.mean()

  return train_step, eval_step
