"""The training loop: `run` trains (or resumes) a model into a run folder.

Outputs: OUT/config.json, OUT/metrics.jsonl, OUT/tb/, OUT/ckpt/<step>/.

Resuming: `run` continues from the newest checkpoint in OUT/ckpt: parameters, optimizer state,
step, data position (batch i is a pure function of (seed, i)) and RNG (derived from seed and step).
Only the model config must match the checkpoint's; grad_accum may change on resume (same global
batch), and adam_mu_dtype too (the saved first moment is cast to the new dtype on restore).
The checkpoint is restored straight onto the current mesh's shardings, so a run saved on one mesh
(say data=8) resumes on another (data=2, expert=4). SIGTERM/SIGINT finish the current step, save a
checkpoint and return.

What a resume keeps: the learning-rate schedule (SCHEDULE_FIELDS: a resume asking for another is
refused; `stop_at` ends a run early without changing it); the last good checkpoint (a damaged newer
one is renamed aside, Checkpointer.restore_newest); metrics.jsonl in step order (records past the
resumed step are dropped). A diverging run stops at its first non-finite loss or gradient norm
and saves nothing of it (jaxmoe.train.finite). RUN/.lock keeps a second process out of the folder
(jaxmoe.train.lock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np

from jaxmoe import corpus as corpus_lib
from jaxmoe import data as data_lib
from jaxmoe import tokenizer as tok_lib
from jaxmoe.checkpointing import Checkpointer, CheckpointError
from jaxmoe.config import ConfigError, ModelConfig, TrainConfig, with_saved_defaults
from jaxmoe.metrics import MetricsLogger, ProgressBar
from jaxmoe.model import flops_per_token, param_counts
from jaxmoe.train.finite import FiniteWatch
from jaxmoe.train.lock import RunLock
from jaxmoe.train.mesh import train_mesh
from jaxmoe.train.program import build_program
from jaxmoe.train.stop import StopFlag

# bf16 dense peak per device kind, TFLOP/s (MFU denominator).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclasses.dataclass
class RunResult:
  step: int                    # the step reached (checkpointed)
  state: Any                   # final train state (device arrays)
  interrupted_by: int | None   # signal number if a signal stopped the run
  out_dir: str
  last_metrics: dict[str, Any]


@dataclasses.dataclass
class _Data:
  """A run's batches: training, validation (None without a validation share), token counts."""
  batches: data_lib.Batches
  val_batches: data_lib.Batches | None
  train_tokens: int
  val_tokens: int
  tokenizer: tok_lib.Tokenizer


def _load_data(model_cfg: ModelConfig, train: TrainConfig, log) -> _Data:
  corpus = corpus_lib.load(train.data, train.tokenizer, vocab_size=model_cfg.vocab_size,
                           data_dtype=train.data_dtype, corpus_bytes=train.corpus_bytes,
                           val_fraction=train.val_fraction, log=log)
  tokens = corpus.tokens
  data_lib.check_vocab(tokens, model_cfg.vocab_size)
  if train.seq_len > model_cfg.max_seq_len:
    raise ConfigError(f"train.seq_len={train.seq_len} exceeds model.max_seq_len="
                      f"{model_cfg.max_seq_len}")
  train_tokens, val_tokens = data_lib.split(tokens, train.val_fraction)
  batches = data_lib.Batches(train_tokens, train.batch_size, train.seq_len, seed=train.seed)
  val_batches = data_lib.Batches(val_tokens, train.batch_size, train.seq_len, seed=train.seed + 1) \
      if val_tokens.size > train.seq_len else None
  return _Data(batches, val_batches, train_tokens.size, val_tokens.size, corpus.tokenizer)


def run(model_cfg: ModelConfig, train: TrainConfig, out_dir: str, *, stop_at: int | None = None,
        devices=None, progress: bool = True, log=print) -> RunResult:
  """Train (or resume) into out_dir until train.steps (or stop_at); checkpoint at the end.

  Outputs: out_dir/config.json, out_dir/metrics.jsonl, out_dir/tb/, out_dir/ckpt/<step>/.
  Raises ConfigError for a refused resume (another model or schedule), RunFolderLocked while
  another process trains into out_dir, NonFiniteError when training diverges (nothing saved).
  """
  mesh = train_mesh(model_cfg, train, devices)
  data = _load_data(model_cfg, train, log)

  ckpt_dir = os.path.join(out_dir, "ckpt")
  fresh = not os.path.isdir(ckpt_dir) or not any(n.isdigit() for n in os.listdir(ckpt_dir))
  # --init-from is read and checked before anything is written.
  init = _init_params(train.init_from, model_cfg, log) if fresh and train.init_from else None
  # One lock per job: on several hosts (jax.distributed) its other processes share the folder.
  lock = RunLock(out_dir, log=log) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    return _run_locked(model_cfg, train, out_dir, mesh, data, init, stop_at, progress, log)


def _run_locked(model_cfg: ModelConfig, train: TrainConfig, out_dir: str, mesh, data: _Data, init,
                stop_at: int | None, progress: bool, log) -> RunResult:
  """run, once out_dir's lock is held."""
  ckpt = Checkpointer(os.path.join(out_dir, "ckpt"), keep=train.keep)
  try:
    return _train(model_cfg, train, out_dir, mesh, data, init, stop_at, progress, log, ckpt)
  finally:
    ckpt.close()


def _resume(ckpt: Checkpointer, program, model_cfg: ModelConfig, train: TrainConfig, out_dir: str,
            log) -> tuple[Any, int | None]:
  """(state, step restored or None for a fresh run): the newest checkpoint that restores (newer
  damaged ones are renamed aside, each named in a log line); ConfigError, before anything is
  written, if it holds another model or another learning-rate schedule."""
  if ckpt.latest_step() is None:
    return None, None

  def restore(step: int):
    _, meta = ckpt.read_meta(step)
    diff = _model_diff(meta.get("model"), model_cfg)
    if diff:
      raise ConfigError(f"{out_dir} holds a checkpoint of a different model ({diff}); use another "
                        f"--out, or the saved settings to resume")
    _check_schedule(meta.get("train"), train, out_dir)
    # Restored straight into this mesh's shardings, whatever mesh wrote the checkpoint.
    return program.from_checkpoint(ckpt.restore(program.restore_target(), step)[0])

  step, state = ckpt.restore_newest(restore, log=log)
  return state, step


def _train(model_cfg: ModelConfig, train: TrainConfig, out_dir: str, mesh, data: _Data, init,
           stop_at: int | None, progress: bool, log, ckpt: Checkpointer) -> RunResult:
  # Every jit of the program carries explicit shardings: no ambient mesh is needed.
  program = build_program(model_cfg, train, mesh)
  state, latest = _resume(ckpt, program, model_cfg, train, out_dir, log)
  _write_json(os.path.join(out_dir, "config.json"),
              {"model": model_cfg.to_dict(), "train": dataclasses.asdict(train),
               "tokenizer": tok_lib.describe(data.tokenizer)})
  if isinstance(data.tokenizer, tok_lib.BPETokenizer):
    data.tokenizer.save(os.path.join(out_dir, tok_lib.TOKENIZER_FILE))   # for jaxmoe sample
  if latest is not None:
    log(f"resuming from {ckpt.directory}/{latest}")
  else:
    state = program.init_state()
    if init is not None:
      state = _with_params(state, init, program)
      log(f"starting from the parameters of {train.init_from}")
  step = int(state["step"])
  data.batches.position = step

  end = train.steps if stop_at is None else min(stop_at, train.steps)
  logger = MetricsLogger(out_dir, tensorboard=train.tensorboard, resume_step=step)
  if latest is None:
    log(_describe(model_cfg, train, mesh, program.parallel is not None, data))
  bar = ProgressBar(train.steps, start=step) if progress else None
  last: dict[str, Any] = {}
  interrupted = None
  rate = _Throughput(model_cfg, train, mesh.size, step)
  watch = FiniteWatch(train.lr)
  saved = latest

  def evaluate():
    if data.val_batches is None:
      return None
    losses = [program.eval_step(state, *data.val_batches.batch(i))
              for i in range(train.eval_batches)]
    return float(np.mean([float(v) for v in losses]))

  def save():
    nonlocal saved
    watch.check(saved)   # never a non-finite state on disk (it could rotate good ones out)
    ckpt.save(step, program.to_checkpoint(state), _meta(step, model_cfg, train))
    saved = step

  try:
    with StopFlag() as stop:
      # The first call compiles the step (minutes for a large GPU model) before it returns.
      t_compile = None
      if step < end:
        log("compiling the train step")
        t_compile = time.perf_counter()
      while step < end and stop.signum is None:
        x, y = next(data.batches)
        state, m = program.train_step(state, x, y)
        if t_compile is not None:
          log(f"train step compiled in {time.perf_counter() - t_compile:.1f} s")
          t_compile = None
        step += 1
        watch.add(step, m)
        at_end = step == end
        if step % train.log_every == 0 or at_end or stop.signum is not None:
          watch.check(saved)   # the loop waits for this step here anyway
          record = _record(step, jax.device_get(m), rate, model_cfg)
          if (train.eval_every and step % train.eval_every == 0) or at_end:
            record["val_loss"] = evaluate()
          logger.log(record)
          last = record
          if bar is not None:
            bar.update(step, record["loss"], record["tokens_per_s"])
        if train.ckpt_every and step % train.ckpt_every == 0 and not at_end:
          save()
      interrupted = stop.signum
    save()
  finally:
    if bar is not None:
      bar.close()
    logger.close()
  if interrupted is not None:
    log(f"stopped by signal {interrupted} at step {step}; checkpoint saved in {ckpt.directory}")
  return RunResult(step=step, state=state, interrupted_by=interrupted, out_dir=out_dir,
                   last_metrics=last)


# The fields that define the learning-rate schedule (jaxmoe.train.state.make_optimizer): fixed
# when a run starts, so that N steps then N more train exactly as one run of 2N.
SCHEDULE_FIELDS = ("steps", "lr", "warmup_steps", "min_lr_ratio")


def _check_schedule(saved: Any, train: TrainConfig, out_dir: str) -> None:
  """ConfigError if a resume asks for another schedule than the checkpoint's (meta["train"]);
  a checkpoint that saved no train config (an older one) is accepted."""
  if not isinstance(saved, dict):
    return
  differ = [(k, saved[k], getattr(train, k)) for k in SCHEDULE_FIELDS
            if k in saved and saved[k] != getattr(train, k)]
  if not differ:
    return
  changes = ", ".join(f"{k}: saved {old!r}, requested {new!r}" for k, old, new in differ)
  flags = " ".join(f"--{k.replace('_', '-')} {old}" for k, old, _ in differ)
  raise ConfigError(f"{out_dir} was started with another learning-rate schedule ({changes}), "
                    f"which a resume cannot change; resume with {flags} (stop earlier with "
                    f"--stop-at STEP), or train into another --out")


# Fields that change how a model runs, not what it computes: --init-from may set them anew.
RUNTIME_FIELDS = ("moe_impl", "backend", "block_size", "dtype", "remat", "remat_skip", "remat_mlp",
                  "attention", "capacity_factor", "aux_loss_weight", "z_loss_weight",
                  "bias_balancing", "max_seq_len")


def _init_params(path: str, model_cfg: ModelConfig, log=print):
  """The parameters (an nnx State of float32 arrays) of run or checkpoint `path`, whose model
  must be model_cfg but for RUNTIME_FIELDS; ConfigError naming the fields that differ."""
  from jaxmoe.sample import load_model

  try:
    model, meta = load_model(path, log=log)
  except CheckpointError as e:
    raise ConfigError(f"--init-from: {e}") from None
  saved = model.cfg.to_dict()
  wanted = model_cfg.to_dict()
  differ = [k for k in wanted if k not in RUNTIME_FIELDS and saved.get(k) != wanted[k]]
  if differ:
    raise ConfigError(f"--init-from {path}: its model differs in " + ", ".join(
        f"{k} (saved {saved.get(k)!r}, requested {wanted[k]!r})" for k in differ) +
        "; give the saved values (jaxmoe train --config RUN/config.json) or leave them unset")
  from flax import nnx
  return nnx.split(model, nnx.Param, ...)[1]


def _with_params(state: dict, params, program) -> dict:
  """The fresh train state with `params` in place of the initial parameters (same shardings)."""
  shardings = program.state_shardings["params"]
  placed = jax.tree.map(lambda new, old, sh: jax.device_put(new.astype(old.dtype), sh),
                        params, state["params"], shardings)
  return program.from_checkpoint({**state, "params": placed})


def _describe(model_cfg: ModelConfig, train: TrainConfig, mesh, expert_parallel: bool,
              data: _Data) -> str:
  """The first log line of a fresh run: model size, mesh, batch, tokens."""
  counts = param_counts(model_cfg)
  return (f"model: {counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active; "
          f"mesh {dict(mesh.shape)}{' (expert-parallel MoE layers)' if expert_parallel else ''}; "
          + (f"batch {train.batch_size} in {train.grad_accum} microbatches of "
             f"{train.batch_size // train.grad_accum}; " if train.grad_accum > 1 else "") +
          f"{data.train_tokens:,} train / {data.val_tokens:,} val tokens")


class _Throughput:
  """Tokens per second since the last logged step, and the MFU they make."""

  def __init__(self, model_cfg: ModelConfig, train: TrainConfig, num_devices: int, step: int):
    self.tokens_per_step = train.batch_size * train.seq_len
    self.flops_per_token = flops_per_token(model_cfg, train.seq_len)
    self.peak = peak_flops(train, num_devices)
    self.t_last, self.step_last = time.perf_counter(), step

  def tokens_per_s(self, step: int) -> float:
    now = time.perf_counter()
    tps = self.tokens_per_step * (step - self.step_last) / max(now - self.t_last, 1e-9)
    self.t_last, self.step_last = now, step
    return tps


def _record(step: int, m: dict[str, Any], rate: _Throughput, model_cfg: ModelConfig) -> dict:
  """One metrics.jsonl record of the train step's metrics `m` (host values)."""
  tps = rate.tokens_per_s(step)
  tpe = np.asarray(m["tokens_per_expert"])
  record = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]),
            "grad_norm": float(m["grad_norm"]), "tokens_per_s": tps,
            "mfu": rate.flops_per_token * tps / rate.peak if rate.peak else None,
            "tokens": step * rate.tokens_per_step}
  if model_cfg.ffn == "moe":
    load = tpe.sum(0) / max(tpe.sum(), 1.0)
    record.update(aux_loss=float(m["aux_loss"]), z_loss=float(m["z_loss"]),
                  dropped_fraction=float(m["dropped_fraction"]),
                  expert_load_max=float(load.max() * load.size),
                  tokens_per_expert=[float(v) for v in tpe.sum(0)])
  return record


def peak_flops(train: TrainConfig, num_devices: int) -> float | None:
  """The devices' bf16 dense peak, FLOP/s (train.peak_tflops per device, else by device kind;
  None for an unknown kind): the MFU denominator."""
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
