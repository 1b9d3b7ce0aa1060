"""The paper reproductions' --quick modes: the whole pipeline (train, summarize, plot) on CPU."""

from __future__ import annotations

import json
import os
import sys

import pytest

from experiments import reproduce_megablocks


@pytest.mark.slow
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


@pytest.mark.slow
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
  assert set(layer) == {(layout, dtd) for layout in ("1x4x2", "2x2x2") for dtd in (True, False)}
  assert {(r["layout"], r["lean_optimizer"]) for r in payload["train"]} == {
      ("2x2x2", False), ("2x2x2", True)}
  assert all(r["temp_bytes"] > 0 for r in payload["train"])


@pytest.mark.slow
def test_scattermoe_quick(tmp_path):
  """Two calls (the layers, then the Mixture-of-Attention parts) build one JSON and the figures."""
  from experiments import reproduce_scattermoe as rs
  from jaxmoe.config import DROPLESS_IMPLS, IMPLS

  path = rs.main(["--quick", "--out", str(tmp_path), "--parts", "layers"])
  assert rs.main(["--quick", "--out", str(tmp_path), "--parts", "moa-cost,moa-train"]) == path
  with open(path) as f:
    payload = json.load(f)
  parts = payload["parts"]
  assert set(parts) == {"layers", "moa-cost", "moa-train"}
  assert all(p["env"]["device"] and p["env"]["date"] for p in parts.values())
  for name, res in parts["layers"]["results"].items():
    rows = {r["impl"]: r for r in res["rows"]}
    assert set(rows) == set(IMPLS), name
    for impl, r in rows.items():
      assert "error" not in r and r["finite"], (name, impl)
      assert r["training_tokens_per_s"] > 0 and r["inference_tokens_per_s"] > 0
      assert r["residual_bytes"] > 0 and r["temp_bytes"] > 0 and r["fwd_temp_bytes"] > 0
      if impl in DROPLESS_IMPLS and not r.get("reference_for_rel_err"):
        assert r["rel_err_vs_first_dropless"] < 2e-2, (name, impl)   # bf16, the same function
    assert 0 <= rows["capacity"]["dropped_fraction"] < 1
    assert set(res["scatter_vs"]) == set(IMPLS) - {"scatter"}
    for ratios in res["scatter_vs"].values():
      assert all(v is not None and v > 0 for v in ratios.values())
  cost = {r["variant"]: r for r in parts["moa-cost"]["rows"]}
  assert set(cost) == set(rs.COST_VARIANTS) and not any("error" in r for r in cost.values())
  spec = parts["moa-cost"]["spec"]
  # MoA's active attention weights are the grouped-query layer's plus its router.
  assert cost["moa-scatter"]["active_params_per_token"] == \
      cost["gqa"]["active_params_per_token"] + spec["d_model"] * spec["num_experts"]
  runs = parts["moa-train"]["runs"]
  assert set(runs) == {"moa", "mha", "gqa"}
  for kind, r in runs.items():
    assert [c["step"] for c in r["val_curve"]] == [0, 8, 16], kind
    assert r["final_val_loss"] < r["val_curve"][0]["val_loss"], kind   # it learned
  assert runs["moa"]["moa_final_val_loss_minus_this"] == 0
  for png in ("throughput", "memory", "moa"):
    assert os.path.getsize(path.replace(".json", f"-{png}.png")) > 10_000


@pytest.mark.parametrize("argv", [["--impls", "grouped,nope"], ["--parts", ""], ["--iters", "0"],
                                  ["--capacity-factor", "nan"], ["--vocab-size", "100"]])
def test_scattermoe_rejects_bad_arguments(argv, tmp_path, capsys):
  from experiments import reproduce_scattermoe as rs
  with pytest.raises(SystemExit) as e:
    rs.main(["--quick", "--out", str(tmp_path)] + argv)
  assert e.value.code == 2
  assert "error:" in capsys.readouterr().err
