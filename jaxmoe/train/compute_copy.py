"""The routed experts' weights kept in the compute dtype beside their float32 masters.

The expert weight matrices (E, d, f) are most of an MoE model's parameters (3.6B of the Small
preset's 3.7B) and the model reads them only through a cast to the compute dtype. Cast in the step,
that is one more pass over every expert weight each step: read 4 B, write 2 B per parameter (7.0 ms
of a 198 ms Small step on the H100: experiments/results/h100/
2026-12-07-profile-small-b64-lean-dmoe.json).
Where the copy is on (`enabled`: by default wherever it holds no more memory than that cast) the
train state carries it, state[KEY], and the optimizer's update writes it in the same pass that
writes the new float32 weights and moments (+2 B per parameter there, no separate read): the
step's forward and backward read the copy.

The values are the same as casting in the step: the copy is the cast of the current parameters,
and the gradients of the copy are the gradients of the cast (the model casts its expert weights to
the compute dtype in any case, so its gradient of them is in that dtype either way); they are
converted to float32 before the clip and the AdamW update, as the cast's transpose did.

The copy is derived state: checkpoints hold the state without it (TrainProgram.to_checkpoint) and
a restored state gets it again (TrainProgram.from_checkpoint). Memory: the copy is alive for the
whole step where the step's own cast kept it from the forward pass to the backward one, so the
peak is about the same, but it is also held between steps (2 B per expert parameter: 7.2 GB at
Small). On a mesh with a data axis the gradients of the copy would be summed across devices in the
compute dtype, so it is off there (and a ConfigError where asked for).

state[KEY] is a tuple of arrays, one per expert weight leaf of the parameters, in their
jax.tree.leaves order (`expert_leaves`).
"""

from __future__ import annotations

from typing import Any

import jax

from jaxmoe.config import ConfigError, ModelConfig, TrainConfig

# The train state's entry that holds the copy.
KEY = "compute"

# The routed experts' weight matrices: used only through `.astype(compute dtype)` (RoutedExperts._w
# and the expert-parallel path), so a copy in that dtype changes no value.
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_out")


def is_expert_weight(path: tuple) -> bool:
  """Whether a parameter tree path names a routed expert weight matrix: it ends [..., "experts",
  "w_gate"] or, through the Param, [..., "w_gate", "value"]."""
  names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  return "experts" in names and any(n in EXPERT_WEIGHTS for n in names[-2:])


def expert_leaves(params: Any) -> tuple[int, ...]:
  """The positions, in jax.tree.leaves(params) order, of the routed experts' weight matrices."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return tuple(i for i, (path, _) in enumerate(flat) if is_expert_weight(path))


def without(state: dict) -> dict:
  """`state` (or its abstract form, or its shardings) without the copy: what a checkpoint holds."""
  return {k: v for k, v in state.items() if k != KEY}


def make_copy(params: Any, dtype: Any) -> tuple[jax.Array, ...]:
  """The expert weight leaves of `params` cast to `dtype` (state[KEY])."""
  leaves = jax.tree.leaves(params)
  return tuple(leaves[i].astype(dtype) for i in expert_leaves(params))


def with_copy(params: Any, copy: tuple[jax.Array, ...]) -> Any:
  """`params` with its expert weight leaves replaced by `copy` (what the model runs on)."""
  leaves, treedef = jax.tree.flatten(params)
  positions = expert_leaves(params)
  if len(positions) != len(copy):
    raise ValueError(f"copy: expected {len(positions)} arrays (one per expert weight of params), "
                     f"got {len(copy)}")
  for i, c in zip(positions, copy):
    leaves[i] = c
  return jax.tree.unflatten(treedef, leaves)


def copy_shardings(param_shardings: Any) -> tuple[Any, ...]:
  """The copy's shardings: each array split as the parameter it copies."""
  leaves = jax.tree.leaves(param_shardings)
  return tuple(leaves[i] for i in expert_leaves(param_shardings))


def enabled(model: ModelConfig, train: TrainConfig, mesh_shape: dict[str, int]) -> bool:
  """Whether the train state carries the copy on a mesh of `mesh_shape`.

  train.expert_compute_copy None (the default): wherever it applies and holds no more memory than
  the step's own cast: MoE layers, a 16-bit model.dtype, no data axis, and not model.remat_mlp
  (whose checkpoint keeps only the float32 weights and casts them again in the recompute, so
  there the copy would be 2 B per expert parameter more at the peak). True: wherever it applies,
  ConfigError (naming what is in the way) elsewhere. False: never."""
  why_not = _why_not(model, mesh_shape)
  if train.expert_compute_copy:
    if why_not:
      raise ConfigError(f"train.expert_compute_copy needs {why_not}")
    return True
  return train.expert_compute_copy is None and not why_not and not model.remat_mlp


def _why_not(model: ModelConfig, mesh_shape: dict[str, int]) -> str | None:
  if model.num_moe_layers == 0:
    return f"routed experts, and this model has no MoE layer (model.ffn={model.ffn!r})"
  if model.dtype == "float32":
    return ("a 16-bit model.dtype (the copy is the experts' weights in it), got "
            "model.dtype='float32'")
  if mesh_shape.get("data", 1) > 1:
    return (f"a mesh without a data axis (the copy's gradients would be summed across devices in "
            f"{model.dtype}), got mesh {dict(mesh_shape)}")
  return None
