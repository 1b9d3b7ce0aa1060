"""GPU check of the LM's loss and embedding ops and the recomputing expert MLP against their plain
autodiff forms, with timings.

  cross_entropy  kernels.cross_entropy (custom VJP on the 16-bit logits) vs -log_softmax(f32)[t]
  embed_grad     jaxmoe.model.embed_lookup's gradient (one-hot over each chunk's distinct ids at
                 a GPT-2-sized vocabulary) vs jnp.take's scatter-add gradient, ids uniform over
                 256 values
  embed_grad_text  the same with the ids of the embedded corpus's first tokens (real text: a few
                 bytes such as the space take a large share, where scatter-add atomics contend)
  remat_experts  the Small preset's MoE layer (bf16, grouped, the platform's kernels) with
                 MoEConfig.remat_experts vs without: outputs and gradients
  linear_cross_entropy  kernels.cross_entropy.linear_cross_entropy (the head and the loss fused,
                 8 chunks of the sequence) vs the head's logits then cross_entropy: the loss and
                 the gradients of the features and the head, and the memory XLA plans for each
  recompute_activation  the Small preset's MoE layer with MoEConfig.recompute_activation vs
                 without (kernels.grouped_mlp keep_activation=False: the backward's epilogue
                 writes act(h) again): outputs and gradients, and the planned memory

Shapes are the Small preset's at batch 64: 65536 tokens (64 x 1024), vocabulary 50304, d_model 768, ids drawn
from 256 values (a byte-level corpus); the layer has 64 experts of width 3072, top-1. Each check
compares values and gradients, then times the forward+backward of both forms in one process
(ratios; absolute times only from a GPU).

GPU:  python -m experiments.check_train_ops --out DIR [--checks embed_grad,embed_grad_text]
      (PASS/FAIL lines; exit 1 on a failure)
CPU:  python -m experiments.check_train_ops --out DIR --smoke   (small shapes, no timings)
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import bench_common as bc
from jaxmoe import MoE, MoEConfig
from jaxmoe import data as data_lib
from jaxmoe.model import embed_lookup
from kernels.cross_entropy import cross_entropy, cross_entropy_reference, linear_cross_entropy


def check_cross_entropy(tokens: int, vocab: int, timed: bool) -> tuple[bool, dict]:
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  logits = (jax.random.normal(k1, (tokens, vocab), jnp.float32) * 3).astype(jnp.bfloat16)
  targets = jax.random.randint(k2, (tokens,), 0, vocab, jnp.int32)
  g = jax.random.normal(k3, (tokens,), jnp.float32)

  def fwd_bwd(ce):
    def run(logits):
      y, vjp = jax.vjp(lambda l: ce(l, targets), logits)
      return y, vjp(g)[0]
    return jax.jit(run)

  ours, ref = fwd_bwd(cross_entropy), fwd_bwd(cross_entropy_reference)
  (y, d), (y0, d0) = ours(logits), ref(logits)
  res = {"loss_rel_err": bc.rel_err(y, y0), "grad_rel_err": bc.rel_err(d, d0),
         "grad_dtype": str(d.dtype)}
  ok = res["loss_rel_err"] < 1e-5 and res["grad_rel_err"] < 1e-2 and d.dtype == jnp.bfloat16
  if timed:
    res["ms"] = bc.time_jax(ours, logits)
    res["reference_ms"] = bc.time_jax(ref, logits)
  return ok, res


def check_embed_grad(tokens: int, vocab: int, d: int, timed: bool, text: bool = False
                     ) -> tuple[bool, dict]:
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  table = jax.random.normal(k1, (vocab, d), jnp.float32)
  if text:
    ids = jnp.asarray(np.asarray(data_lib.load_tokens(None, max_bytes=tokens)[:tokens], np.int32))
    if ids.shape[0] < tokens:
      raise ValueError(f"the embedded corpus has {ids.shape[0]} tokens, fewer than {tokens}")
  else:
    ids = jax.random.randint(k2, (tokens,), 0, 256, jnp.int32)
  g = jax.random.normal(k3, (tokens, d), jnp.float32).astype(jnp.bfloat16)

  def grad_of(lookup):
    return jax.jit(lambda t: jax.vjp(lambda t: lookup(t, ids), t)[1](g)[0])

  ours = grad_of(lambda t, i: embed_lookup(t, i, jnp.bfloat16))
  ref = grad_of(lambda t, i: jnp.take(t, i, axis=0).astype(jnp.bfloat16))
  got, want = ours(table), ref(table)
  res = {"grad_rel_err": bc.rel_err(got, want),
         "unused_rows_zero": bool(jnp.all(got[256:] == 0))}
  ok = res["grad_rel_err"] < 1e-5 and res["unused_rows_zero"]
  if timed:
    res["ms"] = bc.time_jax(ours, table)
    res["reference_ms"] = bc.time_jax(ref, table)
  return ok, res


def _layer_pair(tokens: int, d: int, f: int, experts: int, timed: bool, *, activation: str,
                flag: str, seed: int, planned: bool) -> tuple[bool, dict]:
  """The Small preset's MoE layer (bf16, grouped, top-1) with MoEConfig.<flag>=True against
  False: outputs and gradients for a random cotangent, with `planned` the memory XLA plans for
  each forward+backward, with `timed` their times."""
  layers = [MoE(MoEConfig(d_model=d, d_ff=f, num_experts=experts, top_k=1, activation=activation,
                          **{flag: r}), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
            for r in (True, False)]
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (tokens, d), jnp.bfloat16)
  g = jax.random.normal(k2, (tokens, d), jnp.bfloat16)

  def fwd_bwd(layer):
    graphdef, state = nnx.split(layer)

    def run(state, x):
      y, vjp = jax.vjp(lambda s, x: nnx.merge(graphdef, s)(x)[0], state, x)
      return y, vjp(g)
    return jax.jit(run), state

  (ours, state), (plain, state0) = fwd_bwd(layers[0]), fwd_bwd(layers[1])
  (y, grads), (y0, grads0) = ours(state, x), plain(state0, x)
  pairs = list(zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)))
  res = {"y_rel_err": bc.rel_err(y, y0),
         "grad_rel_err": max(bc.rel_err(a, b) for a, b in pairs if a.size)}
  if planned:
    res["planned_gib"] = bc.compiled_bytes(ours, state, x) / 2**30
    res["reference_planned_gib"] = bc.compiled_bytes(plain, state0, x) / 2**30
  # The same kernels on the same operands (recompute_activation: act(h) from the same h): equal
  # up to the order XLA schedules the sums in.
  ok = res["y_rel_err"] < 1e-6 and res["grad_rel_err"] < 1e-2
  if timed:
    res["ms"] = bc.time_jax(ours, state, x)
    res["reference_ms"] = bc.time_jax(plain, state0, x)
  return ok, res


def check_remat_experts(tokens: int, d: int, f: int, experts: int, timed: bool
                        ) -> tuple[bool, dict]:
  return _layer_pair(tokens, d, f, experts, timed, activation="gelu", flag="remat_experts",
                     seed=2, planned=False)


def check_linear_cross_entropy(tokens: int, vocab: int, d: int, timed: bool
                               ) -> tuple[bool, dict]:
  b = 64 if tokens % 64 == 0 else 1
  k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(k1, (b, tokens // b, d), jnp.float32).astype(jnp.bfloat16)
  w = (jax.random.normal(k2, (d, vocab), jnp.float32) * d ** -0.5).astype(jnp.bfloat16)
  y = jax.random.randint(k3, (b, tokens // b), 0, vocab, jnp.int32)

  def logits_path(x, w):
    logits = jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.mean(cross_entropy(logits, y))

  fused = lambda x, w: linear_cross_entropy(x, w, y, num_chunks=8)   # noqa: E731
  ours, ref = (jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for f in (fused, logits_path))
  (l1, (dx1, dw1)), (l0, (dx0, dw0)) = ours(x, w), ref(x, w)
  res = {"loss_rel_err": bc.rel_err(l1, l0), "dx_rel_err": bc.rel_err(dx1, dx0),
         "dw_rel_err": bc.rel_err(dw1, dw0),
         "planned_gib": bc.compiled_bytes(ours, x, w) / 2**30,
         "reference_planned_gib": bc.compiled_bytes(ref, x, w) / 2**30}
  # The same math in the same dtypes; dw is summed over chunks in float32 before its rounding.
  ok = res["loss_rel_err"] < 1e-5 and res["dx_rel_err"] < 1e-2 and res["dw_rel_err"] < 1e-2
  if timed:
    res["ms"] = bc.time_jax(ours, x, w)
    res["reference_ms"] = bc.time_jax(ref, x, w)
  return ok, res


def check_recompute_activation(tokens: int, d: int, f: int, experts: int, timed: bool
                               ) -> tuple[bool, dict]:
  return _layer_pair(tokens, d, f, experts, timed, activation="gelu_tanh",
                     flag="recompute_activation", seed=5, planned=True)


CHECKS = ("cross_entropy", "embed_grad", "embed_grad_text", "remat_experts",
          "linear_cross_entropy", "recompute_activation")


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--smoke", action="store_true", help="small shapes on CPU, no timings")
  ap.add_argument("--checks", default=",".join(CHECKS),
                  help=f"comma-separated subset of {','.join(CHECKS)}")
  args = ap.parse_args()
  chosen = args.checks.split(",")
  unknown = [c for c in chosen if c not in CHECKS]
  if unknown:
    ap.error(f"--checks: unknown {unknown}; allowed: {', '.join(CHECKS)}")
  small, full = (2048, 5000, 64, 128, 8), (65536, 50304, 768, 3072, 64)
  tokens, vocab, d, f, e = small if args.smoke else full
  timed = not args.smoke
  results, fails = {}, 0
  checks = {"cross_entropy": lambda: check_cross_entropy(tokens, vocab, timed),
            "embed_grad": lambda: check_embed_grad(tokens, vocab, d, timed),
            "embed_grad_text": lambda: check_embed_grad(tokens, vocab, d, timed, text=True),
            "remat_experts": lambda: check_remat_experts(tokens, d, f, e, timed),
            "linear_cross_entropy": lambda: check_linear_cross_entropy(tokens, vocab, d, timed),
            "recompute_activation": lambda: check_recompute_activation(tokens, d, f, e, timed)}
  for name in chosen:
    ok, res = checks[name]()
    results[name] = {"ok": ok, **res}
    fails += not ok
    times = (f"; {res['ms']:.2f} ms vs {res['reference_ms']:.2f} ms plain "
             f"({res['reference_ms'] / res['ms']:.2f}x)") if timed else ""
    print(f"{'PASS' if ok else 'FAIL'} {name}: " + ", ".join(
        f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()
        if not k.endswith("ms")) + times, flush=True)
  payload = {"env": bc.environment(), "tokens": tokens, "vocab": vocab, "d_model": d, "d_ff": f,
             "num_experts": e, "results": results}
  print("wrote", bc.write_json(args.out, "check_train_ops.json", payload))
  return 1 if fails else 0


if __name__ == "__main__":
  sys.exit(main())
