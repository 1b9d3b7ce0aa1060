"""Text generation from a checkpoint: load the model from RUN/ckpt (or a ckpt/<step> folder), sample.

Decoding recomputes the full prefix each step (no KV cache): simple and exact, fine for short
samples. Text goes through the run's tokenizer (RUN/tokenizer.json: a trained BPE, or a converted
model's own), else bytes (jaxmoe.tokenizer.load_run_tokenizer).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.checkpointing import Checkpointer, CheckpointError
from jaxmoe.config import ModelConfig
from jaxmoe.model import TransformerLM


def _locate(path: str) -> tuple[str, int | None]:
  """(checkpoint manager dir, step or None) from a run dir, its ckpt/ dir, or a ckpt/<step> dir."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint path {path!r} does not exist")
  if os.path.isdir(os.path.join(path, "ckpt")):
    return os.path.join(path, "ckpt"), None
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit():
    return os.path.dirname(path), int(base)
  return path, None


def run_folder(path: str) -> str:
  """The run folder of a run, its ckpt/ folder or a ckpt/<step> folder (where tokenizer.json is)."""
  directory, _ = _locate(path)
  return os.path.dirname(directory) if os.path.basename(directory) == "ckpt" else directory


def load_model(path: str,
               log: Callable[[str], Any] | None = None) -> tuple[TransformerLM, dict]:
  """The model stored in checkpoint `path` (a ckpt/<step> folder, or the newest step of a run).

  From a run, a newest checkpoint that does not load is skipped for the newest one that does,
  named in a line to `log` (nothing is renamed: sampling changes no run); a step folder that does
  not load, or a run none of whose checkpoints loads, is a CheckpointError.
  """
  directory, step = _locate(path)
  ckpt = Checkpointer(directory, create=False)
  try:
    if step is not None:
      return _load_step(ckpt, directory, step)
    _, loaded = ckpt.restore_newest(lambda s: _load_step(ckpt, directory, s), set_aside=False,
                                    log=log or (lambda line: None))
    return loaded
  finally:
    ckpt.close()


def _load_step(ckpt: Checkpointer, directory: str, step: int) -> tuple[TransformerLM, dict]:
  step, meta = ckpt.read_meta(step)
  try:
    cfg = ModelConfig.from_saved(meta["model"])
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"checkpoint {directory}/{step} has no valid model config: {e}") from None
  model = nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          {"params": params, "rest": rest})
  # Restore only the model part of the train state (a partial restore by tree structure).
  state, meta = ckpt.restore_partial(abstract, step)
  return nnx.merge(graphdef, state["params"], state["rest"]), meta


def generate(model: TransformerLM, prompt: np.ndarray, num_tokens: int, *, temperature: float = 0.8,
             top_k: int = 0, seed: int = 0) -> np.ndarray:
  """prompt (P,) int tokens -> (P + num_tokens,) tokens; temperature 0 is greedy."""
  cfg = model.cfg
  graphdef, state = nnx.split(model)

  @jax.jit
  def next_logits(state, tokens, length):
    logits, _ = nnx.merge(graphdef, state)(tokens[None])
    return logits[0, length - 1].astype(jnp.float32)   # the model's logits are in its compute dtype

  window = cfg.max_seq_len
  tokens = [int(t) for t in prompt] or [10]  # an empty prompt starts at a newline
  key = jax.random.key(seed)
  for _ in range(num_tokens):
    ctx = tokens[-window:]
    buf = np.zeros((window,), np.int32)
    buf[:len(ctx)] = ctx   # fixed length: one compilation; causal mask ignores the padding after
    logits = next_logits(state, jnp.asarray(buf), len(ctx))
    if temperature <= 0:
      nxt = int(jnp.argmax(logits))
    else:
      logits = logits / temperature
      if top_k > 0:
        kth = jnp.sort(logits)[-top_k]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
      key, sub = jax.random.split(key)
      nxt = int(jax.random.categorical(sub, logits))
    tokens.append(nxt)
  return np.asarray(tokens, np.int32)
