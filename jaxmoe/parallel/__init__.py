"""The parallel wing: device meshes, logical-axis sharding rules and the expert-parallel MoE layer
(tensor, expert and data parallelism, DeepSpeed-TED).

  mesh = make_mesh(MeshConfig(data=2, expert=4, tensor=1))   # mesh.py
  shard_model(model, mesh)                                   # rules.py: parameters by logical names
  set_parallel(model, ParallelConfig(mesh))                  # layer.py: MoE layers run expert-parallel

  mesh.py           the ("data", "expert", "tensor") mesh: MeshConfig, make_mesh, mesh_shape
  rules.py          logical axis names -> mesh axes: RULES, tree_shardings, shard_model, ...
  fit.py            does an MoE layer fit a mesh: the one check (layer and training run)
  layer.py          ParallelConfig (implements jaxmoe.moe.ExpertParallel), set_parallel, and the
                    expert-parallel layer's per-device program (shard_map, all-to-all)
  local_experts.py  the local experts on the received rows (jaxmoe.experts.expert_mlp)
  collectives.py    shard_map bookkeeping, ragged_all_to_all_emulated
  remat.py          communication-aware activation checkpointing
  hlo.py            collectives of a compiled program and their bytes

This package imports the layer modules (jaxmoe.moe, experts, router, dispatch); none of them
imports it: the MoE layer calls the methods of the ParallelConfig it is given.
docs/parallelism.md describes the whole scheme and multi-host launch.
"""

from jaxmoe.parallel.collectives import ragged_all_to_all_emulated
from jaxmoe.parallel.fit import EP_IMPLS, check_layer_fits
from jaxmoe.parallel.hlo import collective_summary, hlo_collectives
from jaxmoe.parallel.layer import (ParallelConfig, expert_params, param_specs, routed_experts,
                                   run_router, set_parallel)
from jaxmoe.parallel.mesh import AXES, MeshConfig, make_mesh, mesh_shape
from jaxmoe.parallel.remat import COMM_NAMES, REMAT_MODES, comm_aware_policy
from jaxmoe.parallel.rules import (RULES, batch_sharding, constrain, logical_names,
                                   logical_to_spec, shard_model, shard_tree, tree_shardings,
                                   tree_specs)

__all__ = [
    "AXES", "COMM_NAMES", "EP_IMPLS", "MeshConfig", "ParallelConfig", "REMAT_MODES", "RULES",
    "batch_sharding", "check_layer_fits", "collective_summary", "comm_aware_policy", "constrain",
    "expert_params", "hlo_collectives", "logical_names", "logical_to_spec", "make_mesh",
    "mesh_shape", "param_specs", "ragged_all_to_all_emulated", "routed_experts", "run_router",
    "set_parallel", "shard_model", "shard_tree", "tree_shardings", "tree_specs",
]
