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


def test_layer_costs_counts_what_the_backward_keeps():
  import jax.numpy as jnp

  params = {"w": jnp.full((16, 24), 0.1, jnp.float32)}
  x = jnp.ones((8, 16), jnp.float32)
  # A matmul keeps only its operands (the parameters and the input, not counted); tanh after it
  # keeps its (8, 24) float32 output as well.
  for fn, residual in ((lambda p, x: x @ p["w"], 0), (lambda p, x: jnp.tanh(x @ p["w"]), 768)):
    row, y, fwd, fwdbwd = bc.layer_costs(fn, lambda p, x: jnp.sum(fn(p, x)), params, x, iters=2)
    assert row["residual_bytes"] == residual
    assert row["finite"] and row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0
    assert row["temp_bytes"] is not None and row["fwd_temp_bytes"] is not None
    assert y.shape == (8, 24) and fwdbwd(params, x)[0] == jnp.sum(y)


@pytest.mark.parametrize("spec, want", [
    ("scatter", ("scatter", None, {})),
    ("scatter:mosaic", ("scatter", "mosaic", {})),
    ("grouped:triton", ("grouped", "triton", {})),
    ("grouped+fused_glu", ("grouped", None, {"fuse_glu": True})),
    ("grouped:mosaic+fused_glu", ("grouped", "mosaic", {"fuse_glu": True})),
    ("scatter+fused_glu", ("scatter", None, {"fuse_glu": True})),
    ("blocksparse+fused_glu", None),  # the option is grouped's and scatter's
    ("grouped+nope", None),
    ("scatter:nope", None),          # not a backend of the scatter registry
    ("ragged_dot:xla", None),        # an impl without a kernel registry takes no backend
    ("nope", None),
])
def test_layer_configs_impl_backend(spec, want):
  """bench_layer_configs --impls IMPL[:BACKEND][+OPTION]: the backend must belong to the impl's
  registry, the option must be known and the impl's."""
  from experiments.bench_layer_configs import impl_backend
  assert impl_backend(spec) == want


def test_layer_configs_finish_compares_the_step_whole():
  """finish(): backward time = forward+backward - forward; at SonicMoE's own times every ratio
  is 1, and a faster undifferentiated forward raises fwd_vs_sonicmoe, lowers bwd_vs_sonicmoe and
  leaves step_vs_sonicmoe, the training step's ratio, where forward+backward puts it."""
  from experiments.bench_layer_configs import CONFIGS, finish, flops
  name = "T40960-d768-n256-E128-k8"
  shape, sonic = CONFIGS[name]
  f_fwd, f_bwd = flops(shape)
  fwd_ms, bwd_ms = f_fwd / (sonic[0] * 1e9), f_bwd / (sonic[1] * 1e9)
  row = finish({"fwd_ms": fwd_ms, "fwdbwd_ms": fwd_ms + bwd_ms}, name, shape, sonic)
  for key in ("fwd_vs_sonicmoe", "bwd_vs_sonicmoe", "step_vs_sonicmoe"):
    assert abs(row[key] - 1.0) < 1e-9, (key, row[key])
  row = finish({"fwd_ms": fwd_ms / 2, "fwdbwd_ms": fwd_ms + bwd_ms}, name, shape, sonic)
  assert abs(row["fwd_vs_sonicmoe"] - 2.0) < 1e-9 and row["bwd_vs_sonicmoe"] < 1.0
  assert abs(row["step_vs_sonicmoe"] - 1.0) < 1e-9
