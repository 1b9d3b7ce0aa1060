"""The GPU kernel time in a jax.profiler trace: summed by kernel name and by category (matmul,
Pallas kernels, attention, fusions, copies, collectives), from the trace JSON the profiler writes
(no TensorBoard needed). Used by experiments.profile_train (a training step) and
bench_common.kernel_profile (one call of a layer or an op)."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os

# Kernel-name fragments -> category, first match wins (names as CUDA/XLA/Pallas report them).
CATEGORIES = (
    ("attention", ("flash", "fmha", "cudnn", "attention", "softmax")),
    ("pallas", ("mosaic", "pallas", "triton", "gmm", "xty", "scatter", "_sdd", "_dsd", "_dds")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "sm90", "sm80", "cublas", "dot")),
    ("collective", ("nccl", "all_reduce", "all_to_all", "all_gather")),
    ("copy", ("memcpy", "memset", "copy", "transpose")),
    ("reduce", ("reduce", "scatter", "sort", "cumsum")),
    ("fusion", ("fusion", "loop", "input", "wrapped", "convert", "broadcast", "select")),
)


def category(name: str) -> str:
  low = name.lower()
  for cat, keys in CATEGORIES:
    if any(k in low for k in keys):
      return cat
  return "other"


def summarize_trace(trace_dir: str, top: int) -> dict:
  """Sum the GPU kernel events of the newest *.trace.json.gz under trace_dir."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")),
                 key=os.path.getmtime)
  if not paths:
    raise RuntimeError(f"no *.trace.json.gz under {trace_dir}")
  with gzip.open(paths[-1], "rb") as f:
    trace = json.load(f)
  events = trace["traceEvents"]
  gpu_pids = {e["pid"] for e in events
              if e.get("ph") == "M" and e.get("name") == "process_name"
              and "GPU" in str(e.get("args", {}).get("name", ""))}
  kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids]
  # Events on several GPU lines can describe the same kernel (stream view and op view):
  # count only the stream lines that carry kernel names, i.e. those of the busiest thread kind.
  by_tid = collections.defaultdict(float)
  for e in kernels:
    by_tid[(e["pid"], e["tid"])] += float(e.get("dur", 0))
  thread_names = {(e["pid"], e["tid"]): str(e.get("args", {}).get("name", ""))
                  for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
  stream_tids = {k for k in by_tid if "stream" in thread_names.get(k, "").lower()}
  if stream_tids:
    kernels = [e for e in kernels if (e["pid"], e["tid"]) in stream_tids]
  if not kernels:
    return {"trace": paths[-1], "kernels": 0}
  start = min(float(e["ts"]) for e in kernels)
  end = max(float(e["ts"]) + float(e.get("dur", 0)) for e in kernels)
  per_name = collections.defaultdict(lambda: [0.0, 0])
  per_cat = collections.defaultdict(float)
  busy = 0.0
  for e in kernels:
    d = float(e.get("dur", 0))
    busy += d
    per_name[e["name"]][0] += d
    per_name[e["name"]][1] += 1
    per_cat[category(e["name"])] += d
  top_rows = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
  return {
      "trace": paths[-1], "kernels": len(kernels), "span_us": end - start, "busy_us": busy,
      "threads": sorted(thread_names.get(k, str(k)) for k in {(e["pid"], e["tid"]) for e in kernels}),
      "per_category_us": dict(sorted(per_cat.items(), key=lambda kv: -kv[1])),
      "top": [{"name": n[:120], "us": v[0], "count": v[1], "category": category(n)}
              for n, v in top_rows],
  }
