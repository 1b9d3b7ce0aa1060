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
