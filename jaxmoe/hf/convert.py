"""`jaxmoe convert`: a Hugging Face model folder <-> a jaxmoe run folder.

  import: config.json + model.safetensors (or sharded: model.safetensors.index.json + shards)
          -> RUN/config.json, RUN/ckpt/0 (the parameters, float32), RUN/tokenizer.json (copied)
  export: a jaxmoe run (or checkpoint) -> config.json + model.safetensors (+ tokenizer.json)

The imported run is what `jaxmoe sample RUN` reads and `jaxmoe train --init-from RUN` starts from.
Tensors are read one at a time through `safetensors` (bf16 included) and kept as float32, jaxmoe's
parameter dtype: a model needs about twice its bf16 size in host memory to convert. A folder that
holds anything already is never written into.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np

from jaxmoe.hf import architectures as arch_lib
from jaxmoe.hf import weights as weights_lib
from jaxmoe.hf.architectures import ConvertError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def is_hf_folder(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and bool(_weight_files(path))


def _weight_files(path: str) -> dict[str, str]:
  """tensor name -> file, from the shard index or the files themselves ({} if none)."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
      raise ConvertError(f"cannot read {index}: {e}") from None
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  single = os.path.join(path, "model.safetensors")
  if not os.path.isfile(single):
    return {}
  from safetensors import safe_open
  with safe_open(single, framework="flax") as f:
    return {name: single for name in f.keys()}


class _Reader:
  """Tensors of a (possibly sharded) checkpoint, read on demand as float32 numpy arrays."""

  def __init__(self, files: dict[str, str]):
    self.files = files
    self.used: set[str] = set()
    self._open: dict[str, Any] = {}

  def has(self, name: str) -> bool:
    return name in self.files

  def get(self, name: str) -> np.ndarray:
    from safetensors import safe_open
    if name not in self.files:
      raise ConvertError(f"missing tensor {name!r}")
    path = self.files[name]
    if not os.path.isfile(path):
      raise ConvertError(f"missing shard {os.path.basename(path)!r} (holds {name!r})")
    if path not in self._open:
      self._open[path] = safe_open(path, framework="flax").__enter__()
    self.used.add(name)
    return np.asarray(self._open[path].get_tensor(name).astype(np.float32))

  def close(self) -> None:
    for f in self._open.values():
      f.__exit__(None, None, None)


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise ConvertError(f"cannot read {path}: {e.strerror}") from None
  except ValueError as e:
    raise ConvertError(f"{path} is not valid JSON: {e}") from None


def _fresh_folder(out: str) -> None:
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConvertError(f"{out!r} exists and is not an empty folder; jaxmoe convert writes only "
                       "into a new folder")
  os.makedirs(out, exist_ok=True)


def _flat(tree) -> dict[tuple, Any]:
  return {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_hf(folder: str, *, dtype: str = "float32", moe_impl: str = "grouped",
            block_size: int = 128):
  """(ModelConfig, arch, TransformerLM with the checkpoint's weights) from a Hugging Face folder."""
  from flax import nnx

  from jaxmoe.config import ModelConfig
  from jaxmoe.model import TransformerLM

  if not os.path.isdir(folder):
    raise ConvertError(f"{folder!r} is not a folder")
  hf = _read_json(os.path.join(folder, "config.json"))
  arch = arch_lib.detect(hf)
  try:
    cfg = ModelConfig.from_dict(arch_lib.model_config(arch, hf, dtype=dtype, moe_impl=moe_impl,
                                                      block_size=block_size))
  except ValueError as e:
    raise ConvertError(f"{folder}: {e}") from None
  files = _weight_files(folder)
  if not files:
    raise ConvertError(f"{folder} has no model.safetensors or model.safetensors.index.json")
  reader = _Reader(files)
  try:
    params = weights_lib.to_jaxmoe(arch, cfg, reader.get, reader.has)
  finally:
    reader.close()
  extra = weights_lib.unused(set(files), reader.used)
  if extra:
    raise ConvertError(f"{folder} holds tensors the {arch.hf_class} conversion does not read: "
                       f"{extra[:4]}{' ...' if len(extra) > 4 else ''}")
  model = nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  want = _flat(nnx.to_pure_dict(state))
  if set(want) != set(params):
    raise ConvertError(f"parameters do not match the model: missing {sorted(set(want) - set(params))[:3]}"
                       f", unexpected {sorted(set(params) - set(want))[:3]}")
  for path, leaf in want.items():
    if tuple(leaf.shape) != params[path].shape:
      raise ConvertError(f"tensor for {'.'.join(map(str, path))} has shape "
                         f"{params[path].shape}, the model needs {tuple(leaf.shape)}")
  pure = nnx.to_pure_dict(state)
  for path in want:
    node = pure
    for k in path[:-1]:
      node = node[k]
    node[path[-1]] = jax.numpy.asarray(params[path])
  nnx.replace_by_pure_dict(state, pure)
  rest = jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype), rest)
  return cfg, arch, nnx.merge(graphdef, state, rest)


def import_hf(folder: str, out: str, *, dtype: str = "bfloat16", log=print) -> str:
  """Writes the jaxmoe run folder `out` from Hugging Face folder `folder`; returns out."""
  from flax import nnx

  from jaxmoe.checkpointing import Checkpointer

  cfg, arch, model = load_hf(folder, dtype=dtype)
  _fresh_folder(out)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  source = {"format": "huggingface", "arch": arch.name, "hf_class": arch.hf_class,
            "folder": os.path.abspath(folder)}
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump({"model": cfg.to_dict(), "converted_from": source}, f, indent=1)
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(folder, name)):
      shutil.copyfile(os.path.join(folder, name), os.path.join(out, name))
  ckpt = Checkpointer(os.path.join(out, "ckpt"))
  try:
    ckpt.save(0, {"params": params, "rest": rest},
              {"step": 0, "model": cfg.to_dict(), "converted_from": source})
  finally:
    ckpt.close()
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  log(f"converted {arch.hf_class} ({n / 1e6:.1f}M parameters) from {folder} into {out}")
  return out


def export_hf(run: str, out: str, *, arch: str | None = None, log=print) -> str:
  """Writes Hugging Face folder `out` from jaxmoe run (or checkpoint) `run`; returns out."""
  from flax import nnx
  from safetensors.numpy import save_file

  from jaxmoe.sample import load_model, run_folder

  model, meta = load_model(run)
  name = arch or (meta.get("converted_from") or {}).get("arch")
  if name is None:
    raise ConvertError(f"{run} was not converted from a Hugging Face model: say which "
                       f"architecture to write with --arch ({', '.join(arch_lib.ARCHITECTURES)})")
  if name not in arch_lib.ARCHITECTURES:
    raise ConvertError(f"--arch {name!r} is unknown; one of {', '.join(arch_lib.ARCHITECTURES)}")
  a = arch_lib.ARCHITECTURES[name]
  cfg = model.cfg
  hf = arch_lib.hf_config(a, cfg)
  params = {k: np.asarray(v, np.float32) for k, v in
            _flat(nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])).items()}
  tensors = weights_lib.to_hf(a, cfg, params)
  _fresh_folder(out)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf, f, indent=1)
  run_dir = run_folder(run)
  for file in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(run_dir, file)):
      shutil.copyfile(os.path.join(run_dir, file), os.path.join(out, file))
  log(f"exported {a.hf_class} ({len(tensors)} tensors) from {run} into {out}")
  return out
