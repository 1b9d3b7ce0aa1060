"""Everything a training run builds once for a (ModelConfig, TrainConfig, mesh): the TrainProgram.

  program = build_program(model_cfg, train_cfg, mesh)      # cached: a second run compiles nothing
  state = program.init_state()                             # fresh, created in its shardings
  state, metrics = program.train_step(state, x, y)         # jitted, the state donated
  loss = program.eval_step(state, x, y)

The optimizer is built once, the model's abstract shape is evaluated once (it gives the abstract
state, its shardings and the steps' graphdef), and the jitted steps are cached per (model config,
train config, mesh): both configs are frozen and hashable, so several runs in one process (stop
and resume, tests, benchmarks) compile once. Benchmarks and profilers use this, not the loop.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxmoe import parallel
from jaxmoe.checkpointing import abstract_like
from jaxmoe.config import ModelConfig, TrainConfig
from jaxmoe.model import TransformerLM
from jaxmoe.train import compute_copy, state as state_lib
from jaxmoe.train.mesh import batch_sharding, parallel_config, replicated
from jaxmoe.train.step import make_grad_fn, make_steps


@dataclasses.dataclass(frozen=True, eq=False)
class TrainProgram:
  """The compiled-once pieces of training `model` with `train` on `mesh`.

  parallel: the MoE layers' ParallelConfig on this mesh (None: the single-device layers).
  optimizer, schedule: make_optimizer(train).
  graphdef: the model the steps merge the state into, with `parallel` set on its MoE layers (a
    static attribute, so it lives in the graphdef).
  abstract_state: the state's structure with ShapeDtypeStruct leaves; state_shardings: its
    NamedShardings (jaxmoe.train.state); batch_sharding: the (B, T) batch's.
  compute_copy: whether the state carries the expert weights' compute copy (state["compute"]:
    jaxmoe.train.compute_copy.enabled); checkpoints never hold it (to_checkpoint,
    from_checkpoint).
  grad_fn: grad_fn(params, rest, x, y) -> (grads, ce, stats), not jitted (the train step's own).
  train_step: jit of (state, x, y) -> (state, metrics), the state donated; eval_step: jit of
    (state, x, y) -> loss. Both take and return the state in state_shardings.
  """

  model: ModelConfig
  train: TrainConfig
  mesh: Mesh
  parallel: parallel.ParallelConfig | None
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  graphdef: nnx.GraphDef
  abstract_state: dict
  state_shardings: dict
  batch_sharding: NamedSharding
  compute_copy: bool
  grad_fn: Callable[..., Any]
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]

  def init_state(self) -> dict:
    """A fresh train state created directly in its shardings (jit with out_shardings: each device
    computes only its own shards; the random initialization does not depend on the layout, jax's
    partitionable threefry)."""
    return jax.jit(lambda: state_lib.init_state(self.model, self.train, self.optimizer,
                                                self.compute_copy),
                   out_shardings=self.state_shardings)()

  def restore_target(self) -> Any:
    """The abstract state of a checkpoint with this mesh's shardings: a checkpoint restores
    straight onto it, whatever mesh wrote it (then `from_checkpoint` makes it a train state)."""
    return abstract_like(self.to_checkpoint(self.abstract_state),
                         self.to_checkpoint(self.state_shardings))

  @staticmethod
  def to_checkpoint(state: dict) -> dict:
    """What a checkpoint holds of a train state: all of it but the derived compute copy."""
    return compute_copy.without(state)

  def from_checkpoint(self, state: dict) -> dict:
    """The train state of a checkpoint's state (or of a state whose parameters were replaced):
    the compute copy (re)made from its parameters where it is on."""
    if not self.compute_copy:
      return self.to_checkpoint(state)
    return jax.jit(lambda s: state_lib.with_compute_copy(s, self.model, True),
                   out_shardings=self.state_shardings)(self.to_checkpoint(state))


@functools.lru_cache(maxsize=8)
def build_program(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh) -> TrainProgram:
  """The TrainProgram of (model_cfg, train_cfg, mesh), built once per distinct triple."""
  tx, schedule = state_lib.make_optimizer(train_cfg)
  pcfg = parallel_config(model_cfg, train_cfg, mesh)
  abstract_model = nnx.eval_shape(lambda: TransformerLM(model_cfg, rngs=nnx.Rngs(train_cfg.seed)))
  copy = compute_copy.enabled(model_cfg, train_cfg, dict(mesh.shape))
  abstract = state_lib.abstract_state(abstract_model, tx, copy)
  parallel.set_parallel(abstract_model, pcfg)
  graphdef = nnx.split(abstract_model, nnx.Param, ...)[0]
  state_sh = state_lib.state_shardings(abstract, mesh)
  repl, bs = replicated(mesh), batch_sharding(mesh)
  grad_fn = make_grad_fn(graphdef, model_cfg, train_cfg, mesh, state_sh["params"])
  train_step, eval_step = make_steps(graphdef, model_cfg, train_cfg, tx, schedule, grad_fn, mesh)
  jit_train = jax.jit(train_step, in_shardings=(state_sh, bs, bs), out_shardings=(state_sh, repl),
                      donate_argnums=0)
  jit_eval = jax.jit(eval_step, in_shardings=(state_sh, bs, bs), out_shardings=repl)
  return TrainProgram(model=model_cfg, train=train_cfg, mesh=mesh, parallel=pcfg, optimizer=tx,
                      schedule=schedule, graphdef=graphdef, abstract_state=abstract,
                      state_shardings=state_sh, batch_sharding=bs, compute_copy=copy,
                      grad_fn=grad_fn,
                      train_step=jit_train, eval_step=jit_eval)
