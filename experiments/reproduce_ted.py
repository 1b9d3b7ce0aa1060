"""Tensor-expert-data parallelism (DeepSpeed-TED, arXiv 2303.06318): what its two optimizations
save, read from XLA's compiled programs on 8 fake CPU devices (no GPU needed, nothing timed).

For the (data, expert, tensor) layouts (1,8,1), (2,4,1), (1,4,2), (2,2,2):
  - the MoE layer's forward+backward, with duplicate token dropping on and off (it applies where
    tensor > 1): all-to-all and all-gather bytes per device from the compiled HLO
    (jaxmoe.parallel.collective_summary);
  - a training step of a small MoE transformer with the memory-lean optimizer step
    (jaxmoe.lean_optimizer.chunked) on and off: per-device argument and temporary bytes from
    XLA's memory analysis.
The paper's claims: duplicate token dropping cuts the all-to-all volume by the tensor degree
(section 4.1), and the tiled optimizer lowers the optimizer step's peak memory (section 4.3).

  python -m experiments.reproduce_ted --out DIR     (writes DIR/ted.json)
  python -m experiments.reproduce_ted --quick --out DIR   (smaller shapes, the two layouts with a
                                                          tensor axis, the training step at (2,2,2)
                                                          alone; the test suite runs it)
"""

from __future__ import annotations

import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import bench_common as bc  # noqa: E402
from experiments.bench_parallel import build_layer, build_train, compiled_info  # noqa: E402

LAYOUTS = ((1, 8, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2))
# --quick compiles the layer at the two layouts where duplicate token dropping applies (tensor > 1)
# and the training step at the one with all three axes: each training-step compile takes ~20 s
# on a 2-core CPU, and the test suite runs --quick.
QUICK_LAYER_LAYOUTS = ((1, 4, 2), (2, 2, 2))
QUICK_TRAIN_LAYOUTS = ((2, 2, 2),)
LAYER = {"tokens_per_device": 512, "d": 1024, "f": 2048, "E": 8, "k": 2}
QUICK_LAYER = {"tokens_per_device": 64, "d": 64, "f": 128, "E": 8, "k": 2}
TRAIN = {"model": dict(vocab_size=1024, d_model=256, n_layers=2, n_heads=4, n_kv_heads=4,
                       d_ff=512, expert_d_ff=512, num_experts=8, top_k=2, max_seq_len=128,
                       dtype="float32"), "seq_len": 128, "batch_per_shard": 4}
# One block in the quick training step: the optimizer's memory is read the same way, and each block
# of the unrolled model adds to the step's compile, most of the quick run's time.
QUICK_TRAIN = {"model": dict(vocab_size=256, d_model=64, n_layers=1, n_heads=2, n_kv_heads=2,
                             d_ff=128, expert_d_ff=128, num_experts=8, top_k=2, max_seq_len=32,
                             dtype="float32"), "seq_len": 32, "batch_per_shard": 2}


def _bytes(info: dict, op: str) -> int:
  return int(info["collectives"].get(op, {}).get("bytes", 0))


def layer_rows(shape: dict, layouts=LAYOUTS) -> list[dict]:
  rows = []
  for layout in layouts:
    for dtd in ((True, False) if layout[2] > 1 else (True,)):
      fb, state, x, g, *_ = build_layer(shape, layout, jnp.bfloat16, jnp.float32, None,
                                        dict(a2a="padded", duplicate_token_dropping=dtd))
      info = compiled_info(fb, state, x, g)
      rows.append({"layout": "x".join(map(str, layout)), "duplicate_token_dropping": dtd,
                   "all_to_all_bytes": _bytes(info, "all-to-all"),
                   "all_gather_bytes": _bytes(info, "all-gather"),
                   "collectives": info["collectives"]})
      print(rows[-1]["layout"], "dtd" if dtd else "no dtd", rows[-1]["all_to_all_bytes"],
            rows[-1]["all_gather_bytes"], flush=True)
  return rows


def train_rows(spec: dict, layouts=LAYOUTS) -> list[dict]:
  rows = []
  for layout in layouts:
    for lean in (False, True):
      jstep, state, x, y, _ = build_train(spec, layout, dict(a2a="padded"), lean)
      info = compiled_info(jstep, state, x, y)
      rows.append({"layout": "x".join(map(str, layout)), "lean_optimizer": lean,
                   "argument_bytes": info.get("arg_bytes"), "temp_bytes": info.get("temp_bytes"),
                   "output_bytes": info.get("out_bytes")})
      print(rows[-1], flush=True)
      del jstep, state
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--quick", action="store_true",
                  help="smaller shapes, the layouts with a tensor axis, the training step at "
                       "(2,2,2)")
  args = ap.parse_args()
  if jax.device_count() < 8:
    ap.error(f"needs 8 devices, got {jax.device_count()} (run it as a fresh process: it asks "
             "XLA for 8 CPU devices before JAX starts)")
  layer = QUICK_LAYER if args.quick else LAYER
  train = QUICK_TRAIN if args.quick else TRAIN
  payload = {"env": bc.environment(), "layer_shape": layer, "train_spec": train,
             "layer": layer_rows(layer, QUICK_LAYER_LAYOUTS if args.quick else LAYOUTS),
             "train": train_rows(train, QUICK_TRAIN_LAYOUTS if args.quick else LAYOUTS)}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "ted.json"), "w") as f:
    json.dump(payload, f, indent=1)
  print(bc.table([{k: v for k, v in r.items() if k != "collectives"} for r in payload["layer"]],
                 ["layout", "duplicate_token_dropping", "all_to_all_bytes", "all_gather_bytes"]))
  print(bc.table(payload["train"], ["layout", "lean_optimizer", "argument_bytes", "temp_bytes"]))


if __name__ == "__main__":
  sys.exit(main())
