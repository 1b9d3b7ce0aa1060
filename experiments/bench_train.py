"""End-to-end training benchmark: dMoE vs the capacity-factor baseline vs dense.

For one preset (default "small": MegaBlocks' 125M base, 64 experts, top-1), in ONE run, for each
variant (dmoe = impl "grouped" on our Pallas grouped matmul; ragged_dot; blocksparse; capacity =
the token-dropping GShard/Switch baseline at capacity_factor 1; dense = the base model):
  1. checks: the variant's loss at step 0 is finite and its loss falls over the timed steps; all
     dropless impls give the same initial loss (they compute the same function) within a bf16
     budget; the capacity baseline reports a dropped fraction in [0, 1];
  2. times the jit-compiled train step (AdamW, bf16 compute, float32 master weights) on the
     embedded corpus: warm-up steps first, then the median of `--steps` blocked steps; with
     `--grad-accum K` one step is K microbatches of batch_size/K plus one optimizer update
     (`--adam-mu-dtype bfloat16`: bf16 first Adam moment);
  3. reports tokens/s, MFU on the ACTIVE parameters (6 N_active + attention FLOPs per token;
     H100 bf16 dense peak 989 TFLOP/s per device), XLA's planned bytes and the device's peak bytes;
  4. writes JSON (device, JAX version, date, all numbers) to --out and prints a table last.

Run on the GPU:  python -m experiments.bench_train --out DIR [--preset small] [--steps 30]
CPU smoke test:  python -m experiments.bench_train --smoke --out /tmp/x   (tiny model; the
                 grouped variant runs the Pallas Triton kernel in interpret mode)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import traceback

# JAX preallocates 75% of GPU memory by default; the Small preset's training state (3.6B float32
# parameters, Adam moments, the gradient accumulator and the bf16 expert-weight copy) needs more
# on an 80 GB H100. Read when the GPU client starts (first device use), so setting it at import is
# in time (profile_train imports this module first too); an explicit setting wins. Not in
# bench_common: the kernel benchmarks run torch baselines in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import bench_common as bc  # noqa: E402
from jaxmoe import cli  # noqa: E402
from jaxmoe import data as data_lib  # noqa: E402
from jaxmoe.config import IMPLS, ModelConfig, TrainConfig  # noqa: E402
from jaxmoe.model import flops_per_token, param_counts  # noqa: E402
from jaxmoe.presets import with_impl  # noqa: E402
from jaxmoe.train import build_program, peak_flops, train_mesh  # noqa: E402

# variant -> ModelConfig overrides
VARIANTS = {
    "dmoe": {"ffn": "moe", "moe_impl": "grouped"},
    "ragged_dot": {"ffn": "moe", "moe_impl": "ragged_dot"},
    "blocksparse": {"ffn": "moe", "moe_impl": "blocksparse"},
    "capacity": {"ffn": "moe", "moe_impl": "capacity", "capacity_factor": 1.0},
    "dense": {"ffn": "dense"},
}


def variant_config(model_base, overrides: dict):
  """The base ModelConfig with a variant's overrides; a MoE impl other than the base's takes the
  preset's memory settings as jaxmoe.presets.with_impl gives them, a dense model recomputes nothing
  of the experts."""
  fields = model_base.to_dict()
  if overrides.get("ffn") == "dense":
    fields["recompute_activation"] = False
  elif "moe_impl" in overrides:
    fields = with_impl(fields, overrides["moe_impl"])
  return dataclasses.replace(model_base, **{**fields, **overrides})


def bench_variant(name: str, model_cfg: ModelConfig, train_cfg: TrainConfig, tokens: np.ndarray,
                  warmup: int) -> dict:
  mesh = train_mesh(model_cfg, train_cfg)
  program = build_program(model_cfg, train_cfg, mesh)
  bs = program.batch_sharding
  state = program.init_state()
  # No separate eval step: the first train step's loss is the loss at the initial parameters, and
  # compiling an eval step cost ~45 s of a Small dMoE benchmark's ~4 minutes on the H100.
  jit_train = program.train_step
  batches = data_lib.Batches(tokens, train_cfg.batch_size, train_cfg.seq_len, seed=0)
  x0, y0 = batches.batch(0)
  x0, y0 = jax.device_put(x0, bs), jax.device_put(y0, bs)
  print(f"   {name}: state initialized", flush=True)

  t0 = time.perf_counter()
  compiled = jit_train.lower(state, x0, y0).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  planned = None if mem is None else int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                          + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  print(f"   {name}: train step compiled in {compile_s:.0f} s, memory plan "
        f"{'-' if planned is None else f'{planned / 2**30:.1f} GiB'}; {warmup} + "
        f"{train_cfg.steps} steps", flush=True)
  times, losses, dropped = [], [], []
  for i in range(warmup + train_cfg.steps):
    x, y = batches.batch(i)
    x, y = jax.device_put(x, bs), jax.device_put(y, bs)
    t = time.perf_counter()
    state, m = compiled(state, x, y)
    jax.block_until_ready(m["loss"])
    if i >= warmup:
      times.append(time.perf_counter() - t)
    losses.append(float(m["loss"]))
    dropped.append(float(m["dropped_fraction"]))
  step_s = statistics.median(times)
  # The global batch: all grad_accum microbatches of the step.
  tokens_per_s = train_cfg.batch_size * train_cfg.seq_len / step_s
  fpt = flops_per_token(model_cfg, train_cfg.seq_len)
  counts = param_counts(model_cfg)
  peak = peak_flops(train_cfg, mesh.size)
  return {
      "variant": name, "impl": model_cfg.moe_impl if model_cfg.ffn == "moe" else "dense",
      "batch_size": train_cfg.batch_size, "grad_accum": train_cfg.grad_accum,
      "adam_mu_dtype": train_cfg.adam_mu_dtype, "remat": model_cfg.remat,
      "remat_skip": model_cfg.remat_skip, "remat_mlp": model_cfg.remat_mlp,
      "params_total": counts["total"], "params_active": counts["active"],
      "flops_per_token": fpt, "step_ms": step_s * 1e3, "tokens_per_s": tokens_per_s,
      "tflops": fpt * tokens_per_s / 1e12, "mfu": fpt * tokens_per_s / peak if peak else None,
      "compile_s": compile_s, "planned_bytes": planned, "peak_bytes": bc.peak_bytes(),
      "first_loss": losses[0], "last_loss": losses[-1],
      "losses": losses, "dropped_fraction": float(np.mean(dropped)),
  }


# What a benchmark changes in the preset before the flags apply: a short schedule with one warm-up
# step, no checkpoints, no TensorBoard.
BENCH_TRAIN = dict(warmup_steps=1, ckpt_every=0, tensorboard=False)


def add_config_args(ap: argparse.ArgumentParser) -> None:
  """The preset and every ModelConfig / TrainConfig field as a flag, exactly the `jaxmoe train`
  flags (jaxmoe.cli.add_config_flags: `--batch-size 64 --remat-mlp true --mesh-expert 8 ...`);
  shared with experiments/profile_train.py. --steps is the number of timed steps."""
  cli.add_config_flags(ap, default_preset="small")


def resolve_configs(args: argparse.Namespace, *, steps: int,
                    mesh_data: int) -> tuple[ModelConfig, TrainConfig]:
  """(ModelConfig, TrainConfig) as the CLI resolves them (preset < config file < flags), with
  BENCH_TRAIN, `steps` (unless --steps is given) and `mesh_data` (unless --mesh-data is given)
  put over the preset. Exits 2 with the CLI's one-line message on a bad value."""
  try:
    return cli.resolve_configs(
        args, defaults={"train": {**BENCH_TRAIN, "steps": steps, "mesh_data": mesh_data}})
  except cli.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(cli.USER_ERROR)


def main() -> int:
  ap = argparse.ArgumentParser(allow_abbrev=False)
  ap.add_argument("--out", required=True)
  ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, interpret backends")
  ap.add_argument("--variants", default="dmoe,ragged_dot,blocksparse,capacity,dense")
  ap.add_argument("--warmup", type=int, default=3, help="untimed steps before the --steps timed")
  add_config_args(ap)
  args = ap.parse_args()

  steps = vars(args)["train.steps"] or 30
  if args.smoke:
    args.preset = "test"
    vars(args)["train.steps"], args.warmup = min(steps, 3), 1
  on_gpu = jax.default_backend() == "gpu"
  model_base, train_cfg = resolve_configs(args, steps=30, mesh_data=-1 if on_gpu else 1)
  peak_tflops = peak_flops(train_cfg, 1)
  peak_tflops = None if peak_tflops is None else peak_tflops / 1e12
  tokens = data_lib.load_tokens(None, max_bytes=32 << 20 if not args.smoke else 1 << 20)

  rows, failures, results = [], 0, {}
  for name in args.variants.split(","):
    overrides = dict(VARIANTS[name])
    if overrides.get("moe_impl", "grouped") not in IMPLS:
      print(f"SKIP {name}: impl {overrides['moe_impl']} not in this jaxmoe ({IMPLS})")
      continue
    if args.smoke and name == "dmoe":
      overrides["backend"] = "triton_interpret"   # the Pallas kernel, interpreted on CPU
    if args.smoke and name == "blocksparse":
      overrides["block_size"] = 16                # the test preset's d_ff is 64
    try:
      model_cfg = variant_config(model_base, overrides)
      res = bench_variant(name, model_cfg, train_cfg, tokens, args.warmup)
    except Exception:  # report and go on with the other variants
      traceback.print_exc()
      print(f"FAIL {name}: raised")
      failures += 1
      continue
    results[name] = res
    finite = all(np.isfinite(res["losses"]))
    falls = res["last_loss"] < res["first_loss"]
    ok = finite and falls and 0.0 <= res["dropped_fraction"] <= 1.0
    if model_cfg.ffn == "moe" and model_cfg.is_moe_layer(0) and model_cfg.moe_impl != "capacity":
      ok = ok and res["dropped_fraction"] == 0.0
    print(f"{'PASS' if ok else 'FAIL'} {name}: finite={finite} loss {res['first_loss']:.3f} -> "
          f"{res['last_loss']:.3f} dropped={res['dropped_fraction']:.4f}")
    failures += not ok
    rows.append(res)

  # The dropless impls compute the same function: same initial loss up to bf16 rounding.
  dropless = [r for r in rows if r["impl"] in ("grouped", "ragged_dot", "blocksparse")]
  for r in dropless[1:]:
    err = abs(r["first_loss"] - dropless[0]["first_loss"]) / abs(dropless[0]["first_loss"])
    ok = err < 1e-2
    print(f"{'PASS' if ok else 'FAIL'} initial loss {r['variant']} vs {dropless[0]['variant']}: "
          f"rel err {err:.2e}")
    failures += not ok

  payload = {"env": bc.environment(), "preset": args.preset,
             "smoke": args.smoke, "peak_tflops_per_device": peak_tflops,
             "model_base": model_base.to_dict(), "train": dataclasses.asdict(train_cfg),
             "results": results, "failures": failures}
  path = bc.write_json(args.out, "bench_train.json", payload)
  print(f"wrote {path}")
  print(bc.table(rows, ["variant", "impl", "grad_accum", "remat", "params_active", "step_ms",
                        "tokens_per_s", "tflops", "mfu", "planned_bytes", "peak_bytes",
                        "dropped_fraction", "last_loss"]))
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
