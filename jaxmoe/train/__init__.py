"""Training: jit-compiled steps on a device mesh, AdamW + warmup/cosine, checkpoints, metrics.

  from jaxmoe.config import ModelConfig, TrainConfig
  result = jaxmoe.train.run(ModelConfig(...), TrainConfig(...), "runs/x")     # the CLI's job

  mesh = train_mesh(model_cfg, train_cfg)                  # checked against the model and batch
  program = build_program(model_cfg, train_cfg, mesh)      # optimizer, shardings, jitted steps
  state = program.init_state()
  state, metrics = program.train_step(state, x, y)

  mesh.py     train_mesh (the mesh of TrainConfig's sizes, checked), parallel_config, batch_sharding
  compute_copy.py  the expert weights in the compute dtype, kept in the state (expert_compute_copy)
  state.py    the optimizer (make_optimizer), the train state, its abstract shape and shardings
  step.py     loss, gradients with accumulation (microbatches), the train and eval steps
  program.py  TrainProgram: all of the above built once per (model, train config, mesh), cached
  stop.py     SIGTERM/SIGINT: save and return after the current step
  finite.py   stop at the first non-finite loss or gradient norm, before anything is saved
  lock.py     RUN/.lock: one process at a time trains into a run folder
  loop.py     run: data, resume, the loop, metrics, checkpoints

The configuration (TrainConfig, ConfigError) lives in jaxmoe.config with the model's.
"""

from jaxmoe.config import ConfigError, TrainConfig
from jaxmoe.train.loop import RunResult, peak_flops, run
from jaxmoe.train.mesh import batch_sharding, parallel_config, train_mesh
from jaxmoe.train.program import TrainProgram, build_program
from jaxmoe.train.state import make_optimizer
from jaxmoe.train.step import cast_expert_weights, loss_fn, make_grad_fn, make_steps, microbatches

__all__ = [
    "ConfigError", "RunResult", "TrainConfig", "TrainProgram", "batch_sharding", "build_program",
    "cast_expert_weights", "loss_fn", "make_grad_fn", "make_optimizer", "make_steps",
    "microbatches", "parallel_config", "peak_flops", "run", "train_mesh",
]
