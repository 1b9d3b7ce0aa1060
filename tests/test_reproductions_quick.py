"""The paper reproductions' --quick modes: the whole pipeline (train, summarize, plot) on CPU."""

from __future__ import annotations

import json
import os
import sys

from experiments import reproduce_megablocks


def test_megablocks_quick(tmp_path, monkeypatch, capsys):
  out = tmp_path / "mb"
  monkeypatch.setattr(sys, "argv", ["reproduce_megablocks", "--quick", "--out", str(out),
                                    "--variants", "dmoe,capacity-1.0,dense"])
  reproduce_megablocks.main()
  with open(out / "megablocks.json") as f:
    results = json.load(f)["results"]
  assert set(results) == {"dmoe", "capacity-1.0", "dense"}
  for name, r in results.items():
    assert r["final_val_loss"] is not None and r["median_tokens_per_s"] > 0, name
    steps = [c["step"] for c in r["curve"]]
    assert steps == sorted(steps) and len(steps) >= 3
  # Dropless drops nothing; capacity factor 1 at an untrained router drops some tokens.
  assert all(d["dropped_fraction"] == 0 for d in results["dmoe"]["dropped"])
  assert max(d["dropped_fraction"] for d in results["capacity-1.0"]["dropped"]) > 0
  # The reference model reaches its own final loss at its last step.
  ref = results["capacity-1.0"]
  assert ref["to_reach_capacity_1.0_final_loss"]["step"] == ref["curve"][-1]["step"]
  assert os.path.getsize(out / "megablocks.png") > 10_000


def test_ted_quick(tmp_path, monkeypatch):
  from experiments import reproduce_ted
  monkeypatch.setattr(sys, "argv", ["reproduce_ted", "--quick", "--out", str(tmp_path)])
  reproduce_ted.main()
  with open(tmp_path / "ted.json") as f:
    payload = json.load(f)
  layer = {(r["layout"], r["duplicate_token_dropping"]): r for r in payload["layer"]}
  # Duplicate token dropping halves the all-to-all at tensor degree 2 and adds an all-gather.
  for layout in ("1x4x2", "2x2x2"):
    on, off = layer[(layout, True)], layer[(layout, False)]
    assert on["all_to_all_bytes"] * 2 == off["all_to_all_bytes"]
    assert on["all_gather_bytes"] > off["all_gather_bytes"]
  assert {(r["layout"], r["lean_optimizer"]) for r in payload["train"]} == {
      (layout, lean) for layout in ("1x8x1", "2x4x1", "1x4x2", "2x2x2") for lean in (False, True)}
  assert all(r["temp_bytes"] > 0 for r in payload["train"])
