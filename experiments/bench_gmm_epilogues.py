"""The warp-specialized Mosaic grouped matmul with each epilogue (kernels.gmm.epilogue) against
the plain product and the separate XLA pass it replaces, at one expert shape.

In ONE run (default: the Small preset's up projection, 65536 rows x d 768 -> f 3072, 64 groups
of a uniform top-1 draw; tanh-GELU; bf16) it times, each a median of --iters samples:
  up:     the plain product; with the "activation" epilogue for ReLU (what writing the second
          output costs) and for the activation, on whole 128-column blocks and on 64-column
          chunks; the separate pass act(h) that the epilogue replaces
  dgrad:  the same for the transposed product (the down projection's data gradient) with the
          "activation_grad" epilogue, and the separate pass of the derivative
Set MOSAIC_GPU_DUMP_PTXAS=1 to have ptxas print each kernel's registers and spills to stderr.
Prints one line per variant and writes JSON to OUT/<device>/<date>-gmm-epilogues.json.

GPU:  python -m experiments.bench_gmm_epilogues [--out DIR]
CPU:  python -m experiments.bench_gmm_epilogues --smoke --out /tmp/x   (tiny shape, interpreted)
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp

from experiments import bench_common as bc
from kernels.gmm import mosaic_ws_kernel
from kernels.gmm.epilogue import Epilogue, activation_grad_tile, activation_tile

SHAPE = (65536, 768, 3072, 64)     # rows, d, f, groups
SMOKE_SHAPE = (200, 128, 256, 4)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=bc.RESULTS_DIR)
  ap.add_argument("--smoke", action="store_true", help="tiny shape, kernels interpreted on CPU")
  ap.add_argument("--activation", default="gelu_tanh", choices=("gelu_tanh", "gelu", "silu"))
  ap.add_argument("--iters", type=int, default=10)
  args = ap.parse_args(argv)
  m, d, f, g = SMOKE_SHAPE if args.smoke else SHAPE
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (m, d), jnp.bfloat16)
  w_in = (jax.random.normal(keys[1], (g, d, f), jnp.float32) * d ** -0.5).astype(jnp.bfloat16)
  w_out = (jax.random.normal(keys[2], (g, f, d), jnp.float32) * f ** -0.5).astype(jnp.bfloat16)
  gs = jnp.bincount(jax.random.randint(keys[3], (m,), 0, g), length=g).astype(jnp.int32)
  dy = jax.random.normal(keys[3], (m, d), jnp.bfloat16)
  run = functools.partial(mosaic_ws_kernel.gmm, out_dtype=jnp.bfloat16, interpret=args.smoke)
  whole, chunks = mosaic_ws_kernel.MosaicWsGmmConfig(), mosaic_ws_kernel.MosaicWsGmmConfig(
      epi_cols=64)
  act, grad = (functools.partial(Epilogue, "activation"),
               functools.partial(Epilogue, "activation_grad"))
  h = jax.jit(lambda x, w, gs: run(x, w, gs, transpose_rhs=False, config=whole))(x, w_in, gs)

  def up(config, epilogue=None):
    return jax.jit(lambda x, w, gs: run(x, w, gs, transpose_rhs=False, config=config,
                                        epilogue=epilogue)), (x, w_in, gs)

  def dgrad(config, epilogue=None):
    extra = {} if epilogue is None else {"epilogue": epilogue}
    return jax.jit(lambda dy, w, gs, h: run(dy, w, gs, transpose_rhs=True, config=config,
                                            residual=h if extra else None, **extra)), (
        dy, w_out, gs, h)

  a = args.activation
  variants = {
      "up plain": up(whole),
      "up relu epilogue": up(whole, act("relu")),
      f"up {a} epilogue, 128-column blocks": up(whole, act(a)),
      f"up {a} epilogue, 64-column chunks": up(chunks, act(a)),
      f"separate {a} pass (XLA)": (jax.jit(functools.partial(activation_tile, a)), (h,)),
      "dgrad plain": dgrad(whole),
      "dgrad relu epilogue": dgrad(whole, grad("relu")),
      f"dgrad {a} epilogue, 128-column blocks": dgrad(whole, grad(a)),
      f"dgrad {a} epilogue, 64-column chunks": dgrad(chunks, grad(a)),
      f"separate {a} gradient pass (XLA)": (
          jax.jit(functools.partial(activation_grad_tile, a)), (h, h)),
  }
  rows = []
  for name, (fn, fn_args) in variants.items():
    print(f"=== {name}", file=sys.stderr, flush=True)   # ptxas's report follows (if dumped)
    ms = bc.time_jax(fn, *fn_args, warmup=1, iters=args.iters)
    rows.append({"variant": name, "ms": ms})
    print(f"{name:45s} {ms:8.3f} ms", flush=True)
  payload = {"env": bc.environment(), "shape": {"rows": m, "d": d, "f": f, "groups": g},
             "activation": a, "results": rows}
  print(f"wrote {bc.write_result(args.out, 'gmm-epilogues', payload)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
