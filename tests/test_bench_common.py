"""experiments.bench_common: result paths named by device and date, and the run record."""

import json

import pytest

from experiments import bench_common as bc


@pytest.mark.parametrize("device, platform, n, slug", [
    ("NVIDIA H100 80GB HBM3", "gpu", 1, "h100"),
    ("NVIDIA H200", "gpu", 2, "h200x2"),
    ("cpu", "cpu", 8, "cpux8"),
])
def test_device_slug(device, platform, n, slug):
  assert bc.device_slug({"device": device, "platform": platform, "num_devices": n}) == slug


def test_result_path_names_device_date_and_what():
  env = {"device": "NVIDIA H100 80GB HBM3", "platform": "gpu", "num_devices": 1,
         "date": "2026-11-23T09:15:26+00:00"}
  assert bc.result_path("experiments/results", "gmm", env) == "experiments/results/h100/2026-11-23-gmm.json"
  assert bc.result_path("r", "layer-configs", env, ext="png") == "r/h100/2026-11-23-layer-configs.png"
  with pytest.raises(ValueError, match="what"):
    bc.result_path("r", "Bench Train", env)


def test_write_result_records_the_run(tmp_path):
  env = bc.environment()
  for key in ("device", "num_devices", "jax", "jaxlib", "python", "date", "command", "commit"):
    assert key in env
  assert env["command"].startswith("python")
  path = bc.write_result(str(tmp_path), "smoke", {"env": env, "results": [1.5]})
  assert path == str(tmp_path / bc.device_slug(env) / f"{env['date'][:10]}-smoke.json")
  assert json.load(open(path)) == {"env": env, "results": [1.5]}
