"""ScatterMoE (arXiv 2403.08245, Figures 3-5, and its Mixture-of-Attention) as jaxmoe measures it
on one GPU: every MoE impl's training and inference throughput and memory at three
configurations, and Mixture-of-Attention against standard attention of the same active size.

Part "layers" (Figures 3-5): the whole MoE layer (router, dispatch, SwiGLU experts, combine; bf16;
experiments.bench_layer_configs.jax_layer) for every impl asked for (grouped, scatter,
blocksparse, ragged_dot, capacity at --capacity-factor), plus the PyTorch layer on
`torch._grouped_mm` (bench_layer_configs.torch_layer) where torch imports with CUDA. Training is
forward+backward (jax.value_and_grad over parameters and input), inference the forward alone;
throughput is tokens/s of each. Memory: the bytes the backward keeps (VJP residuals less the
parameters and input), XLA's planned temporaries of the forward+backward and of the forward; for
torch, the peak bytes allocated above the inputs during each. Every layer routes with softmax
top-k renormalized (Mixtral's), float32 router logits, bf16 parameters and activations; the
experts are SwiGLU (three matrices of width n; the paper's benchmark experts are two-matrix GELU
MLPs). Configurations (T tokens, d, expert width n, E, k), all at T = 16384, the token count of
the granularity sweep in the authors' benchmark script (benchmark_moe.py, L = 2048 x 8):
  mixtral      16384, 4096, 14336,   8,  2   Mixtral-8x7B's layer
  olmoe        16384, 2048,  1024,  64,  8   OLMoE-1B-7B's layer
  finegrained  16384, 4096,   512, 128, 16   the finest point of that granularity sweep, which
               keeps the active width k n = 8192 at d 4096 and grows k with E = 8k (k = 1 ... 16):
               the most, smallest experts, where the copies of the routed tokens (k per token)
               and the padding per expert that the scatter kernels avoid weigh the most.
The claim: scatter beats block-sparse, and the grouped (sort + gathered copies) and padded
(capacity) layers, in training and inference throughput and in memory. The JSON has each
config's ratios of every impl against scatter ("scatter_vs").

Part "moa-cost": Mixture-of-Attention (jaxmoe.moa.MoA, impls scatter, grouped, ragged_dot) against
standard attention of the same active size (experiments.moa_lm: "mha", k h heads of head_dim each
with its own keys and values; "gqa", k h query heads sharing h key/value heads, MoA's active
projections without a router), all through MoA's attention core: forward and forward+backward ms,
residual and temporary bytes at batch 8 x 2048 tokens, d 1024, E 16, top-4, 4 heads of 64 per
expert (16 active heads of 64: a standard d-1024 attention's).
Part "moa-train": the compact LM (experiments.moa_lm; 4 layers, d 512, SwiGLU d_ff 1536, MoA E 16,
top-4, 2 heads of 64 per expert against mha/gqa with 8 active heads of 64) trained with the same
data, batches, steps, seed and AdamW schedule per attention: training loss per 10 steps,
validation loss every --eval-every steps, the final validation loss, step time. Data:
--data/--tokenizer/--vocab-size as `jaxmoe train` (jaxmoe.corpus.load; default the embedded
"python" corpus, its first --corpus-bytes, under a BPE of --vocab-size trained on its training
share); the last 5% of tokens are validation. The claim checked: MoA matches or beats standard
attention of the same active size.

Writes OUT/<device>/<date>-scattermoe.json (run record, settings and every number) and beside it
-scattermoe-throughput.png, -scattermoe-memory.png and -scattermoe-moa.png. A call of some
--parts (or --configs) adds what it measures to the day's JSON found at that path: the parts and
configurations it does not run stay, each with its own run record, and the figures show all.

GPU (one H200; default OUT experiments/results), as two calls meant each to fit a 10-minute limit:
  python -m experiments.reproduce_scattermoe --parts layers [--out DIR]
  python -m experiments.reproduce_scattermoe --parts moa-cost,moa-train [--out DIR]
(all parts in one call is the default). A configuration cut short by a time limit is rerun alone
with --configs NAME: the JSON is written after every configuration.
CPU check of the whole pipeline (CI runs it; tiny shapes, the platform's default backends: XLA
on the CPU, where the kernels' interpreters have tests of their own):
  python -m experiments.reproduce_scattermoe --quick --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import bench_common as bc
from experiments import moa_lm
from experiments.bench_layer_configs import jax_layer, torch_available, torch_layer
from jaxmoe.config import DROPLESS_IMPLS, IMPLS

PARTS = ("layers", "moa-cost", "moa-train")
# name: (T, d, n, E, k), see the module docstring.
CONFIGS = {
    "mixtral": (16384, 4096, 14336, 8, 2),
    "olmoe": (16384, 2048, 1024, 64, 8),
    "finegrained": (16384, 4096, 512, 128, 16),
}
TITLES = {"mixtral": "Mixtral-like", "olmoe": "OLMoE-like", "finegrained": "fine-grained"}
QUICK_CONFIGS = {"finegrained": (64, 32, 32, 16, 8)}   # its capacity layer drops some tokens
LAYER_IMPLS = ("grouped", "scatter", "blocksparse", "ragged_dot", "capacity")   # jaxmoe's IMPLS
TORCH = "torch._grouped_mm"

COST_VARIANTS = ("moa-scatter", "moa-grouped", "moa-ragged_dot", "mha", "gqa")
MOA_COST = dict(batch=8, seq_len=2048, d_model=1024, num_experts=16, top_k=4, heads=4,
                head_dim=64)
QUICK_MOA_COST = dict(batch=2, seq_len=16, d_model=32, num_experts=4, top_k=2, heads=2,
                      head_dim=16)
MOA_LM = dict(n_layers=4, d_ff=1536, seq_len=512, d_model=512, num_experts=16, top_k=4, heads=2,
              head_dim=64)
QUICK_MOA_LM = dict(n_layers=2, d_ff=64, seq_len=32, d_model=32, num_experts=4, top_k=2, heads=2,
                    head_dim=16)
QUICK_TRAIN = dict(steps=16, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=8,
                   eval_batches=2, log_every=4)


# ---------------------------------------------------------------- part "layers"

def scatter_vs(rows: list[dict]) -> dict:
  """Every other row against scatter's: its time over scatter's (> 1: scatter is faster) for
  training and inference, and scatter's bytes over its (< 1: scatter keeps less)."""
  by = {r["impl"]: r for r in rows if "error" not in r}
  s = by.get("scatter")
  if s is None:
    return {}
  out = {}
  ratio = lambda a, b: None if a is None or not b else a / b
  for impl, r in by.items():
    if impl == "scatter":
      continue
    out[impl] = {"training_time_over_scatter": ratio(r["fwdbwd_ms"], s["fwdbwd_ms"]),
                 "inference_time_over_scatter": ratio(r["fwd_ms"], s["fwd_ms"])}
    if impl != TORCH:
      for key in ("residual_bytes", "temp_bytes", "fwd_temp_bytes"):
        out[impl][f"scatter_{key}_over_this"] = ratio(s.get(key), r.get(key))
  return out


def run_layers(table: dict, names, impls, settings: dict, use_torch: bool, env: dict,
               results: dict, save) -> dict:
  """Every impl (and torch) at each named configuration of table, into results (a config run
  again replaces its entry; the others stay); save(results) after each configuration. settings:
  tokens (None: the table's T), capacity_factor, iters. Every part runs the platform's default
  backends: the Pallas kernels on the GPU, XLA on the CPU."""
  iters, capacity_factor = settings["iters"], settings["capacity_factor"]
  for name in names:
    shape = table[name]
    if settings["tokens"]:
      shape = (settings["tokens"],) + tuple(shape[1:])
    print(f"== {name} (T, d, n, E, k) = {shape}", flush=True)
    rows, ref = [], None
    for impl in impls:
      overrides = {"capacity_factor": capacity_factor} if impl == "capacity" else None
      try:
        row, y = jax_layer(shape, impl, None, iters, overrides=overrides)
        if impl in DROPLESS_IMPLS:   # the same parameters and routing: the same function
          if ref is None:
            ref, row["reference_for_rel_err"] = y, True
          else:
            row["rel_err_vs_first_dropless"] = bc.rel_err(y, ref)
        del y
      except Exception as err:   # one impl failing (e.g. out of memory) leaves the others
        traceback.print_exc()
        row = {"impl": impl, "error": f"{type(err).__name__}: {err}"[:400]}
      rows.append(_throughput(row, shape[0]))
      print(f"   {rows[-1]}", flush=True)
    ref = None
    if use_torch:
      try:
        row = torch_layer(shape, iters)
      except Exception as err:
        traceback.print_exc()
        row = {"impl": TORCH, "error": f"{type(err).__name__}: {err}"[:400]}
      rows.append(_throughput(row, shape[0]))
      print(f"   {rows[-1]}", flush=True)
    results[name] = {"env": env, "settings": {**settings, "torch_reference": use_torch},
                     "shape": dict(zip("T d n E k".split(), shape)), "rows": rows,
                     "scatter_vs": scatter_vs(rows)}
    save(results)   # after every configuration: a run cut short keeps what it measured
  return results


def _throughput(row: dict, tokens: int) -> dict:
  if "error" not in row:
    row["training_tokens_per_s"] = tokens / (row["fwdbwd_ms"] * 1e-3)
    row["inference_tokens_per_s"] = tokens / (row["fwd_ms"] * 1e-3)
  return row


# ---------------------------------------------------------------- part "moa-cost"

def attention_cost(spec: dict, variant: str, iters: int) -> dict:
  """Forward / forward+backward time and memory of one attention variant at spec's shape."""
  kind, impl = ("moa", variant.split("-", 1)[1]) if variant.startswith("moa-") else (variant,
                                                                                    "scatter")
  cfg = moa_lm.AttentionConfig(d_model=spec["d_model"], num_experts=spec["num_experts"],
                               top_k=spec["top_k"], heads=spec["heads"],
                               head_dim=spec["head_dim"], moa_impl=impl)
  layer = moa_lm.make_attention(cfg, kind, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                param_dtype=jnp.bfloat16)
  graphdef, state = nnx.split(layer)
  shape = (spec["batch"], spec["seq_len"], spec["d_model"])
  x = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(jnp.bfloat16)
  g = jax.random.normal(jax.random.key(2), shape, jnp.float32).astype(jnp.bfloat16)

  def forward(s, x):
    return moa_lm.attention_output(nnx.merge(graphdef, s), x)[0]

  def loss(s, x):
    y, aux = moa_lm.attention_output(nnx.merge(graphdef, s), x)
    return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32)) + aux

  row, _, _, _ = bc.layer_costs(forward, loss, state, x, iters)
  tokens = spec["batch"] * spec["seq_len"]
  return {"variant": variant, **row, "params": sum(int(v.size) for v in jax.tree.leaves(state)),
          "active_params_per_token": moa_lm.active_attention_params(cfg, kind),
          "training_tokens_per_s": tokens / (row["fwdbwd_ms"] * 1e-3),
          "inference_tokens_per_s": tokens / (row["fwd_ms"] * 1e-3)}


def run_moa_cost(spec: dict, variants, iters) -> dict:
  rows = []
  for v in variants:
    try:
      rows.append(attention_cost(spec, v, iters))
    except Exception as err:
      traceback.print_exc()
      rows.append({"variant": v, "error": f"{type(err).__name__}: {err}"[:400]})
    print(f"   {rows[-1]}", flush=True)
  return {"spec": spec, "rows": rows}


# ---------------------------------------------------------------- part "moa-train"

def run_moa_train(lm_spec: dict, settings: moa_lm.TrainSettings, data_args: dict,
                  attentions) -> dict:
  from jaxmoe import corpus
  from jaxmoe import data as data_lib

  c = corpus.load(data_args["data"], data_args["tokenizer"], vocab_size=data_args["vocab_size"],
                  corpus_bytes=data_args["corpus_bytes"])
  data_lib.check_vocab(c.tokens, data_args["vocab_size"])
  train_tokens, val_tokens = data_lib.split(np.asarray(c.tokens), 0.05)
  print(f"   data: {c.source}, {c.tokens.size:,} tokens ({train_tokens.size:,} training, "
        f"{val_tokens.size:,} validation), tokenizer vocab {c.tokenizer.vocab_size}", flush=True)
  spec = dict(lm_spec)
  cfg = moa_lm.LMConfig(
      vocab_size=data_args["vocab_size"], n_layers=spec.pop("n_layers"), d_ff=spec.pop("d_ff"),
      seq_len=spec.pop("seq_len"), attention=moa_lm.AttentionConfig(**spec))
  runs = {}
  for kind in attentions:
    runs[kind] = moa_lm.train(cfg, kind, train_tokens, val_tokens, settings)
    print(f"   {kind}: final validation loss {runs[kind]['final_val_loss']:.4f}, "
          f"{runs[kind]['median_step_ms']} ms/step", flush=True)
  base = runs.get("moa")
  for r in runs.values():
    r["moa_final_val_loss_minus_this"] = (None if base is None
                                          else base["final_val_loss"] - r["final_val_loss"])
  return {"model": {**lm_spec, "vocab_size": data_args["vocab_size"]},
          "settings": dataclasses.asdict(settings), "data": {**data_args, "source": c.source,
                                                  "tokens": int(c.tokens.size),
                                                  "train_tokens": int(train_tokens.size),
                                                  "val_tokens": int(val_tokens.size)},
          "runs": runs}


# ---------------------------------------------------------------- figures

def _footer(env: dict) -> str:
  return f"{env['device']}, JAX {env['jax']}, {env['date'][:10]}"


# One color per impl in every panel.
COLORS = {impl: f"C{i}" for i, impl in enumerate(LAYER_IMPLS + (TORCH,))}


def _tick(row: dict, capacity_factor: float) -> str:
  """An impl's axis label; a failed one keeps its place with a zero bar and says so."""
  name = f"capacity {capacity_factor:g}" if row["impl"] == "capacity" else row["impl"]
  return name + ("\n(failed)" if "error" in row else "")


def plot_layers(part: dict, throughput_path: str, memory_path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  results, env = part["results"], part["env"]
  names = list(results)
  fig, axes = plt.subplots(2, len(names), figsize=(max(5.2 * len(names), 6.5), 8),
                           squeeze=False)
  for col, name in enumerate(names):
    rows = results[name]["rows"]
    xs = np.arange(len(rows))
    shape = results[name]["shape"]
    for ax, key, what in ((axes[0, col], "training_tokens_per_s", "training (forward+backward)"),
                          (axes[1, col], "inference_tokens_per_s", "inference (forward)")):
      ax.bar(xs, [r.get(key, 0) / 1e6 for r in rows],
             color=[COLORS.get(r["impl"], "grey") for r in rows],
             hatch=[("//" if r["impl"] == TORCH else "") for r in rows])
      ax.set_xticks(xs, [_tick(r, results[name]["settings"]["capacity_factor"]) for r in rows],
                    rotation=30, ha="right")
      ax.set_ylabel(f"{what}\nthroughput (M tokens/s)")
      ax.set_title(f"{TITLES.get(name, name)}: T {shape['T']}, d {shape['d']}, n {shape['n']}, "
                   f"E {shape['E']}, k {shape['k']}", fontsize=9)
      ax.grid(axis="y", alpha=0.3)
  torch_note = f"; hatched: the PyTorch {TORCH} layer" if any(
      r["impl"] == TORCH for res in results.values() for r in res["rows"]) else ""
  fig.suptitle(f"MoE layer throughput per impl, higher is better\n({_footer(env)}{torch_note})",
               fontsize=11)
  fig.tight_layout()
  fig.savefig(throughput_path, dpi=110)
  plt.close(fig)

  has_torch = any(r["impl"] == TORCH for res in results.values() for r in res["rows"])
  note = (lambda text: f" ({TORCH}: {text})") if has_torch else (lambda text: "")
  metrics = (("residual_bytes", None, "backward residuals" + note("not measured")),
             ("temp_bytes", "peak_bytes_above_inputs",
              "forward+backward, XLA temporaries" + note("peak above inputs")),
             ("fwd_temp_bytes", "fwd_peak_bytes_above_inputs",
              "forward, XLA temporaries" + note("peak above inputs")))
  fig, axes = plt.subplots(1, len(names), figsize=(max(5.2 * len(names), 6.5), 4.6),
                           squeeze=False)
  for ax, name in zip(axes[0], names):
    rows = results[name]["rows"]
    xs = np.arange(len(rows))
    for i, (jax_key, torch_key, label) in enumerate(metrics):
      keys = [torch_key if r["impl"] == TORCH else jax_key for r in rows]
      vals = [(r.get(k) or 0) if k else 0 for r, k in zip(rows, keys)]
      ax.bar(xs + (i - 1) * 0.27, [v / 2 ** 30 for v in vals], 0.27, label=label)
    ax.set_xticks(xs, [_tick(r, results[name]["settings"]["capacity_factor"]) for r in rows],
                  rotation=30, ha="right")
    ax.set_ylabel("GiB")
    ax.set_title(TITLES.get(name, name), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.4)   # room for the legend above the bars
  axes[0, 0].legend(loc="upper left", fontsize=7)
  fig.suptitle(f"MoE layer memory per impl, lower is better\n({_footer(env)})", fontsize=11)
  fig.tight_layout()
  fig.savefig(memory_path, dpi=110)
  plt.close(fig)


def plot_moa(cost: dict | None, train: dict | None, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
  (a_ms, a_mem), (a_val, a_train) = axes
  if cost:
    rows = cost["rows"]
    xs = np.arange(len(rows))
    get = lambda key, scale=1.0: [(r.get(key) or 0) * scale for r in rows]
    a_ms.bar(xs - 0.2, get("fwd_ms"), 0.4, label="forward")
    a_ms.bar(xs + 0.2, get("fwdbwd_ms"), 0.4, label="forward+backward")
    a_mem.bar(xs - 0.2, get("residual_bytes", 2.0 ** -30), 0.4, label="backward residuals")
    a_mem.bar(xs + 0.2, get("temp_bytes", 2.0 ** -30), 0.4,
              label="forward+backward XLA temporaries")
    s = cost["spec"]
    shape = (f"B {s['batch']} x S {s['seq_len']}, d {s['d_model']}, MoA E {s['num_experts']} "
             f"top-{s['top_k']} x {s['heads']} heads of {s['head_dim']}")
    for ax, unit in ((a_ms, "time (ms)"), (a_mem, "GiB")):
      ax.set_xticks(xs, [r["variant"] + ("\n(failed)" if "error" in r else "") for r in rows],
                    rotation=20, ha="right")
      ax.set_ylabel(unit)
      ax.legend(fontsize=8)
      ax.grid(axis="y", alpha=0.3)
    a_ms.set_title(f"attention layer time, {shape}", fontsize=9)
    a_mem.set_title("attention layer memory", fontsize=9)
  else:
    for ax in (a_ms, a_mem):
      ax.set_visible(False)
  if train:
    for kind, r in train["runs"].items():
      a_val.plot([c["step"] for c in r["val_curve"]], [c["val_loss"] for c in r["val_curve"]],
                 marker=".", label=f"{kind} (final {r['final_val_loss']:.3f})")
      a_train.plot([c["step"] for c in r["train_curve"]],
                   [c["train_loss"] for c in r["train_curve"]], label=kind)
    m = train["model"]
    lm = (f"{m['n_layers']} layers, d {m['d_model']}, {m['top_k'] * m['heads']} active heads of "
          f"{m['head_dim']}, vocab {m['vocab_size']}")
    a_val.set(xlabel="training step", ylabel="validation loss (nats/token)",
              title=f"validation loss ({lm})")
    a_train.set(xlabel="training step", ylabel="training loss (nats/token, per logging interval)",
                title="training loss")
    a_val.title.set_fontsize(9)
    a_train.title.set_fontsize(9)
    for ax in (a_val, a_train):
      ax.legend(fontsize=8)
      ax.grid(alpha=0.3)
  else:
    for ax in (a_val, a_train):
      ax.set_visible(False)
  env = (cost or train)["env"]
  fig.suptitle(f"Mixture-of-Attention against standard attention of the same active size\n"
               f"({_footer(env)})", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------- command line

def _csv(ap, flag: str, value: str, allowed) -> list[str]:
  items = [v for v in value.split(",") if v]
  bad = [v for v in items if v not in allowed]
  if bad or not items:
    ap.error(f"{flag}: {','.join(bad) or repr(value)} not allowed; choose from {', '.join(allowed)}")
  return items


def parse_args(argv=None) -> argparse.Namespace:
  doc = __doc__
  ap = argparse.ArgumentParser(
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description=doc[:doc.index("\n\nPart ")],
      epilog=doc[doc.index("Writes OUT/"):] + "\nThe module docstring says what each part "
      "measures: python -c 'import experiments.reproduce_scattermoe as m; print(m.__doc__)'")
  ap.add_argument("--out", default=bc.RESULTS_DIR,
                  help="results folder: writes OUT/<device>/<date>-scattermoe.json and .png files "
                       "(default experiments/results)")
  ap.add_argument("--quick", action="store_true",
                  help="tiny shapes, the default backends (XLA on CPU), a few training steps (CI)")
  ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated of {PARTS}")
  ap.add_argument("--configs", default=None, help=f"layers: comma-separated of {tuple(CONFIGS)}")
  ap.add_argument("--impls", default=",".join(LAYER_IMPLS), help=f"layers: of {IMPLS}")
  ap.add_argument("--tokens", type=int, default=None,
                  help="layers: T for every configuration (default 16384)")
  ap.add_argument("--capacity-factor", type=float, default=1.25,
                  help="the capacity impl's capacity factor (default 1.25, MoEConfig's)")
  ap.add_argument("--no-torch", action="store_true", help="layers: skip the PyTorch reference")
  ap.add_argument("--iters", type=int, default=5, help="timing samples per measurement")
  ap.add_argument("--moa-variants", default=",".join(COST_VARIANTS),
                  help=f"moa-cost: of {COST_VARIANTS}")
  ap.add_argument("--attentions", default=",".join(moa_lm.ATTENTIONS),
                  help=f"moa-train: of {moa_lm.ATTENTIONS}")
  ap.add_argument("--steps", type=int, default=600, help="moa-train: steps per variant")
  ap.add_argument("--batch-size", type=int, default=32, help="moa-train: sequences per step")
  ap.add_argument("--lr", type=float, default=1e-3, help="moa-train: peak learning rate")
  ap.add_argument("--eval-every", type=int, default=50, help="moa-train: steps between evals")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--data", default="python", help="moa-train: as jaxmoe train --data")
  ap.add_argument("--tokenizer", default="bpe", help="moa-train: as jaxmoe train --tokenizer")
  ap.add_argument("--vocab-size", type=int, default=8192, help="moa-train: model vocabulary")
  ap.add_argument("--corpus-bytes", type=int, default=32 << 20,
                  help="moa-train: bytes of text read (default 32 MiB)")
  args = ap.parse_args(argv)
  args.parts = _csv(ap, "--parts", args.parts, PARTS)
  table = QUICK_CONFIGS if args.quick else CONFIGS
  args.configs = _csv(ap, "--configs", args.configs, tuple(table)) if args.configs else list(table)
  args.impls = _csv(ap, "--impls", args.impls, IMPLS)
  args.moa_variants = _csv(ap, "--moa-variants", args.moa_variants, COST_VARIANTS)
  args.attentions = _csv(ap, "--attentions", args.attentions, moa_lm.ATTENTIONS)
  for flag in ("iters", "steps", "batch_size", "eval_every", "corpus_bytes"):
    if getattr(args, flag) < 1:
      ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
  if args.tokens is not None and args.tokens < 1:
    ap.error(f"--tokens must be >= 1, got {args.tokens}")
  if args.vocab_size < 256:
    ap.error(f"--vocab-size must be >= 256 (the byte tokenizer's), got {args.vocab_size}")
  for flag in ("capacity_factor", "lr"):
    value = getattr(args, flag)
    if not (math.isfinite(value) and value > 0):
      ap.error(f"--{flag.replace('_', '-')} must be a finite number > 0, got {value}")
  if not args.quick and jax.devices()[0].platform != "gpu":
    ap.error(f"the measured run needs a GPU (found {jax.devices()[0].platform}); --quick checks "
             "the pipeline on CPU")
  return args


def main(argv=None) -> str:
  """Runs the parts asked for; returns the JSON's path."""
  args = parse_args(argv)
  env = bc.environment()
  path = bc.result_path(args.out, "scattermoe", env)
  payload = {"env": env, "parts": {}}
  if os.path.exists(path):   # another call's parts of the same day stay, each with its record
    with open(path) as f:
      payload["parts"] = json.load(f).get("parts", {})
  payload["quick"] = args.quick

  def save(part: str, content: dict) -> None:
    payload["parts"][part] = {"env": env, **content}
    bc.write_result(args.out, "scattermoe", payload)

  if "layers" in args.parts:
    use_torch = not args.no_torch and not args.quick and torch_available()
    settings = {"tokens": args.tokens, "capacity_factor": args.capacity_factor,
                "iters": args.iters}
    # Configurations measured by an earlier call stay (each with its own run record).
    earlier = dict(payload["parts"].get("layers", {}).get("results", {}))
    run_layers(QUICK_CONFIGS if args.quick else CONFIGS, args.configs, args.impls, settings,
               use_torch, env, earlier,
               lambda results: save("layers", {"results": results}))
  if "moa-cost" in args.parts:
    print("== Mixture-of-Attention cost", flush=True)
    spec = QUICK_MOA_COST if args.quick else MOA_COST
    save("moa-cost", run_moa_cost(spec, args.moa_variants, args.iters))
  if "moa-train" in args.parts:
    print("== Mixture-of-Attention training", flush=True)
    if args.quick:
      settings = moa_lm.TrainSettings(seed=args.seed, **QUICK_TRAIN)
      data_args = dict(data="builtin", tokenizer="byte", vocab_size=256, corpus_bytes=1 << 18)
    else:
      settings = moa_lm.TrainSettings(
          steps=args.steps, batch_size=args.batch_size, lr=args.lr,
          warmup_steps=max(1, args.steps // 10), eval_every=args.eval_every, eval_batches=8,
          log_every=10, seed=args.seed)
      data_args = dict(data=args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                       corpus_bytes=args.corpus_bytes)
    try:
      result = run_moa_train(QUICK_MOA_LM if args.quick else MOA_LM, settings, data_args,
                             args.attentions)
    except ValueError as err:   # the data or tokenizer named on the command line
      print(f"reproduce_scattermoe: error: {err}", file=sys.stderr)
      sys.exit(2)
    save("moa-train", result)

  parts = payload["parts"]
  base = path[:-len(".json")]
  if "layers" in parts:
    plot_layers(parts["layers"], base + "-throughput.png", base + "-memory.png")
  if "moa-cost" in parts or "moa-train" in parts:
    plot_moa(parts.get("moa-cost"), parts.get("moa-train"), base + "-moa.png")
  summary(parts)
  print(json.dumps({"json": path}))
  return path


def summary(parts: dict) -> None:
  if "layers" in parts:
    rows = [{"config": name, **{k: r.get(k) for k in (
        "impl", "fwdbwd_ms", "fwd_ms", "training_tokens_per_s", "inference_tokens_per_s")},
             "resid_GiB": (r.get("residual_bytes") or 0) / 2 ** 30,
             "temp_GiB": (r.get("temp_bytes") or r.get("peak_bytes_above_inputs") or 0) / 2 ** 30,
             "error": r.get("error", "")[:40]}
            for name, res in parts["layers"]["results"].items() for r in res["rows"]]
    print(bc.table(rows, list(rows[0])))
  if "moa-cost" in parts:
    print(bc.table(parts["moa-cost"]["rows"], ["variant", "fwd_ms", "fwdbwd_ms", "residual_bytes",
                                               "temp_bytes", "error"]))
  if "moa-train" in parts:
    print(bc.table([{"attention": k, **r} for k, r in parts["moa-train"]["runs"].items()],
                   ["attention", "final_val_loss", "moa_final_val_loss_minus_this",
                    "median_step_ms", "params", "active_attention_params_per_layer"]))


if __name__ == "__main__":
  main()
