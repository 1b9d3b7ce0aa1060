"""A training run's mesh: its sizes from TrainConfig, checked against the model and the batch.

Axes ("data", "expert", "tensor") (TrainConfig.mesh_data/expert/tensor). The batch is split over
("data", "expert"). With expert > 1 or tensor > 1 the MoE layers run the expert-parallel path
(jaxmoe.parallel: dropless all-to-all dispatch in a shard_map, Megatron split of d_ff;
`parallel_config`); with expert = tensor = 1 they run the single-device path, partitioned over the
batch by XLA.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmoe import parallel
from jaxmoe.config import ConfigError, ModelConfig, TrainConfig
from jaxmoe.train import compute_copy


def train_mesh(model: ModelConfig, train: TrainConfig, devices=None) -> Mesh:
  """Mesh ("data", "expert", "tensor") over `devices` (default all), validated against the model.

  ConfigError (naming the field) unless the sharded model and the batch fit the mesh: the sizes
  fit the devices; tensor > 1 only with MoE layers; the batch divisible by grad_accum x data x
  expert; and the MoE layers fit (jaxmoe.parallel.fit, the layer's own check: experts divisible
  by "expert", the expert width d_ff by "tensor", an expert-parallel moe_impl when expert or
  tensor > 1, each device's tokens per microbatch by "tensor" for duplicate token dropping).
  """
  devices = list(jax.devices() if devices is None else devices)
  e, t = train.mesh_expert, train.mesh_tensor
  try:
    d, e, t = parallel.MeshConfig(data=train.mesh_data, expert=e, tensor=t).shape(len(devices))
  except ValueError:
    raise ConfigError(f"mesh data={train.mesh_data} x expert={e} x tensor={t} does not fit the "
                      f"{len(devices)} available devices") from None
  moe = model.num_moe_layers > 0
  if t > 1 and not moe:
    # Only the routed experts are tensor-parallel; on a model without them every tensor rank
    # would repeat the same work.
    raise ConfigError(f"train.mesh_tensor={t} splits only MoE expert weights, and this model has "
                      f"no MoE layer (model.ffn={model.ffn!r}); use mesh_data/mesh_expert")
  k = train.grad_accum
  if train.batch_size % (d * e * k):
    if k == 1:
      raise ConfigError(f"batch_size={train.batch_size} is not divisible by the data-parallel "
                        f"size data x expert = {d * e}")
    raise ConfigError(f"batch_size={train.batch_size} is not divisible by train.grad_accum x the "
                      f"data-parallel size data x expert = {k} x {d * e} = {k * d * e} (each "
                      f"microbatch is split over all data-parallel devices)")
  if moe:
    expert_parallel = e > 1 or t > 1
    try:
      parallel.check_layer_fits(
          num_experts=model.num_experts, d_ff=model.expert_d_ff or model.d_ff, expert=e, tensor=t,
          impl=model.moe_impl if expert_parallel else None,
          num_tokens=train.batch_size // k * train.seq_len, token_shards={"data": d, "expert": e},
          owner="model", d_ff_field="expert_d_ff" if model.expert_d_ff else "d_ff",
          impl_field="model.moe_impl",
          tokens_how="batch_size/(data x expert) x seq_len" if k == 1 else
          "batch_size/(grad_accum x data x expert) x seq_len",
          remedy="change train.batch_size or train.seq_len")
    except ValueError as err:
      raise ConfigError(str(err)) from None
  compute_copy.enabled(model, train, {"data": d, "expert": e, "tensor": t})   # ConfigError
  return parallel.make_mesh(parallel.MeshConfig(data=d, expert=e, tensor=t), devices)


def parallel_config(model: ModelConfig, train: TrainConfig,
                    mesh: Mesh) -> parallel.ParallelConfig | None:
  """How the MoE layers run on `mesh`: expert-parallel (a ParallelConfig) when the mesh has
  expert > 1 or tensor > 1 and the model has MoE layers; else None (the single-device layer,
  which XLA partitions over the batch axes like every other layer). model.remat_mlp becomes the
  expert-parallel layer's communication-aware remat: its backward pass recomputes the expert
  computation but keeps the all-to-all results."""
  shape = parallel.mesh_shape(mesh)
  if model.num_moe_layers == 0 or (shape["expert"] == 1 and shape["tensor"] == 1):
    return None
  return parallel.ParallelConfig(mesh, a2a=train.ep_a2a,
                                 remat="comm_aware" if model.remat_mlp else "none")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# The mesh axes a train or eval step's batch is split over, in contiguous blocks of rows.
BATCH_AXES = ("data", "expert")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The (B, T) batch of a train or eval step: B split over BATCH_AXES."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def batch_shards(mesh: Mesh | None) -> int:
  """The devices a batch (or microbatch) is split over: the product of BATCH_AXES' sizes, 1
  without a mesh."""
  return 1 if mesh is None else math.prod(mesh.shape[a] for a in BATCH_AXES)
