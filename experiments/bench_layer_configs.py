"""Whole MoE layers at SonicMoE's (arXiv 2512.14080, Figure 14) configurations, in one run.

For each configuration (T tokens, model width d, expert width n, E experts, top-k) and every
jaxmoe impl asked for, plus a PyTorch layer on `torch._grouped_mm` where torch imports with CUDA:
  - forward and backward TFLOP/s separately, with SonicMoE's count: 6 T k d n FLOPs forward
    (the SwiGLU up-projection 2 T k d 2n, the down-projection 2 T k n d), twice that backward;
    backward time = (forward+backward) - forward, both timed on their own. The forward alone is
    undifferentiated, which may run other kernels than the forward of a training step
    (scatter_glu's default fuses its up-projection only there), so the training step is also
    compared whole: step_vs_sonicmoe = SonicMoE's forward+backward time at its TFLOP/s and this
    FLOP count over ours;
  - activation memory: the bytes the backward keeps (the VJP residuals, less the parameters and
    the input, from jax.eval_shape: what Figure 13 counts) and XLA's planned temporaries (of the
    forward+backward; of the forward alone as fwd_temp_bytes);
  - SonicMoE's published numbers (read off Figure 14, H100) beside ours, as ratios.
The layer is jaxmoe.MoE: router (float32 logits, softmax top-k, Mixtral's renormalized weights),
dispatch, SwiGLU experts, combine; bf16 parameters and activations.

Run on the GPU:  python -m experiments.bench_layer_configs [--out DIR] [--impls grouped,scatter]
CPU smoke test:  python -m experiments.bench_layer_configs --smoke --out /tmp/x
Writes OUT/<device>/<date>-layer-configs.json and .png (default OUT: experiments/results; bars laid out as their figure: one panel
per configuration, forward and backward TFLOP/s per impl, SonicMoE's value as a line).
"""

from __future__ import annotations

import argparse
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import bench_common as bc
from jaxmoe import MoE, MoEConfig
from jaxmoe.config import DROPLESS_IMPLS, IMPL_BACKENDS

# name: ((T, d, n, E, k), (SonicMoE forward, backward TFLOP/s read off Figure 14, H100)): the
# figure's twelve configurations (1.4B, 7B, 30B, 120B; three (n, E, k) each), its bar heights read
# to about +-5 TFLOP/s from the figure image in the SonicMoE repository (assets/tput.png).
CONFIGS = {
    "T40960-d768-n256-E128-k8": ((40960, 768, 256, 128, 8), (338, 365)),
    "T40960-d768-n512-E64-k4": ((40960, 768, 512, 64, 4), (398, 402)),
    "T40960-d768-n1024-E32-k2": ((40960, 768, 1024, 32, 2), (404, 434)),
    "T24576-d1536-n256-E128-k8": ((24576, 1536, 256, 128, 8), (364, 404)),
    "T24576-d1536-n512-E64-k4": ((24576, 1536, 512, 64, 4), (432, 438)),
    "T24576-d1536-n1024-E32-k2": ((24576, 1536, 1024, 32, 2), (466, 466)),
    "T32768-d4096-n256-E256-k16": ((32768, 4096, 256, 256, 16), (428, 460)),
    "T32768-d4096-n512-E128-k8": ((32768, 4096, 512, 128, 8), (500, 508)),
    "T32768-d4096-n1024-E64-k4": ((32768, 4096, 1024, 64, 4), (553, 556)),
    "T32768-d4096-n512-E256-k16": ((32768, 4096, 512, 256, 16), (517, 526)),
    "T32768-d4096-n1024-E128-k8": ((32768, 4096, 1024, 128, 8), (558, 566)),
    "T32768-d4096-n2048-E64-k4": ((32768, 4096, 2048, 64, 4), (598, 585)),
}
# SonicMoE's activation memory per layer (GiB), read off Figure 13 (assets/mem.png in the same
# repository) to about +-0.05 GiB; it is the same at the three (n, E, k) of a model scale.
FIG13_GIB = {"1.4B": 0.58, "7B": 0.61, "30B": 2.5, "120B": 4.5}
SCALE = {name: scale for scale, names in {
    "1.4B": ("T40960-d768-n256-E128-k8", "T40960-d768-n512-E64-k4", "T40960-d768-n1024-E32-k2"),
    "7B": ("T24576-d1536-n256-E128-k8", "T24576-d1536-n512-E64-k4", "T24576-d1536-n1024-E32-k2"),
    "30B": ("T32768-d4096-n256-E256-k16", "T32768-d4096-n512-E128-k8", "T32768-d4096-n1024-E64-k4"),
    "120B": ("T32768-d4096-n512-E256-k16", "T32768-d4096-n1024-E128-k8",
             "T32768-d4096-n2048-E64-k4"),
}.items() for name in names}
SMOKE_CONFIGS = {"smoke": ((64, 32, 128, 4, 2), (None, None))}
DEFAULT_IMPLS = ("grouped", "scatter", "blocksparse")


def flops(shape) -> tuple[float, float]:
  t, d, n, _, k = shape
  fwd = 6.0 * t * k * d * n
  return fwd, 2.0 * fwd


# "+NAME" suffixes of an impl spec: MoEConfig overrides, to compare them in one run.
SPEC_OPTIONS = {"fused_glu": {"fuse_glu": True}}


def impl_backend(spec: str) -> tuple[str, str | None, dict] | None:
  """"IMPL", "IMPL:BACKEND" (a backend of the impl's kernel registry, to compare backends in one
  run), either with "+fused_glu" (MoEConfig.fuse_glu: impl grouped: the GLU as
  kernels.grouped_glu; impl scatter: scatter_glu(fused=True)) -> (impl, backend or None,
  MoEConfig overrides); None when a name is unknown."""
  spec, *options = spec.split("+")
  impl, _, backend = spec.partition(":")
  if impl not in DROPLESS_IMPLS or any(o not in SPEC_OPTIONS for o in options):
    return None
  if options and impl not in ("grouped", "scatter"):
    return None
  overrides = {k: v for o in options for k, v in SPEC_OPTIONS[o].items()}
  if not backend:
    return impl, None, overrides
  if impl not in IMPL_BACKENDS or backend not in IMPL_BACKENDS[impl].names:
    return None
  return impl, backend, overrides


def jax_layer(shape, impl: str, backend, iters: int, profile: bool = False,
              overrides: dict | None = None, hlo_path: str | None = None) -> tuple[dict, jax.Array]:
  """(row, forward output) of one jaxmoe impl: forward and forward+backward times, the backward's
  residual bytes, XLA's planned temporaries of the forward+backward ("temp_bytes") and of the
  forward alone ("fwd_temp_bytes"); with impl "capacity" also the dropped fraction. `overrides`
  go to MoEConfig (e.g. capacity_factor). `hlo_path`: write the compiled forward+backward's
  optimized HLO there (gzip text: the profile's fusion names are its instruction names)."""
  t, d, n, e, k = shape
  cfg = MoEConfig(d_model=d, d_ff=n, num_experts=e, top_k=k, activation="swiglu", impl=impl,
                  renormalize=True, backend=backend, block_size=min(128, n), **(overrides or {}))
  layer = MoE(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (t, d), jnp.float32).astype(jnp.bfloat16)
  g = jax.random.normal(jax.random.key(2), (t, d), jnp.float32).astype(jnp.bfloat16)

  def forward(s, x):
    return nnx.merge(graphdef, s)(x)[0]

  def loss(s, x):
    y, stats = nnx.merge(graphdef, s)(x)
    return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32)) + stats.loss

  row, y, fwd, fwdbwd = bc.layer_costs(forward, loss, state, x, iters)
  row = {"impl": impl, **row}
  if hlo_path:
    import gzip
    with gzip.open(hlo_path, "wt") as f:
      f.write(fwdbwd.as_text())
  if profile:
    row["profile_fwd"] = bc.kernel_profile(fwd, state, x)
    row["profile_fwdbwd"] = bc.kernel_profile(fwdbwd, state, x)
  if impl == "capacity":
    dropped = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[1].dropped_fraction)(state, x)
    row["dropped_fraction"] = float(dropped)
  return row, y


def torch_layer(shape, iters: int) -> dict:
  """The same layer in PyTorch: fp32 router, softmax top-k renormalized, sort, torch._grouped_mm
  SwiGLU experts, weighted combine; forward (under no_grad) and forward+backward CUDA-event times,
  and the peak bytes each allocates above the inputs."""
  import torch

  t, d, n, e, k = shape
  dev, bf = "cuda", torch.bfloat16
  gen = torch.Generator(device=dev).manual_seed(0)
  x = torch.randn(t, d, device=dev, generator=gen).to(bf).requires_grad_(True)
  router = (torch.randn(d, e, device=dev, generator=gen) * d ** -0.5).requires_grad_(True)
  # _grouped_mm takes the (K, N) operand column-major: store (E, N, K) and pass its transpose.
  w_up = (torch.randn(e, 2 * n, d, device=dev, generator=gen) * d ** -0.5).to(bf).requires_grad_(True)
  w_down = (torch.randn(e, d, n, device=dev, generator=gen) * n ** -0.5).to(bf).requires_grad_(True)
  ct = torch.randn(t, d, device=dev, generator=gen).to(bf)

  def forward():
    probs = torch.softmax(x.float() @ router, dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=e), 0).to(torch.int32)
    xs = x[order // k]
    h = torch._grouped_mm(xs, w_up.transpose(-2, -1), offs=offs)
    gate, up = h[:, :n], h[:, n:]
    a = (torch.nn.functional.silu(gate.float()) * up.float()).to(bf)
    ys = torch._grouped_mm(a, w_down.transpose(-2, -1), offs=offs)
    y = torch.empty_like(ys)
    y[order] = ys
    return torch.einsum("tk,tkd->td", w.to(bf), y.reshape(t, k, d))

  def step():
    (forward().float() * ct.float()).sum().backward()
    for p in (x, router, w_up, w_down):
      p.grad = None

  def timed_peak(fn) -> tuple[float, int]:
    """(median ms of fn, peak bytes allocated while it ran above what was allocated before)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = bc.time_torch(fn, iters=iters)
    return ms, torch.cuda.max_memory_allocated() - base

  with torch.no_grad():
    fwd_ms, fwd_peak = timed_peak(forward)
  fwdbwd_ms, peak = timed_peak(step)
  return {"impl": "torch._grouped_mm", "fwd_ms": fwd_ms, "fwdbwd_ms": fwdbwd_ms, "finite": True,
          "peak_bytes_above_inputs": peak, "fwd_peak_bytes_above_inputs": fwd_peak}


def torch_available() -> bool:
  try:
    import torch
    return bool(torch.cuda.is_available()) and hasattr(torch, "_grouped_mm")
  except Exception:
    return False


def finish(row: dict, name: str, shape, sonic) -> dict:
  f_fwd, f_bwd = flops(shape)
  bwd_ms = row["fwdbwd_ms"] - row["fwd_ms"]
  row["bwd_ms"] = bwd_ms
  row["fwd_tflops"] = bc.tflops(f_fwd, row["fwd_ms"])
  row["bwd_tflops"] = bc.tflops(f_bwd, bwd_ms) if bwd_ms > 0 else None
  mem = FIG13_GIB.get(SCALE.get(name))
  if mem is not None and row.get("residual_bytes") is not None:
    row["residual_vs_sonicmoe_fig13"] = row["residual_bytes"] / 2 ** 30 / mem
  if sonic[0]:
    row["fwd_vs_sonicmoe"] = row["fwd_tflops"] / sonic[0]
    row["bwd_vs_sonicmoe"] = None if row["bwd_tflops"] is None else row["bwd_tflops"] / sonic[1]
    # ms at SonicMoE's TFLOP/s: FLOPs / (TFLOP/s * 1e12) s = FLOPs / (TFLOP/s * 1e9) ms
    sonic_step_ms = f_fwd / (sonic[0] * 1e9) + f_bwd / (sonic[1] * 1e9)
    row["step_vs_sonicmoe"] = sonic_step_ms / row["fwdbwd_ms"]
  return row


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(results)
  cols = min(3, len(names))  # the figure's layout: three (n, E, k) per model scale, one row each
  nrows = -(-len(names) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.9 * nrows), squeeze=False)
  for ax in axes.flat[len(names):]:
    ax.set_visible(False)
  for ax, name in zip(axes.flat, names):
    rows = [r for r in results[name]["rows"] if r.get("fwd_tflops")]
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [r["fwd_tflops"] for r in rows], 0.4, label="forward")
    ax.bar(xs + 0.2, [r.get("bwd_tflops") or 0 for r in rows], 0.4, label="backward")
    sonic = results[name]["sonicmoe"]
    if sonic[0]:
      ax.axhline(sonic[0], color="C0", ls="--", lw=1, label="SonicMoE fwd (Fig. 14, H100)")
      ax.axhline(sonic[1], color="C1", ls=":", lw=1, label="SonicMoE bwd (Fig. 14, H100)")
    ax.set_xticks(xs, [r["impl"] for r in rows], rotation=30, ha="right")
    ax.set_title(name, fontsize=9)
    ax.set_ylabel("TFLOP/s")
  axes.flat[0].legend(fontsize=7)
  env = bc.environment()
  fig.suptitle(f"MoE layer forward / backward TFLOP/s ({env['device']}, JAX {env['jax']}, "
               f"{env['date'][:10]}; SonicMoE FLOP count)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=bc.RESULTS_DIR,
                  help="results folder: writes OUT/<device>/<date>-layer-configs.json (default experiments/results)")
  ap.add_argument("--smoke", action="store_true", help="a tiny config on CPU (interpret mode)")
  ap.add_argument("--configs", default=None, help="comma-separated names (default: all)")
  ap.add_argument("--impls", default=",".join(DEFAULT_IMPLS),
                  help=f"comma-separated, of {DROPLESS_IMPLS}; IMPL:BACKEND picks the impl's "
                       "kernel backend (e.g. scatter:mosaic; default the platform's); "
                       "+fused_glu sets MoEConfig.fuse_glu (grouped: kernels.grouped_glu; "
                       "scatter: scatter_glu(fused=True), the fused GLU kernels forward and backward)")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--profile", action="store_true",
                  help="also trace one forward and one forward+backward per jaxmoe impl and record "
                       "the GPU time of its top kernels (profile_fwd, profile_fwdbwd in the JSON)")
  ap.add_argument("--dump-hlo", action="store_true",
                  help="write each impl's optimized forward+backward HLO to "
                       "OUT/hlo-<config>-<impl>.txt.gz")
  args = ap.parse_args()
  table = SMOKE_CONFIGS if args.smoke else CONFIGS
  names = args.configs.split(",") if args.configs else list(table)
  impls = args.impls.split(",")
  for bad in [c for c in names if c not in table] + [i for i in impls if impl_backend(i) is None]:
    ap.error(f"unknown config or impl {bad!r}; configs: {list(table)}; impls: {DROPLESS_IMPLS}, "
             f"each optionally as IMPL:BACKEND with a backend of {sorted(IMPL_BACKENDS)}'s registry, "
             f"and grouped or scatter with +{'/+'.join(SPEC_OPTIONS)}")
  if args.iters < 1:
    ap.error(f"--iters must be >= 1, got {args.iters}")
  backend = "triton_interpret" if args.smoke else None
  use_torch = not args.no_torch and not args.smoke and torch_available()
  results, summary, env = {}, [], bc.environment()
  for name in names:
    shape, sonic = table[name]
    print(f"== {name}", flush=True)
    rows, ref = [], None
    for impl in impls:
      try:
        hlo = (os.path.join(args.out, f"hlo-{name}-{impl.replace(':', '-')}.txt.gz")
               if args.dump_hlo else None)
        base, named, overrides = impl_backend(impl)
        row, y = jax_layer(shape, base, named or backend, args.iters, args.profile,
                           overrides=overrides, hlo_path=hlo)
        row["impl"] = impl
        if ref is None:
          ref = y
        else:  # same parameters and routing: the dropless impls agree
          row["rel_err_vs_first"] = bc.rel_err(y, ref)
        rows.append(finish(row, name, shape, sonic))
      except Exception as err:
        traceback.print_exc()
        rows.append({"impl": impl, "error": f"{type(err).__name__}: {err}"[:400]})
      print(f"   { {k: v for k, v in rows[-1].items() if not k.startswith('profile')} }",
            flush=True)
      bc.print_profiles(rows[-1])
    if use_torch:
      try:
        rows.append(finish(torch_layer(shape, args.iters), name, shape, sonic))
      except Exception as err:
        traceback.print_exc()
        rows.append({"impl": "torch._grouped_mm", "error": f"{type(err).__name__}: {err}"[:400]})
      print(f"   {rows[-1]}", flush=True)
    results[name] = {"shape": dict(zip("T d n E k".split(), shape)), "sonicmoe": sonic,
                     "sonicmoe_fig13_gib": FIG13_GIB.get(SCALE.get(name)),
                     "rows": rows}
    summary += [{"config": name, **{c: r.get(c) for c in (
        "impl", "fwd_ms", "bwd_ms", "fwd_tflops", "bwd_tflops", "fwd_vs_sonicmoe",
        "bwd_vs_sonicmoe", "step_vs_sonicmoe", "residual_vs_sonicmoe_fig13")},
        "resid_GiB": (r.get("residual_bytes") or 0) / 2 ** 30} for r in rows]
    # Written after every configuration, so a run cut short by a time limit keeps what it measured.
    payload = {"env": env, "flop_count": "6 T k d n forward, 12 T k d n backward",
               "results": results}
    path = bc.write_result(args.out, "layer-configs", payload)
  plot(results, path.replace(".json", ".png"))
  print(bc.table(summary, ["config", "impl", "fwd_ms", "bwd_ms", "fwd_tflops", "bwd_tflops",
                           "fwd_vs_sonicmoe", "bwd_vs_sonicmoe", "step_vs_sonicmoe", "resid_GiB",
                           "residual_vs_sonicmoe_fig13"]))


if __name__ == "__main__":
  main()
