"""HLO collective accounting (tests and benchmarks): which collectives a compiled program runs,
and how many bytes they move.

  summary = collective_summary(jax.jit(f).lower(*args).compile().as_text())
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

_COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "all-reduce", "reduce-scatter",
                "collective-permute")
_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "s32": 4, "u32": 4, "s16": 2,
                "u16": 2, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1, "f8e5m2": 1}


def hlo_collectives(hlo_text: str) -> list[dict[str, Any]]:
  """Collective instructions of an HLO module's text (jax `.compile().as_text()`):
  [{"op": "all-to-all" | "ragged-all-to-all" | "all-gather" | "all-reduce" | "reduce-scatter" |
  "collective-permute", "shapes": [(dtype, dims), ...] of the result (async *-start ops: the output
  half of their tuple), "bytes": result bytes, "computation": the name of the computation it sits
  in (e.g. a while loop's body, which runs it once per iteration), "line": the instruction}] (one
  per instruction; *-done halves are skipped). For ragged-all-to-all the bytes are the static
  output buffer's, not the rows actually moved.
  """
  out = []
  op_re = re.compile(r"=\s*(.*?)\s+(" + "|".join(map(re.escape, _COLLECTIVES)) + r")(-start)?\(")
  shape_re = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
  # A computation's header starts its line: "%name (params) -> type {" or "ENTRY %name ...".
  header_re = re.compile(r"^(?:ENTRY\s+)?(%[\w.\-]+)\s")
  computation = None
  for line in hlo_text.splitlines():
    header = header_re.match(line)
    if header:
      computation = header.group(1)
      continue
    m = op_re.search(line)
    if m is None:
      continue
    shapes = [(dt, tuple(int(v) for v in dims.split(",") if v))
              for dt, dims in shape_re.findall(m.group(1)) if dt in _DTYPE_BYTES]
    if m.group(3) and len(shapes) >= 2:   # async start: (operands..., outputs...)
      shapes = shapes[len(shapes) // 2:]
    nbytes = sum(_DTYPE_BYTES[dt] * int(np.prod(dims)) for dt, dims in shapes)
    out.append({"op": m.group(2), "shapes": shapes, "bytes": nbytes, "computation": computation,
                "line": line.strip()})
  return out


def collective_summary(hlo_text: str) -> dict[str, dict[str, int]]:
  """{op: {"count", "bytes"}} over hlo_collectives(hlo_text)."""
  summary: dict[str, dict[str, int]] = {}
  for c in hlo_collectives(hlo_text):
    s = summary.setdefault(c["op"], {"count": 0, "bytes": 0})
    s["count"] += 1
    s["bytes"] += c["bytes"]
  return summary
