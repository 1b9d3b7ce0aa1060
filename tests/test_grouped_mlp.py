"""grouped_mlp and grouped_glu (expert MLPs with the activation in the products' epilogues) and
the Mosaic kernel's epilogues: against float32 references and the separate passes, in interpret
mode on CPU, lowered for an H100, and their argument checks."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close

import kernels
from kernels.activations import ACTIVATIONS
from kernels.common.gpu_lowering import lower_for_gpu
from kernels.gmm import mosaic, mosaic_common, mosaic_kernel, mosaic_ws_kernel
from kernels.gmm.epilogue import (
    Epilogue, activation_grad_tile, activation_tile, deinterleave, interleave)
from kernels.gmm.reference import gmm_reference
from kernels.gmm.shapes import GroupedShape, dtypes
from kernels.hidden import hidden, hidden_packed

ACTS = tuple(ACTIVATIONS)
# (M, sizes) with d = 128, f = 256 (the warp-specialized kernel's default 128 x 256 CTA tile):
# an empty group and rows past sum(sizes); one group taking every row, M not a multiple of 8.
CASES = {"ragged_tail": (150, [30, 0, 70, 10]), "one_group_all": (77, [0, 77, 0, 0])}
D, F = 128, 256


@pytest.fixture
def two_sms(monkeypatch):
  """Two SMs: each walks several tiles (and the interpreter runs fewer idle threads)."""
  monkeypatch.setattr(mosaic_common, "num_sms", lambda: 2)


def _no_interpret_races() -> bool:
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

  return not gpu_callbacks.get_races().races_found


def _inputs(m, sizes, dtype=jnp.bfloat16, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, D)), dtype)
  w_in = jnp.asarray(rng.standard_normal((len(sizes), D, F)) / np.sqrt(D), dtype)
  w_out = jnp.asarray(rng.standard_normal((len(sizes), F, D)) / np.sqrt(F), dtype)
  probe = jnp.asarray(rng.standard_normal((m, D)), jnp.float32)
  return x, w_in, w_out, jnp.asarray(sizes, jnp.int32), probe


def _reference(x, w_in, w_out, gs, activation):
  h = ACTIVATIONS[activation](gmm_reference(x, w_in, gs, out_dtype=jnp.float32))
  return gmm_reference(h, w_out, gs, out_dtype=jnp.float32)


def _separate(x, w_in, w_out, gs, activation, backend):
  """The grouped impl's path without the fused op (jaxmoe.experts.expert_mlp)."""
  h = kernels.grouped_matmul(x, w_in, gs, backend=backend)
  a = hidden(ACTIVATIONS[activation], h).astype(x.dtype)
  return kernels.grouped_matmul(a, w_out, gs, backend=backend)


def _value_and_grads(fn, x, w_in, w_out, probe):
  y, vjp = jax.vjp(fn, x, w_in, w_out)
  return (y, *vjp(probe.astype(y.dtype)))


# ---------------------------------------------------------------------------------------------
# The op on the xla backend (separate passes of the epilogues).


@pytest.mark.parametrize("activation", ACTS)
def test_xla_matches_reference_and_separate_passes(activation):
  m, sizes = CASES["ragged_tail"]
  x, w_in, w_out, gs, probe = _inputs(m, sizes)
  fused = functools.partial(kernels.grouped_mlp, group_sizes=gs, activation=activation,
                            backend="xla")
  got = _value_and_grads(lambda x, a, b: fused(x, a, b), x, w_in, w_out, probe)
  sep = _value_and_grads(lambda x, a, b: _separate(x, a, b, gs, activation, "xla"),
                         x, w_in, w_out, probe)
  f32 = lambda a: a.astype(jnp.float32)
  want = _value_and_grads(lambda x, a, b: _reference(x, a, b, gs, activation),
                          f32(x), f32(w_in), f32(w_out), probe)
  for name, g, s, w in zip(("y", "dx", "dw_in", "dw_out"), got, sep, want):
    chex.assert_equal_shape([g, s])
    chex.assert_type(g, jnp.bfloat16)
    assert_close(g, w, jnp.bfloat16, name=f"{name} vs reference")
    # The same function as the separate passes; only the activation's float32 form differs.
    assert_close(g, s, jnp.bfloat16, factor=0.5, name=f"{name} vs separate passes")
  np.testing.assert_array_equal(np.asarray(got[0][sum(sizes):], np.float32), 0.0)


@pytest.mark.parametrize("backend", ["xla", pytest.param("mosaic_interpret", marks=pytest.mark.slow)])
def test_keep_activation_false_same_values_less_kept(two_sms, backend):
  """keep_activation=False: the backward writes a = act(h) again (Epilogue
  "activation_grad_value") instead of keeping it: the same output and gradients, bit for bit, and
  one (M, f) residual fewer."""
  m, sizes = CASES["ragged_tail"]
  x, w_in, w_out, gs, probe = _inputs(m, sizes)
  fn = lambda keep: jax.jit(functools.partial(_value_and_grads, lambda x, a, b: kernels.grouped_mlp(
      x, a, b, gs, activation="gelu_tanh", backend=backend, keep_activation=keep)))  # noqa: E731
  for name, g, w in zip(("y", "dx", "dw_in", "dw_out"), fn(False)(x, w_in, w_out, probe),
                        fn(True)(x, w_in, w_out, probe)):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                  err_msg=name)
  if backend != "xla":
    assert _no_interpret_races()
  hidden_sized = lambda keep: sum(
      tuple(r.shape) == (m, F) for r in jax.tree.leaves(jax.vjp(lambda x: kernels.grouped_mlp(
          x, w_in, w_out, gs, activation="gelu_tanh", backend="xla", keep_activation=keep),
          x)[1]) if hasattr(r, "shape"))
  assert (hidden_sized(True), hidden_sized(False)) == (2, 1)


def test_the_activation_can_be_given_as_a_function():
  m, sizes = CASES["ragged_tail"]
  x, w_in, w_out, gs, _ = _inputs(m, sizes)
  by_fn = kernels.grouped_mlp(x, w_in, w_out, gs, activation=jax.nn.gelu, backend="xla")
  by_name = kernels.grouped_mlp(x, w_in, w_out, gs, activation="gelu_tanh", backend="xla")
  np.testing.assert_array_equal(np.asarray(by_fn, np.float32), np.asarray(by_name, np.float32))


# ---------------------------------------------------------------------------------------------
# The Mosaic kernels in interpret mode.


@pytest.mark.parametrize("case", list(CASES))
def test_mosaic_interpret_matches_reference(two_sms, case):
  """The fused forward and backward (both epilogues run: default tiles, 128 x 256) against the
  float32 reference: output, the three gradients, zero rows past the groups, no races."""
  m, sizes = CASES[case]
  x, w_in, w_out, gs, probe = _inputs(m, sizes)
  got = jax.jit(functools.partial(_value_and_grads, lambda x, a, b: kernels.grouped_mlp(
      x, a, b, gs, activation="gelu_tanh", backend="mosaic_interpret")))(x, w_in, w_out, probe)
  assert _no_interpret_races()
  f32 = lambda a: a.astype(jnp.float32)
  want = _value_and_grads(lambda x, a, b: _reference(x, a, b, gs, "gelu_tanh"),
                          f32(x), f32(w_in), f32(w_out), probe)
  for name, g, w in zip(("y", "dx", "dw_in", "dw_out"), got, want):
    assert np.all(np.isfinite(np.asarray(g, np.float32))), f"{name}: non-finite (unwritten rows)"
    assert_close(g, w, jnp.bfloat16, name=name)
  used = min(sum(sizes), m)
  for name, g in (("y", got[0]), ("dx", got[1])):
    np.testing.assert_array_equal(np.asarray(g[used:], np.float32), 0.0, err_msg=name)


@pytest.mark.parametrize("activation", ["gelu_tanh", "silu"])
def test_mosaic_epilogues_equal_their_separate_passes(two_sms, activation):
  """The kernel's outputs against Epilogue.apply on the kernel's own plain product: the pre-
  activation bit for bit, the activation and its gradient to float32 rounding."""
  m, sizes = CASES["ragged_tail"]
  x, w_in, w_out, gs, _ = _inputs(m, sizes)
  dy = jnp.asarray(np.random.default_rng(1).standard_normal((m, D)), jnp.bfloat16)
  run = functools.partial(mosaic_ws_kernel.gmm, out_dtype=jnp.bfloat16, interpret=True)
  h, a = run(x, w_in, gs, transpose_rhs=False, epilogue=Epilogue("activation", activation))
  h_plain = run(x, w_in, gs, transpose_rhs=False)
  np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h_plain, np.float32))
  assert_close(a, activation_tile(activation, h_plain), jnp.bfloat16, factor=0.1, name="act")
  dh = run(dy, w_out, gs, transpose_rhs=True, epilogue=Epilogue("activation_grad", activation),
           residual=h)
  da = run(dy, w_out, gs, transpose_rhs=True)
  assert_close(dh, activation_grad_tile(activation, h, da), jnp.bfloat16, factor=0.1, name="dh")
  dh2, a2 = run(dy, w_out, gs, transpose_rhs=True,
                epilogue=Epilogue("activation_grad_value", activation), residual=h)
  assert_close(dh2, activation_grad_tile(activation, h, da), jnp.bfloat16, factor=0.1, name="dh2")
  # The activation from h read back equals the forward epilogue's, computed from the same values.
  used = sum(CASES["ragged_tail"][1])
  np.testing.assert_array_equal(np.asarray(a2[:used], np.float32), np.asarray(a[:used], np.float32))
  assert _no_interpret_races()


# ---------------------------------------------------------------------------------------------
# Lowering for an H100 from CPU: every activation's forms must lower in both epilogues (the
# Mosaic GPU lowering lacks some primitives that autodiff emits, e.g. add_any and x ** -2).


@pytest.mark.parametrize("activation", ACTS)
def test_epilogues_lower_for_gpu(activation):
  sds = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
  m, g = 1024, 8
  up = functools.partial(mosaic_ws_kernel.gmm, transpose_rhs=False, out_dtype=jnp.bfloat16,
                         epilogue=Epilogue("activation", activation))
  assert lower_for_gpu(up, sds(m, 512), sds(g, 512, 1024), sds(g, dtype=jnp.int32))
  for kind in ("activation_grad", "activation_grad_value"):
    config = mosaic.gmm_epilogue_config(GroupedShape(m, 512, 1024, g), dtypes(jnp.bfloat16), None,
                                        Epilogue(kind, activation))
    grad = functools.partial(mosaic_ws_kernel.gmm, transpose_rhs=True, out_dtype=jnp.bfloat16,
                             epilogue=Epilogue(kind, activation), config=config)
    assert lower_for_gpu(lambda a, b, c, h: grad(a, b, c, residual=h), sds(m, 512),
                         sds(g, 1024, 512), sds(g, dtype=jnp.int32), sds(m, 1024)), kind


# ---------------------------------------------------------------------------------------------
# Argument checks.


def test_epilogue_rejects_unknown_kind_and_activation():
  with pytest.raises(ValueError, match=r"kind must be one of \('activation', 'activation_grad', "
                     r"'activation_grad_value', 'glu', 'glu_grad'\), got 'softmax'"):
    Epilogue("softmax", "relu")
  with pytest.raises(ValueError, match="activation must be one of .*got 'tanh'"):
    Epilogue("activation", "tanh")


def test_kernel_rejects_a_missing_or_misshapen_residual():
  x, w_in, _, gs, _ = _inputs(*CASES["ragged_tail"])
  grad = Epilogue("activation_grad", "relu")
  with pytest.raises(ValueError, match="residual: given exactly when the epilogue takes one"):
    mosaic_ws_kernel.gmm(x, w_in, gs, transpose_rhs=False, out_dtype=jnp.bfloat16, epilogue=grad)
  with pytest.raises(ValueError, match=r"residual: must have shape \(150, 256\)"):
    mosaic_ws_kernel.gmm(x, w_in, gs, transpose_rhs=False, out_dtype=jnp.bfloat16, epilogue=grad,
                         residual=jnp.zeros((150, 128), jnp.bfloat16))


def test_an_epilogue_needs_the_warp_specialized_kernel():
  x, w_in, _, gs, _ = _inputs(*CASES["ragged_tail"])
  with pytest.raises(ValueError, match="config must be a MosaicWsGmmConfig, got MosaicGmmConfig"):
    mosaic.gmm(x, w_in, gs, transpose_rhs=False, out_dtype=jnp.bfloat16,
               config=mosaic_kernel.MosaicGmmConfig(), epilogue=Epilogue("activation", "relu"))


@pytest.mark.parametrize("change,match", [
    (dict(activation="tanh"), "activation must be one of .*got 'tanh'"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(w_out=jnp.zeros((4, F, D + 1), jnp.bfloat16)), r"w_out: must have shape \(G, f, d\)"),
    (dict(w_in=jnp.zeros((4, D + 1, F), jnp.bfloat16)), r"w_in: must have shape \(G, d=128, f\)"),
    (dict(w_out=jnp.zeros((4, F, D), jnp.float32)), "operands must share one dtype"),
    (dict(group_sizes=jnp.zeros((3,), jnp.int32)), r"group_sizes must have shape \(4,\)"),
    (dict(x=jnp.zeros((150,), jnp.bfloat16)), "x must have 2 dimensions"),
])
def test_grouped_mlp_rejects_bad_arguments(change, match):
  x, w_in, w_out, gs, _ = _inputs(*CASES["ragged_tail"])
  args = dict(x=x, w_in=w_in, w_out=w_out, group_sizes=gs, activation="relu", backend="xla")
  args.update(change)
  with pytest.raises(ValueError, match=match):
    kernels.grouped_mlp(**args)


# ---------------------------------------------------------------------------------------------
# grouped_glu: the interleaved gate/up product with the GLU epilogues.


def _glu_inputs(m, sizes, dtype=jnp.bfloat16, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, D)), dtype)
  w_gate, w_up = (jnp.asarray(rng.standard_normal((len(sizes), D, F)) / np.sqrt(D), dtype)
                  for _ in range(2))
  w_out = jnp.asarray(rng.standard_normal((len(sizes), F, D)) / np.sqrt(F), dtype)
  probe = jnp.asarray(rng.standard_normal((m, D)), jnp.float32)
  return x, (w_gate, w_up, w_out), jnp.asarray(sizes, jnp.int32), probe


def _glu_reference(x, w_gate, w_up, w_out, gs, activation):
  g = gmm_reference(x, w_gate, gs, out_dtype=jnp.float32)
  u = gmm_reference(x, w_up, gs, out_dtype=jnp.float32)
  return gmm_reference(ACTIVATIONS[activation](g) * u, w_out, gs, out_dtype=jnp.float32)


def _glu_outputs(fn, x, ws, probe):
  y, vjp = jax.vjp(fn, x, *ws)
  return (y, *vjp(probe.astype(y.dtype)))


def test_interleave_round_trip_and_layout():
  gate = jnp.arange(2 * 256, dtype=jnp.float32).reshape(2, 256)
  gu = interleave(gate, -gate)
  chex.assert_shape(gu, (2, 512))
  # Units of 64 columns: gate 0..63, up 0..63, gate 64..127, ...
  np.testing.assert_array_equal(gu[0, 64:128], -gate[0, :64])
  np.testing.assert_array_equal(gu[0, 128:192], gate[0, 64:128])
  g, u = deinterleave(gu)
  np.testing.assert_array_equal(g, gate)
  np.testing.assert_array_equal(u, -gate)
  with pytest.raises(ValueError, match="multiple of 64"):
    interleave(jnp.zeros((2, 96)), jnp.zeros((2, 96)))


@pytest.mark.parametrize("backend", ["xla", "mosaic_interpret"])
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_glu_matches_reference_and_separate_passes(two_sms, backend, case):
  """Output and the four gradients against the float32 reference and against the grouped impl's
  separate path (gate and up as one product, kernels.hidden_packed, the down product); rows past
  the groups zero; no races in the interpreted kernels."""
  m, sizes = CASES[case]
  x, ws, gs, probe = _glu_inputs(m, sizes)
  got = jax.jit(functools.partial(_glu_outputs, lambda x, wg, wu, wo: kernels.grouped_glu(
      x, wg, wu, wo, gs, activation="silu", backend=backend)))(x, ws, probe)
  if backend.endswith("interpret"):
    assert _no_interpret_races()

  def separate(x, wg, wu, wo):
    gu = kernels.grouped_matmul(x, (wg, wu), gs, backend="xla")
    return kernels.grouped_matmul(hidden_packed(jax.nn.silu, gu).astype(x.dtype), wo, gs,
                                  backend="xla")

  sep = _glu_outputs(separate, x, ws, probe)
  f32 = lambda a: a.astype(jnp.float32)
  want = _glu_outputs(lambda x, wg, wu, wo: _glu_reference(x, wg, wu, wo, gs, "silu"),
                      f32(x), tuple(map(f32, ws)), probe)
  for name, g, s_, w in zip(("y", "dx", "dw_gate", "dw_up", "dw_out"), got, sep, want):
    assert np.all(np.isfinite(np.asarray(g, np.float32))), f"{name}: non-finite"
    assert_close(g, w, jnp.bfloat16, name=f"{name} vs reference")
    assert_close(g, s_, jnp.bfloat16, factor=0.5, name=f"{name} vs separate passes")
  used = min(sum(sizes), m)
  for name, g in (("y", got[0]), ("dx", got[1])):
    np.testing.assert_array_equal(np.asarray(g[used:], np.float32), 0.0, err_msg=name)


def test_mosaic_glu_epilogues_equal_their_separate_passes(two_sms):
  """The GLU kernels' outputs against Epilogue.apply on the kernel's own plain products."""
  m, sizes = CASES["ragged_tail"]
  x, (w_gate, w_up, w_out), gs, _ = _glu_inputs(m, sizes)
  dy = jnp.asarray(np.random.default_rng(1).standard_normal((m, D)), jnp.bfloat16)
  cfg = mosaic_ws_kernel.MosaicWsGmmConfig(block_n=128, epi_cols=64)
  run = functools.partial(mosaic_ws_kernel.gmm, out_dtype=jnp.bfloat16, config=cfg,
                          interpret=True)
  w_gu = interleave(w_gate, w_up)
  gu, a = run(x, w_gu, gs, transpose_rhs=False, epilogue=Epilogue("glu", "silu"))
  gu_plain = run(x, w_gu, gs, transpose_rhs=False)
  np.testing.assert_array_equal(np.asarray(gu, np.float32), np.asarray(gu_plain, np.float32))
  chex.assert_shape(a, (m, F))
  assert_close(a, Epilogue("glu", "silu").apply(gu_plain)[1], jnp.bfloat16, factor=0.1, name="a")
  dgu = run(dy, w_out, gs, transpose_rhs=True, epilogue=Epilogue("glu_grad", "silu"), residual=gu)
  chex.assert_shape(dgu, (m, 2 * F))
  da = run(dy, w_out, gs, transpose_rhs=True)
  assert_close(dgu, Epilogue("glu_grad", "silu").apply(da, gu), jnp.bfloat16, factor=0.1,
               name="d(gu)")
  assert _no_interpret_races()


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_glu_epilogues_lower_for_gpu(activation):
  sds = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
  m, g, f = 1024, 8, 256
  cfg = mosaic_ws_kernel.MosaicWsGmmConfig(block_n=128, epi_cols=64)
  up = functools.partial(mosaic_ws_kernel.gmm, transpose_rhs=False, out_dtype=jnp.bfloat16,
                         config=cfg, epilogue=Epilogue("glu", activation))
  assert lower_for_gpu(up, sds(m, 512), sds(g, 512, 2 * f), sds(g, dtype=jnp.int32))
  grad = functools.partial(mosaic_ws_kernel.gmm, transpose_rhs=True, out_dtype=jnp.bfloat16,
                           config=cfg, epilogue=Epilogue("glu_grad", activation))
  assert lower_for_gpu(lambda a, b, c, h: grad(a, b, c, residual=h), sds(m, 512),
                       sds(g, f, 512), sds(g, dtype=jnp.int32), sds(m, 2 * f))


def test_glu_epilogue_needs_one_unit_pair_per_warpgroup():
  x, (w_gate, w_up, _), gs, _ = _glu_inputs(*CASES["ragged_tail"])
  with pytest.raises(ValueError, match="a GLU epilogue needs block_n=128 .* and epi_cols=64"):
    mosaic_ws_kernel.gmm(x, interleave(w_gate, w_up), gs, transpose_rhs=False,
                         out_dtype=jnp.bfloat16, epilogue=Epilogue("glu", "silu"))


@pytest.mark.parametrize("change,match", [
    (dict(w_up=jnp.zeros((4, D, F + 64), jnp.bfloat16)), "w_up: must have w_gate's shape"),
    (dict(w_gate=jnp.zeros((4, D, 96), jnp.bfloat16), w_up=jnp.zeros((4, D, 96), jnp.bfloat16)),
     r"w_gate: must have shape \(G, d=128, f\) with f a multiple of 64"),
    (dict(w_out=jnp.zeros((4, D, F), jnp.bfloat16)), r"w_out: must have shape \(G, f, d\)"),
    (dict(activation="swiglu"), "activation must be one of .*got 'swiglu'"),
])
def test_grouped_glu_rejects_bad_arguments(change, match):
  x, (w_gate, w_up, w_out), gs, _ = _glu_inputs(*CASES["ragged_tail"])
  args = dict(x=x, w_gate=w_gate, w_up=w_up, w_out=w_out, group_sizes=gs, activation="silu",
              backend="xla")
  args.update(change)
  with pytest.raises(ValueError, match=match):
    kernels.grouped_glu(**args)


@pytest.mark.parametrize("kind", ["mlp", "glu"])
def test_benchmark_smoke(tmp_path, kind):
  """experiments/bench_grouped_mlp's CPU smoke run: its fused-vs-separate check passes and it
  writes its JSON."""
  import json

  from experiments import bench_grouped_mlp

  assert bench_grouped_mlp.main(["--smoke", "--kind", kind, "--out", str(tmp_path), "--iters",
                                 "1", "--rounds", "1"]) == 0
  (path,) = tmp_path.glob(f"*/*-grouped-{kind}.json")   # <device>/<date>-grouped-<kind>.json
  payload = json.loads(path.read_text())
  assert payload["checks"]["smoke"]["pass"] and payload["kind"] == kind
  impls = ("separate", "fused") + (("fused_keep_h",) if kind == "mlp" else ())
  assert {(r["impl"], r["remat"]) for r in payload["results"]} == {
      (impl, remat) for impl in impls for remat in (False, True)}
