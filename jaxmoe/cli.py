"""The `jaxmoe` command: train, sample, plot.

  jaxmoe train --preset tiny [--config FILE.json|.toml] [--out DIR] [--stop-at STEP]
               [--<model or train field> V ...]
  jaxmoe sample RUN_OR_CHECKPOINT --prompt "def " [--tokens 200] [--temperature 0.8]
  jaxmoe plot RUN [--out FILE.png]
  jaxmoe convert HF_FOLDER RUN | RUN HF_FOLDER [--arch mixtral|olmoe|qwen2_moe|qwen3_moe]

Every ModelConfig / TrainConfig field is a flag (`--d-model 256`, `--moe-impl capacity`,
`--ffn dense`, `--remat true`). Precedence: preset < config file < flags. `--stop-at STEP` ends a
run early (with a checkpoint) without changing its learning-rate schedule, which a resume keeps.

Exit status: 0 done; 2 a user mistake, in one error line (unknown preset or values, a config that
does not fit the mesh, missing/corrupt checkpoint, empty corpus, a resume asking for another model
or schedule, a run folder another process is training into: docs/bad-inputs.md lists them);
3 (DIVERGED) training reached a non-finite loss or gradient norm and stopped without saving that
state (the older checkpoints stay); 128 + signal a run stopped by SIGTERM/SIGINT, after saving its
checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tomllib
from typing import Any, Sequence

from jaxmoe.presets import PRESETS, get_preset

USER_ERROR = 2
DIVERGED = 3   # a non-finite loss or gradient norm stopped training (nothing of it saved)

DATA_HELP = """data (--data):
  (none) or builtin  the Python standard library's source found on this machine (byte-level)
  python             the standard library plus every installed package's Python source
                     (about 100 MB in the project's .venv), deduplicated, in a fixed order
  FILE or FOLDER     text: a file, or every non-hidden file under a folder in sorted order
  FILE.npy           a 1-D integer array of token ids (memory-mapped)
  FILE.bin           raw token ids of --data-dtype (default uint16), memory-mapped
Text is split into tokens by --tokenizer: byte (one token per byte, vocab 256), bpe (a byte-level
BPE of --vocab-size trained on the training share of the text, cached), or a tokenizer.json file.
The last --val-fraction of the token stream is validation."""


class UserError(Exception):
  """Reported as `jaxmoe: error: <message>` with exit status 2, without a traceback."""


def _bool(text: str) -> bool:
  low = text.lower()
  if low in ("1", "true", "yes", "on"):
    return True
  if low in ("0", "false", "no", "off"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(conv):
  def parse(text: str):
    return None if text.lower() in ("none", "null", "") else conv(text)
  parse.__name__ = conv.__name__
  return parse


_CONVERTERS = {"int": int, "float": float, "str": str, "bool": _bool,
               "int | None": _optional(int), "float | None": _optional(float),
               "str | None": _optional(str), "bool | None": _optional(_bool)}


def _add_fields(parser: argparse.ArgumentParser, cls, group_name: str) -> None:
  group = parser.add_argument_group(group_name)
  for f in dataclasses.fields(cls):
    conv = _CONVERTERS[str(f.type)]
    group.add_argument("--" + f.name.replace("_", "-"), dest=f"{group_name}.{f.name}", type=conv,
                       default=None, metavar=str(f.type).split(" ")[0].upper(),
                       help=f"(default from the preset; {f.name}={f.default!r} otherwise)")


def add_config_flags(parser: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
  """--preset, --config and one flag per ModelConfig / TrainConfig field: the `train` command's
  configuration flags, also taken by the training benchmarks (read them with resolve_configs)."""
  _add_preset_flags(parser, default_preset)
  _add_config_fields(parser)


def _add_preset_flags(parser: argparse.ArgumentParser, default_preset: str) -> None:
  # Checked in resolve_configs (one line naming the presets), not by argparse's choices=, whose
  # error repeats the whole usage first.
  parser.add_argument("--preset", default=default_preset, metavar="NAME",
                      help=f"one of: {', '.join(sorted(PRESETS))} (default {default_preset})")
  parser.add_argument("--config", help="JSON or TOML file with optional 'model' and 'train' tables")


def _add_config_fields(parser: argparse.ArgumentParser) -> None:
  from jaxmoe.config import ModelConfig, TrainConfig

  _add_fields(parser, ModelConfig, "model")
  _add_fields(parser, TrainConfig, "train")


def build_parser() -> argparse.ArgumentParser:
  # allow_abbrev=False: a misspelt flag is an error, never taken as another flag's prefix.
  parser = argparse.ArgumentParser(prog="jaxmoe", description="Train and use MoE language models.",
                                   allow_abbrev=False)
  sub = parser.add_subparsers(dest="command", required=True)
  tr = sub.add_parser("train", help="train (or resume) a model", allow_abbrev=False,
                      epilog=DATA_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_preset_flags(tr, "tiny")
  tr.add_argument("--out", help="run folder (default runs/<preset>); resumes if it has checkpoints")
  tr.add_argument("--no-progress", action="store_true", help="no progress bar")
  tr.add_argument("--stop-at", type=int, metavar="STEP",
                  help="stop at this step (saving a checkpoint) before --steps, keeping the "
                       "learning-rate schedule of --steps; a later run without it continues")
  _add_config_fields(tr)

  sp = sub.add_parser("sample", help="generate text from a checkpoint", allow_abbrev=False)
  sp.add_argument("checkpoint", help="a run folder, its ckpt/ folder, or ckpt/<step>")
  sp.add_argument("--prompt", default="")
  sp.add_argument("--tokens", type=int, default=200)
  sp.add_argument("--temperature", type=float, default=0.8, help="> 0, or 0 for greedy decoding")
  sp.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: all)")
  sp.add_argument("--seed", type=int, default=0)

  cp = sub.add_parser(
      "convert", allow_abbrev=False,
      help="a Hugging Face model folder -> a jaxmoe run, or a jaxmoe run -> a Hugging Face folder",
      description="SRC a Hugging Face folder (config.json + safetensors) of Mixtral, OLMoE, "
                  "Qwen2-MoE or Qwen3-MoE: writes the jaxmoe run OUT (for sample, and train "
                  "--init-from). SRC a jaxmoe run or checkpoint: writes the Hugging Face folder "
                  "OUT. OUT must not exist or be empty.")
  cp.add_argument("src")
  cp.add_argument("out")
  cp.add_argument("--arch", help="export: the architecture to write (default: the one the run "
                                 "was converted from)")
  cp.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                  help="import: the converted model's compute dtype (parameters stay float32)")

  pp = sub.add_parser("plot", help="draw a run's curves to PNG", allow_abbrev=False)
  pp.add_argument("run", help="run folder (holds metrics.jsonl)")
  pp.add_argument("--out", help="image path (default RUN/curves.png; .png is added to a name "
                                "without a suffix)")
  return parser


def _read_config_file(path: str) -> dict[str, Any]:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise UserError(f"cannot read config file {path!r}: {e.strerror}") from None
  try:
    cfg = tomllib.loads(raw.decode()) if path.endswith(".toml") else json.loads(raw)
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f"config file {path!r} is not valid {'TOML' if path.endswith('.toml') else 'JSON'}"
                    f": {e}") from None
  if not isinstance(cfg, dict) or set(cfg) - {"model", "train"} or \
      not all(isinstance(v, dict) for v in cfg.values()):
    raise UserError(f"config file {path!r} must hold only 'model' and 'train' tables, got "
                    f"{sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__}")
  from jaxmoe.config import ModelConfig, TrainConfig
  for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
    for name, value in cfg.get(section, {}).items():
      problem = _type_problem(cls, name, value)
      if problem:
        raise UserError(f"config file {path!r}: {section}.{name} {problem}")
  return cfg


def _type_problem(cls, name: str, value) -> str | None:
  """Why `value` does not fit field `name` of dataclass `cls` by its declared type, or None.
  (JSON and TOML values keep their types: "false" is a string, and a string is no bool.)"""
  fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
  if name not in fields:
    return None  # from_dict names unknown keys with the allowed ones
  kind = fields[name]
  optional = kind.endswith(" | None")
  base = kind.removesuffix(" | None")
  if value is None:
    return None if optional else f"must be {base}, got null"
  ok = {"bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str)}.get(base, True)
  if ok:
    return None
  want = {"bool": "true or false", "int": "an integer", "float": "a number",
          "str": "a string"}[base]
  return f"must be {want}{' or null' if optional else ''}, got {value!r}"


def resolve_configs(args: argparse.Namespace,
                    defaults: dict[str, dict[str, Any]] | None = None):
  """(ModelConfig, TrainConfig) from preset < defaults < config file < flags (add_config_flags);
  UserError on bad values. defaults: {"model": {...}, "train": {...}} field values a caller puts
  over the preset (a benchmark: its step count, no checkpoints)."""
  from jaxmoe.config import ModelConfig, TrainConfig

  if args.preset not in PRESETS:
    raise UserError(f"unknown preset {args.preset!r}; allowed: {', '.join(sorted(PRESETS))}")
  preset = get_preset(args.preset)
  for section, values in (defaults or {}).items():
    preset[section].update(values)
  if args.config:
    for section, values in _read_config_file(args.config).items():
      preset[section].update(values)
  for key, value in vars(args).items():
    if value is not None and "." in key:
      section, name = key.split(".", 1)
      preset[section][name] = value
  try:
    return ModelConfig.from_dict(preset["model"]), TrainConfig.from_dict(preset["train"])
  except (TypeError, ValueError) as e:
    raise UserError(str(e)) from None


def _train(args) -> int:
  from jaxmoe.train import run

  model_cfg, train_cfg = resolve_configs(args)
  if args.stop_at is not None and args.stop_at < 1:
    raise UserError(f"--stop-at must be a step >= 1, got {args.stop_at}")
  out = args.out or os.path.join("runs", args.preset)
  _check_platform(model_cfg, train_cfg)
  _check_run_folder(out)
  result = run(model_cfg, train_cfg, out, stop_at=args.stop_at, progress=not args.no_progress)
  out = os.path.abspath(out)
  print(f"run folder: {out}\n  metrics: {out}/metrics.jsonl (TensorBoard: {out}/tb)\n"
        f"  checkpoints: {out}/ckpt (step {result.step})\n"
        f"  curves: jaxmoe plot {out}\n  text: jaxmoe sample {out} --prompt 'def '")
  if result.last_metrics.get("val_loss") is not None:
    print(f"final loss {result.last_metrics['loss']:.4f}, val loss "
          f"{result.last_metrics['val_loss']:.4f}")
  return 128 + result.interrupted_by if result.interrupted_by else 0


# Settings that only a GPU runs: (section, field, value) -> what to use instead on another platform.
GPU_ONLY = {
    ("model", "backend", "mosaic"): "--backend xla (or leave it unset)",
    ("model", "backend", "triton"): "--backend xla (or leave it unset)",
    ("model", "backend", "pallas"): "--backend xla (or leave it unset)",
    ("model", "attention", "cudnn"): "--attention xla (or auto)",
    ("train", "ep_a2a", "ragged"): "--ep-a2a padded",
}


def _check_platform(model_cfg, train_cfg) -> None:
  """UserError, before anything is written, for a GPU-only setting on a machine without a GPU."""
  import jax

  platform = jax.default_backend()
  if platform == "gpu":
    return
  for (section, name, value), instead in GPU_ONLY.items():
    if getattr(model_cfg if section == "model" else train_cfg, name) == value:
      raise UserError(f"--{name.replace('_', '-')} {value} needs a GPU, and JAX runs on {platform} "
                      f"here; use {instead}")


def _check_run_folder(out: str) -> None:
  """UserError unless `out` is (or can become) a writable folder; creates nothing."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out {out!r} is a file, not a run folder")
  probe = os.path.abspath(out)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise UserError(f"--out {out!r}: {probe!r} is a file, so the run folder cannot be made there")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise UserError(f"--out {out!r}: {probe!r} is not writable")


def _sample(args) -> int:
  from jaxmoe.sample import generate, load_model, run_folder
  from jaxmoe.tokenizer import load_run_tokenizer

  if args.tokens < 0:
    raise UserError(f"--tokens must be >= 0, got {args.tokens}")
  if not args.temperature >= 0:
    raise UserError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
  if args.top_k < 0:
    raise UserError(f"--top-k must be >= 0 (0: no limit), got {args.top_k}")
  # A damaged newest checkpoint: the newest one that loads, said in one line (nothing renamed).
  model, _ = load_model(args.checkpoint, log=lambda line: print(f"jaxmoe: {line}",
                                                                file=sys.stderr))
  tokenizer = load_run_tokenizer(run_folder(args.checkpoint), model.cfg.vocab_size)
  prompt = tokenizer.encode(args.prompt)
  if prompt.size and prompt.max() >= model.cfg.vocab_size:
    raise UserError(f"the prompt's tokens exceed the model's vocab_size={model.cfg.vocab_size}")
  out = generate(model, prompt, args.tokens, temperature=args.temperature, top_k=args.top_k,
                 seed=args.seed)
  print(tokenizer.decode(out))
  return 0


def _convert(args) -> int:
  from jaxmoe.hf import export_hf, import_hf, is_hf_folder

  if not os.path.exists(args.src):
    raise UserError(f"{args.src!r} does not exist")
  if is_hf_folder(args.src):
    if args.arch:
      raise UserError("--arch is for export (a jaxmoe run to a Hugging Face folder); "
                      f"{args.src!r} is a Hugging Face folder")
    import_hf(args.src, args.out, dtype=args.dtype)
  else:
    export_hf(args.src, args.out, arch=args.arch)
  return 0


def _plot(args) -> int:
  from jaxmoe.plot import plot_run

  print(plot_run(args.run, args.out))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point; returns the exit status (argparse's own errors exit 2 directly)."""
  from jaxmoe.checkpointing import CheckpointError
  from jaxmoe.hf.architectures import ConvertError
  from jaxmoe.data import DataError
  from jaxmoe.plot import PlotError
  from jaxmoe.tokenizer import TokenizerError
  from jaxmoe.config import ConfigError
  from jaxmoe.train.finite import NonFiniteError
  from jaxmoe.train.lock import RunFolderLocked

  args = build_parser().parse_args(argv)
  # Let JAX use 92% of GPU memory instead of its default 75% (an explicit setting wins): large
  # presets need it. Read when the GPU client starts, which has not happened yet here.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  try:
    return {"train": _train, "sample": _sample, "plot": _plot,
            "convert": _convert}[args.command](args)
  except (UserError, ConfigError, DataError, CheckpointError, PlotError, TokenizerError,
          ConvertError, RunFolderLocked) as e:
    print(f"jaxmoe: error: {e}", file=sys.stderr)
    return USER_ERROR
  except NonFiniteError as e:
    print(f"jaxmoe: error: {e}", file=sys.stderr)
    return DIVERGED
  except OSError as e:  # a folder or file the user named that cannot be read or written
    where = f": {e.filename!r}" if e.filename else ""
    print(f"jaxmoe: error: {e.strerror or e}{where}", file=sys.stderr)
    return USER_ERROR
  except KeyboardInterrupt:
    print("jaxmoe: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
