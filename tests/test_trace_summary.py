"""experiments.trace_summary: GPU kernel time summed from a jax.profiler trace file."""

import gzip
import json
import os

import pytest

from experiments.trace_summary import category, summarize_trace


def _write_trace(root, events):
  folder = os.path.join(root, "plugins", "profile", "run1")
  os.makedirs(folder)
  with gzip.open(os.path.join(folder, "host.trace.json.gz"), "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_sums_the_gpu_stream_kernels_by_name_and_category(tmp_path):
  meta = lambda name, pid, tid=None, what="process_name": {
      "ph": "M", "name": what, "pid": pid, **({"tid": tid} if tid is not None else {}),
      "args": {"name": name}}
  kernel = lambda name, ts, dur, tid=1: {"ph": "X", "pid": 7, "tid": tid, "name": name,
                                         "ts": ts, "dur": dur}
  _write_trace(tmp_path, [
      meta("/device:GPU:0", 7), meta("/host:CPU", 3),
      meta("Stream #1", 7, 1, "thread_name"), meta("XLA Ops", 7, 2, "thread_name"),
      kernel("jaxmoe_scatter2scatter", 0, 30), kernel("jaxmoe_scatter2scatter", 50, 30),
      kernel("loop_convert_fusion", 100, 10),
      kernel("jaxmoe_scatter2scatter", 0, 30, tid=2),          # the op view of the same kernel
      {"ph": "X", "pid": 3, "tid": 1, "name": "host work", "ts": 0, "dur": 500},
  ])
  got = summarize_trace(str(tmp_path), top=5)
  assert got["kernels"] == 3 and got["busy_us"] == 70 and got["span_us"] == 110
  assert got["top"][0] == {"name": "jaxmoe_scatter2scatter", "us": 60.0, "count": 2,
                           "category": "pallas"}
  assert got["per_category_us"] == {"pallas": 60.0, "fusion": 10.0}


def test_no_trace_is_an_error(tmp_path):
  with pytest.raises(RuntimeError, match="no \\*.trace.json.gz"):
    summarize_trace(str(tmp_path), top=5)


def test_categories():
  assert category("nvjet_sm90_tss_128x160") == "matmul"
  assert category("sort_8_1") == "reduce"
  assert category("something_else") == "other"
