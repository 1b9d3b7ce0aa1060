"""MegaBlocks (arXiv 2211.15841, Figures 7-8, Table 3): dropless MoE against token-dropping MoE
at capacity factors 1.0, 1.5 and 2.0 and against the dense base model, trained the same way.

Each variant is one `jaxmoe train` run (same tokenizer, data, batches, steps and seed; only the
feed-forward differs): "dmoe" (the preset), "capacity-1.0/1.5/2.0" (moe_impl capacity) and
"dense" (ffn dense). From their metrics this writes, beside the runs:
  megablocks.json  per variant: validation loss at each evaluation with the step and the training
                   seconds so far (compile and evaluation excluded), the median tokens/s, the
                   dropped fraction over training, the final validation loss, and the steps and
                   seconds each needs to reach the capacity-factor-1.0 model's final loss;
  megablocks.png   validation loss against steps and against seconds, and the dropped fraction.

GPU (the paper's XS size, 2000 steps of 32 x 1024 tokens):
  python -m experiments.reproduce_megablocks --out DIR --preset xs --steps 2000 \
      --data CORPUS.npy --tokenizer tokenizer.json [--variants dmoe,dense]
CPU check of the whole pipeline (CI runs it):  python -m experiments.reproduce_megablocks --quick --out DIR
A variant whose run folder already holds a finished run is read, not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from experiments import bench_common as bc
from jaxmoe.metrics import read_jsonl
from jaxmoe.presets import with_impl

VARIANTS = ("dmoe", "capacity-1.0", "capacity-1.5", "capacity-2.0", "dense")
# --quick: an XS-shaped model small enough for a CPU (byte tokens, the embedded corpus), one block:
# each block of the unrolled model adds to the compile of the train and eval steps, most of the
# quick run's time.
QUICK_MODEL = dict(vocab_size=256, d_model=64, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=128,
                   max_seq_len=64, num_experts=8, top_k=1, router="softmax_topk",
                   renormalize=False, activation="gelu_tanh", dtype="float32")
QUICK_TRAIN = dict(steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, eval_every=10,
                   eval_batches=2, ckpt_every=0, log_every=5, corpus_bytes=1 << 20)


def variant_model(name: str, model: dict) -> dict:
  """The model fields of variant `name` from the preset's (or the quick model's) `model`."""
  if name == "dmoe":
    return model
  if name == "dense":
    return {**model, "ffn": "dense", "remat_mlp": False, "recompute_activation": False}
  factor = float(name.split("-")[1])
  return {**with_impl(model, "capacity"), "capacity_factor": factor}


def train_variant(name: str, preset: str, out_dir: str, train_overrides: dict, quick: bool) -> str:
  from jaxmoe.config import ModelConfig, TrainConfig
  from jaxmoe.presets import get_preset
  from jaxmoe.train import run

  p = get_preset(preset)
  model = variant_model(name, QUICK_MODEL if quick else p["model"])
  train = {**(QUICK_TRAIN if quick else p["train"]), **train_overrides}
  run_dir = os.path.join(out_dir, name)
  print(f"== {name}: {run_dir}", flush=True)
  run(ModelConfig.from_dict(model), TrainConfig.from_dict(train), run_dir, progress=False)
  return run_dir


def summarize(run_dir: str) -> dict:
  records = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "step" in r]
  # The first logging interval holds the train step's compilation, and an interval that follows
  # an evaluation holds the evaluation (and, the first time, its compilation): those intervals
  # are counted at the median rate of the clean ones instead.
  clean = [i for i in range(1, len(records)) if records[i - 1].get("val_loss") is None]
  rates = [records[i]["tokens_per_s"] for i in clean] or [records[0]["tokens_per_s"]]
  median = statistics.median(rates)
  seconds, last_tokens, curve, dropped = 0.0, 0, [], []
  for i, r in enumerate(records):
    seconds += (r["tokens"] - last_tokens) / (r["tokens_per_s"] if i in clean else median)
    last_tokens = r["tokens"]
    if r.get("val_loss") is not None:
      curve.append({"step": r["step"], "seconds": seconds, "val_loss": r["val_loss"]})
    if r.get("dropped_fraction") is not None:
      dropped.append({"step": r["step"], "dropped_fraction": r["dropped_fraction"]})
  return {"curve": curve, "dropped": dropped, "median_tokens_per_s": median,
          "final_val_loss": curve[-1]["val_loss"] if curve else None,
          "train_seconds": seconds}


def time_to(curve: list[dict], target: float) -> dict | None:
  """The first evaluation at or below target, linearly interpolated from the one before it."""
  for prev, cur in zip([None] + curve[:-1], curve):
    if cur["val_loss"] <= target:
      if prev is None or prev["val_loss"] == cur["val_loss"]:
        return {"step": cur["step"], "seconds": cur["seconds"]}
      f = (prev["val_loss"] - target) / (prev["val_loss"] - cur["val_loss"])
      return {k: prev[k] + f * (cur[k] - prev[k]) for k in ("step", "seconds")}
  return None


def plot(results: dict, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for name, r in results.items():
    xs = [c["step"] for c in r["curve"]]
    axes[0].plot(xs, [c["val_loss"] for c in r["curve"]], marker=".", label=name)
    axes[1].plot([c["seconds"] for c in r["curve"]], [c["val_loss"] for c in r["curve"]],
                 marker=".", label=name)
    if r["dropped"]:
      axes[2].plot([d["step"] for d in r["dropped"]],
                   [100 * d["dropped_fraction"] for d in r["dropped"]], label=name)
  axes[0].set(xlabel="training step", ylabel="validation loss (nats/token)", title="loss vs steps")
  axes[1].set(xlabel="training time (s, compile and evaluation excluded)",
              ylabel="validation loss (nats/token)", title="loss vs wall-clock")
  axes[2].set(xlabel="training step", ylabel="tokens dropped (%)", title="dropped tokens")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True, help="folder for the runs and the results")
  ap.add_argument("--quick", action="store_true", help="a tiny model on CPU, 40 steps")
  ap.add_argument("--preset", default="xs", help="xs, small or medium (default xs)")
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--seq-len", type=int, default=1024)
  ap.add_argument("--warmup-steps", type=int, default=200)
  ap.add_argument("--eval-every", type=int, default=100)
  ap.add_argument("--data", default="python", help="as jaxmoe train --data")
  ap.add_argument("--tokenizer", default="bpe", help="as jaxmoe train --tokenizer")
  ap.add_argument("--no-train", action="store_true", help="only summarize existing runs")
  ap.add_argument("--runs-device", default=None,
                  help="with --no-train: the device the runs trained on (recorded in the JSON)")
  args = ap.parse_args()
  variants = args.variants.split(",")
  for v in variants:
    if v not in VARIANTS:
      ap.error(f"unknown variant {v!r}; one of {', '.join(VARIANTS)}")
  overrides = {} if args.quick else dict(
      steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
      warmup_steps=args.warmup_steps, eval_every=args.eval_every, ckpt_every=0, log_every=20,
      data=args.data, tokenizer=args.tokenizer, corpus_bytes=1 << 30, tensorboard=False)
  os.makedirs(args.out, exist_ok=True)
  results = {}
  for name in variants:
    run_dir = os.path.join(args.out, name)
    if not args.no_train:
      train_variant(name, args.preset, args.out, overrides, args.quick)
    results[name] = summarize(run_dir)
  ref = results.get("capacity-1.0")
  for r in results.values():
    r["to_reach_capacity_1.0_final_loss"] = \
        time_to(r["curve"], ref["final_val_loss"]) if ref and ref["final_val_loss"] else None
  env = bc.environment()
  if args.runs_device:   # summarized elsewhere than trained: the figure names the runs' device
    env = {**env, "summarized_on": env["device"], "device": args.runs_device}
  payload = {"environment": env, "preset": "quick" if args.quick else args.preset,
             "settings": overrides, "results": results}
  bc.write_json(args.out, "megablocks.json", payload)
  plot(results, os.path.join(args.out, "megablocks.png"),
       f"MegaBlocks reproduction: {payload['preset']} ({env['device']}, JAX {env['jax']}, "
       f"{env['date'][:10]})")
  rows = [{"variant": n, "final_val_loss": r["final_val_loss"],
           "tokens_per_s": r["median_tokens_per_s"],
           "steps_to_cf1": (r["to_reach_capacity_1.0_final_loss"] or {}).get("step"),
           "s_to_cf1": (r["to_reach_capacity_1.0_final_loss"] or {}).get("seconds")}
          for n, r in results.items()]
  print(bc.table(rows, list(rows[0])))
  print(json.dumps({"out": args.out}))


if __name__ == "__main__":
  main()
