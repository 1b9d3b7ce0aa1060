"""Where a training step's time goes: phase timings and a GPU kernel profile.

For one preset and each variant (as in bench_train.py: dmoe, capacity, dense, ...), in one run:
  1. times the jit-compiled forward (loss only), forward+backward (gradients, no optimizer) and the
     full train step (gradients + clip + AdamW), each the median of `--iters` blocked calls, so
     the optimizer's share is the difference of the last two (with `--grad-accum K` all three
     run the global batch as K microbatches, the train step's own scan, so the optimizer share is
     that of one update per K microbatches; `--adam-mu-dtype bfloat16`: bf16 first moment);
     `--no-phases` times the train step only (the other two are one compile each);
  2. traces `--trace-steps` full steps with jax.profiler and sums the GPU kernel time from the
     trace JSON the profiler writes (no TensorBoard needed): total busy time vs wall time (idle
     gaps = launch/host overhead), time per category (matmul, attention, Pallas kernels,
     elementwise fusions, copies, collectives) and the top kernels by time;
  3. writes profile_train.json to --out and prints the tables.

Run on the GPU:  python -m experiments.profile_train --out DIR --preset small --batch-size 8
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import os
import sys
import time

import jax
import numpy as np

from experiments import bench_common as bc
from experiments.bench_train import VARIANTS, add_config_args, resolve_configs, variant_config
from experiments.trace_summary import summarize_trace
from jaxmoe import data as data_lib
from jaxmoe.config import ModelConfig, TrainConfig
from jaxmoe.model import flops_per_token
from jaxmoe.train import build_program, train_mesh


def profile_variant(name: str, model_cfg: ModelConfig, train_cfg: TrainConfig, tokens: np.ndarray,
                    iters: int, trace_steps: int, out_dir: str, top: int,
                    phases: bool = True, dump_hlo: bool = False) -> dict:
  mesh = train_mesh(model_cfg, train_cfg)
  program = build_program(model_cfg, train_cfg, mesh)
  bs = program.batch_sharding
  state = program.init_state()
  jit_train, jit_eval = program.train_step, program.eval_step
  state_sh = program.state_shardings
  # The train step's own gradient function: with grad_accum > 1 the same microbatch scan.
  grad_fn = program.grad_fn
  jit_grad = jax.jit(lambda s, x, y: grad_fn(s["params"], s["rest"], x, y)[0],
                     in_shardings=(state_sh, bs, bs), out_shardings=state_sh["params"])
  batches = data_lib.Batches(tokens, train_cfg.batch_size, train_cfg.seq_len, seed=0)
  x, y = (jax.device_put(a, bs) for a in batches.batch(0))
  res = {"variant": name, "fwd_ms": None, "fwdbwd_ms": None, "optimizer_ms": None,
         "fwdbwd_tflops": None}
  start = time.perf_counter()

  def progress(what: str) -> None:
    # A killed run keeps these lines (a Small dMoE step takes over a minute to compile on the H100).
    print(f"   {name}: {what} ({time.perf_counter() - start:.0f} s)", flush=True)

  progress("state initialized")
  if phases:
    # Each phase is one more compile. Gradients next to the whole state (not donated) need ~one
    # more copy of the parameters: where that does not fit, report the step only.
    res["fwd_ms"] = bc.time_jax(jit_eval, state, x, y, warmup=2, iters=iters)
    progress(f"forward {res['fwd_ms']:.1f} ms")
    try:
      res["fwdbwd_ms"] = bc.time_jax(jit_grad, state, x, y, warmup=2, iters=iters)
      progress(f"forward+backward {res['fwdbwd_ms']:.1f} ms")
    except jax.errors.JaxRuntimeError as e:
      print(f"   {name}: fwd+bwd phase not timed ({str(e)[:120]})")
  del jit_grad

  # One compile serves the timed loop, the trace and the HLO dump.
  compiled = jit_train.lower(state, x, y).compile()
  progress("train step compiled")
  if dump_hlo:
    # The optimized HLO of the train step: the profile's fusion names (loop_convert_fusion_11...)
    # are its instruction names, so grep this file for what a hot fusion computes.
    path = os.path.join(out_dir, f"hlo_{name}.txt.gz")
    with gzip.open(path, "wt") as f:
      f.write(compiled.as_text())
    res["hlo"] = path

  # The full step donates its state: run it as a loop, not through time_jax.
  times = []
  for i in range(2 + iters):
    t0 = time.perf_counter()
    state, m = compiled(state, x, y)
    jax.block_until_ready(m["loss"])
    if i >= 2:
      times.append((time.perf_counter() - t0) * 1e3)
  res["step_ms"] = float(np.median(times))
  progress(f"step {res['step_ms']:.1f} ms")
  tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
  fpt = flops_per_token(model_cfg, train_cfg.seq_len)
  res["step_tflops"] = fpt * tokens_per_step / (res["step_ms"] * 1e-3) / 1e12
  if res["fwdbwd_ms"] is not None:
    res["optimizer_ms"] = res["step_ms"] - res["fwdbwd_ms"]
    res["fwdbwd_tflops"] = fpt * tokens_per_step / (res["fwdbwd_ms"] * 1e-3) / 1e12

  trace_dir = os.path.join(out_dir, f"trace_{name}")
  with jax.profiler.trace(trace_dir):
    for _ in range(trace_steps):
      state, m = compiled(state, x, y)
    jax.block_until_ready(m["loss"])
  progress("traced")
  res["profile"] = summarize_trace(trace_dir, top)
  res["profile"]["steps"] = trace_steps
  return res


def main() -> int:
  ap = argparse.ArgumentParser(allow_abbrev=False)
  ap.add_argument("--out", required=True)
  ap.add_argument("--variants", default="dense,dmoe")
  add_config_args(ap)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--trace-steps", type=int, default=3)
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--no-phases", action="store_true",
                  help="skip the separate forward and fwd+bwd timings (two more compiles; the "
                       "second needs memory for a second gradient)")
  ap.add_argument("--dump-hlo", action="store_true",
                  help="write each variant's optimized train-step HLO to OUT/hlo_VARIANT.txt.gz")
  args = ap.parse_args()

  model_base, train_cfg = resolve_configs(args, steps=10, mesh_data=-1)
  tokens = data_lib.load_tokens(None, max_bytes=8 << 20)
  os.makedirs(args.out, exist_ok=True)

  results = {}
  for name in args.variants.split(","):
    model_cfg = variant_config(model_base, VARIANTS[name])
    try:
      r = profile_variant(name, model_cfg, train_cfg, tokens, args.iters, args.trace_steps,
                          args.out, args.top, phases=not args.no_phases,
                          dump_hlo=args.dump_hlo)
    except Exception as e:  # report and go on with the other variants
      import traceback
      traceback.print_exc()
      print(f"FAIL {name}: {type(e).__name__}: {str(e)[:300]}")
      continue
    results[name] = r
    p = r["profile"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    print(f"== {name}: fwd {fmt(r['fwd_ms'])} ms, fwd+bwd {fmt(r['fwdbwd_ms'])} ms, step "
          f"{r['step_ms']:.1f} ms (optimizer ~{fmt(r['optimizer_ms'])} ms), "
          f"{r['step_tflops']:.0f} TFLOP/s per step, {fmt(r['fwdbwd_tflops'])} fwd+bwd")
    if p.get("kernels"):
      steps = p["steps"]
      print(f"   GPU busy {p['busy_us'] / steps / 1e3:.1f} ms/step of span "
            f"{p['span_us'] / steps / 1e3:.1f} ms/step; {p['kernels'] // steps} kernels/step")
      for cat, us in p["per_category_us"].items():
        print(f"   {cat:<11} {us / steps / 1e3:8.2f} ms/step")
      for row in p["top"]:
        print(f"   {row['us'] / steps / 1e3:8.3f} ms x{row['count'] // steps:<4} "
              f"[{row['category']}] {row['name']}")
  payload = {"env": bc.environment(), "preset": args.preset, "model_base": model_base.to_dict(),
             "train": dataclasses.asdict(train_cfg), "results": results}
  print("wrote", bc.write_json(args.out, "profile_train.json", payload))
  return 0 if results else 1


if __name__ == "__main__":
  sys.exit(main())
