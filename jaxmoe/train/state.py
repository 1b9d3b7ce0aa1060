"""The train state and its optimizer: AdamW with warmup and cosine decay, sharded by the rules.

State (a pytree, all float32 master copies): {"params", "rest" (non-trainable model variables such
as router biases), "opt" (optax state), "step" (int32)}, and where jaxmoe.train.compute_copy is
enabled "compute" (compute_copy.KEY): the routed experts' weights in the compute dtype, derived
from "params" and not checkpointed. It is sharded by the parameters' logical axis names through
jaxmoe.parallel.RULES: the routed experts' stacked weights (E, d, f) are split E over "expert"
and d_ff over "tensor"; the optax moments (and the compute copy) mirror the parameters and are
split the same way; everything else (attention, embeddings, norms, router, dense MLPs, step
counters) is replicated. The state is created sharded (jit with out_shardings, never materialized
whole on one device).

Adam's first moment can be stored in bfloat16 (TrainConfig.adam_mu_dtype, `--adam-mu-dtype`; the
second moment and the parameters stay float32): 2 bytes per parameter less memory and optimizer
traffic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxmoe import parallel
from jaxmoe.config import DTYPES, MU_DTYPES, ConfigError, ModelConfig, TrainConfig
from jaxmoe.model import TransformerLM
from jaxmoe.train import compute_copy


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


def init_state(model_cfg: ModelConfig, train: TrainConfig, tx, copy: bool = False) -> dict:
  """The state of a fresh model (seeded by train.seed); copy: with the compute copy."""
  model = TransformerLM(model_cfg, rngs=nnx.Rngs(train.seed))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return with_compute_copy({"params": params, "rest": rest, "opt": tx.init(params),
                            "step": jnp.zeros((), jnp.int32)}, model_cfg, copy)


def with_compute_copy(state: dict, model_cfg: ModelConfig, copy: bool) -> dict:
  """`state` with "compute" (re)made from its parameters if `copy`, without it otherwise (a
  checkpoint's state, which has none, becomes a train state)."""
  state = compute_copy.without(state)
  if copy:
    state[compute_copy.KEY] = compute_copy.make_copy(state["params"], DTYPES[model_cfg.dtype])
  return state


def abstract_state(abstract_model: TransformerLM, tx, copy: bool = False) -> dict:
  """The state's structure with jax.ShapeDtypeStruct leaves (nnx Variables keep their logical
  names) from an abstract model (nnx.eval_shape), without allocating anything."""
  _, params, rest = nnx.split(abstract_model, nnx.Param, ...)
  state = {"params": params, "rest": rest, "opt": jax.eval_shape(tx.init, params),
           "step": jax.ShapeDtypeStruct((), jnp.int32)}
  if copy:
    dtype = DTYPES[abstract_model.cfg.dtype]
    state[compute_copy.KEY] = jax.eval_shape(lambda p: compute_copy.make_copy(p, dtype), params)
  return state


def state_shardings(abstract: dict, mesh: Mesh) -> dict:
  """NamedShardings of the train state on `mesh` (same structure as the abstract state).

  Parameters by their logical names through jaxmoe.parallel.RULES; the optax moments are built
  from the parameter tree (nnx Variables keep the names), so they are split exactly like their
  parameters; unannotated arrays (attention, embeddings, norms, router, counters, "step") are
  replicated.
  """
  try:
    shardings = parallel.tree_shardings(compute_copy.without(abstract), mesh)
  except ValueError as err:   # an indivisible dimension the mesh checks did not foresee
    raise ConfigError(f"the model does not fit the mesh {dict(mesh.shape)}: {err}") from None
  if compute_copy.KEY in abstract:   # no logical names of its own: split as what it copies
    shardings[compute_copy.KEY] = compute_copy.copy_shardings(shardings["params"])
  return shardings
