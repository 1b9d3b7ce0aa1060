"""kernels.gather_sum: the Triton kernel (in the Pallas interpreter) equals the XLA reference
(weighted and not, k = 1 to 16, T and N off the blocks, bf16 and float32, float32 output from
bf16 rows); a position outside [0, M) makes its row NaN on every backend; the gradients match
autodiff of the reference; the scatter op's grouped-kernel path and the dispatch gather's
gradient use it; bad arguments are ValueErrors naming them; the kernel lowers for an H100."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from jaxmoe import dispatch
from kernels.combine import COMBINE_BACKENDS, CombineShape, TritonCombineConfig, gather_sum
from kernels.combine import gather_sum_reference
from kernels.combine import triton as combine_triton

INTERPRET = "triton_interpret"
# 8 rows x 64 columns per program: T = 37 and N = 70 leave partial blocks on both axes.
SMALL = TritonCombineConfig(block_t=8, block_n=64)


def _operands(rng, t, k, n, dtype, m=None):
  """rows (M, N), positions a permutation of [0, M) as (T, k) (M = T k) or k draws from
  [0, m) per row, gates (T, k) float32."""
  if m is None:
    m = t * k
    positions = rng.permutation(m).reshape(t, k)
  else:
    positions = rng.integers(0, m, (t, k))
  rows = jnp.asarray(rng.standard_normal((m, n)), jnp.float32).astype(dtype)
  gates = jnp.asarray(rng.uniform(size=(t, k)), jnp.float32)
  return rows, jnp.asarray(positions, jnp.int32), gates


@pytest.mark.parametrize("t, k, n, dtype", [(37, 3, 70, jnp.bfloat16), (37, 8, 256, jnp.bfloat16),
                                            (5, 1, 300, jnp.float32), (16, 16, 64, jnp.float16)])
@pytest.mark.parametrize("weighted", [False, True])
def test_kernel_equals_reference(rng, t, k, n, dtype, weighted):
  rows, positions, gates = _operands(rng, t, k, n, dtype)
  w = gates if weighted else None
  want = gather_sum_reference(rows, positions, w)
  for cfg in (None, SMALL):
    got = gather_sum(rows, positions, w, backend=INTERPRET, config=cfg)
    assert got.dtype == rows.dtype and got.shape == (t, n)
    # Same float32 terms added in the same order: equal, not just close.
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_repeated_positions_and_float32_output(rng):
  """Positions need not be a permutation (M != T k, repeats); out_dtype float32 keeps the
  float32 sum of bf16 rows unrounded."""
  rows, positions, gates = _operands(rng, 21, 4, 96, jnp.bfloat16, m=13)
  want = gather_sum_reference(rows, positions, gates, out_dtype=jnp.float32)
  got = gather_sum(rows, positions, gates, out_dtype=jnp.float32, backend=INTERPRET,
                   config=SMALL)
  assert got.dtype == jnp.float32
  # XLA's einsum may add the k float32 terms in another order: close, not equal.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  manual = sum(np.asarray(rows, np.float32)[np.asarray(positions)[:, j]]
               * np.asarray(gates)[:, j:j + 1] for j in range(4))
  np.testing.assert_allclose(np.asarray(got), manual, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["xla", INTERPRET])
def test_out_of_range_position_gives_nan_row(rng, backend):
  rows, positions, gates = _operands(rng, 10, 2, 64, jnp.float32)
  bad = positions.at[3, 1].set(-1).at[7, 0].set(rows.shape[0])
  got = np.asarray(gather_sum(rows, bad, gates, backend=backend))
  assert np.isnan(got[3]).all() and np.isnan(got[7]).all()
  good = np.delete(np.arange(10), [3, 7])
  np.testing.assert_allclose(got[good], np.asarray(gather_sum_reference(rows, positions,
                                                                        gates))[good],
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_gradients_match_autodiff_of_reference(rng, weighted):
  rows, positions, gates = _operands(rng, 9, 3, 40, jnp.float32, m=11)   # repeated positions
  probe = jnp.asarray(rng.standard_normal((9, 40)), jnp.float32)

  def loss(fn, r, g):
    return jnp.sum(fn(r, positions, g if weighted else None) * probe)

  want = jax.grad(lambda r, g: loss(gather_sum_reference, r, g), (0, 1))(rows, gates)
  for backend in ("xla", INTERPRET):
    got = jax.grad(lambda r, g: loss(lambda *a: gather_sum(*a, backend=backend), r, g),
                   (0, 1))(rows, gates)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1] if weighted else 0.0, rtol=1e-6, atol=1e-6)


def test_dispatch_gather_gradient_sums_each_tokens_rows(rng):
  """gather_sorted's gradient (gather_sum over the sorted positions) equals jnp.take's."""
  t, k, e, d = 23, 3, 5, 16
  idx = jnp.asarray(rng.integers(0, e, (t, k)), jnp.int32)
  sort = dispatch.sort_by_expert(idx, e)
  x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  probe = jnp.asarray(rng.standard_normal((t * k, d)), jnp.float32)
  got = jax.grad(lambda x: jnp.sum(dispatch.gather_sorted(x, sort) * probe))(x)
  want = jax.grad(lambda x: jnp.sum(jnp.take(x, sort.token, axis=0) * probe))(x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_scatter_matmul_grouped_path_calls_gather_sum(rng, monkeypatch):
  """On a backend with grouped kernels, the combining product's forward and the gathering
  product's data gradient run through gather_sum, with the values of the "xla" backend."""
  from kernels.scatter import api as scatter_api
  calls = []
  real = scatter_api.gather_sum
  monkeypatch.setattr(scatter_api, "gather_sum",
                      lambda *a, **kw: calls.append(kw["backend"]) or real(*a, **kw))
  t, k, e, d, f = 20, 2, 4, 128, 128
  routing = kernels.sort_slots(jnp.asarray(rng.integers(0, e, (t, k)), jnp.int32), e)
  x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32).astype(jnp.bfloat16)
  w_in = jnp.asarray(rng.standard_normal((e, d, f)) * d ** -0.5, jnp.float32).astype(jnp.bfloat16)
  w_out = jnp.asarray(rng.standard_normal((e, f, d)) * f ** -0.5, jnp.float32).astype(jnp.bfloat16)
  gates = jnp.asarray(rng.uniform(size=(t, k)), jnp.float32)

  def loss(backend, x, w_in, w_out, gates):
    y = kernels.scatter_mlp(x, w_in, w_out, routing, gates, backend=backend)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  want = jax.value_and_grad(loss, (1, 2, 3, 4))("xla", x, w_in, w_out, gates)
  assert calls == []
  got = jax.value_and_grad(loss, (1, 2, 3, 4))("mosaic_interpret", x, w_in, w_out, gates)
  assert calls.count("triton_interpret") == 2, calls   # the combine and the data gradient of x
  np.testing.assert_allclose(got[0], want[0], rtol=2e-2)
  for g, w in zip(got[1], want[1]):
    scale = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               atol=3e-2 * scale)


def test_pallas_picks_the_kernel_where_it_was_faster_and_the_kernel_refuses_past_max_k():
  """"pallas" runs the Triton kernel for bfloat16 rows at k <= 2 (faster than XLA there on the
  H200) and XLA at more picks or float32 rows (kernels/combine/backends.py); the kernel's own
  check refuses more picks than it unrolls."""
  bf, f32 = (jnp.dtype(jnp.bfloat16),) * 2, (jnp.dtype(jnp.float32),) * 2
  select = lambda shape, dtypes: COMBINE_BACKENDS.select("pallas", shape, dtypes).name
  assert select(CombineShape(40960, 2, 81920, 768), bf) == "triton"
  assert select(CombineShape(40960, 1, 40960, 768), bf) == "triton"
  assert select(CombineShape(40960, 4, 163840, 768), bf) == "xla"
  assert select(CombineShape(40960, 8, 327680, 768), bf) == "xla"
  assert select(CombineShape(40960, 2, 81920, 768), f32) == "xla"
  wide = CombineShape(64, combine_triton.MAX_K + 1, 4160, 64)
  why = combine_triton.check(wide, bf, combine_triton.default_config(wide, bf))
  assert why is not None and f"k <= {combine_triton.MAX_K}" in why
  assert combine_triton.check(CombineShape(40960, 8, 327680, 768), bf,
                              combine_triton.default_config(wide, bf)) is None


@pytest.mark.parametrize("call, match", [
    (lambda r, p, g: gather_sum(r.astype(jnp.int32), p), "rows must be one of float32"),
    (lambda r, p, g: gather_sum(r[0], p), "rows must have 2 dimensions"),
    (lambda r, p, g: gather_sum(r, p.astype(jnp.float32)), "positions must be a \\(T, k\\) int32"),
    (lambda r, p, g: gather_sum(r, p[:, :0]), "positions must have at least one pick"),
    (lambda r, p, g: gather_sum(r, p, g[:, :1]), "weights must have the shape of positions"),
    (lambda r, p, g: gather_sum(r, p, g.astype(jnp.int32)), "weights must be one of float32"),
    (lambda r, p, g: gather_sum(r, p, out_dtype=jnp.int32), "out_dtype must be a float dtype"),
    (lambda r, p, g: gather_sum(r, p, out_dtype="nope"), "out_dtype must be a float dtype"),
    (lambda r, p, g: gather_sum(r, p, backend="cuda"), "backend must be one of"),
    (lambda r, p, g: gather_sum(r, p, backend=INTERPRET, config=object()),
     "config must be one of \\['TritonCombineConfig'\\]"),
    (lambda r, p, g: gather_sum(r, p, backend=INTERPRET,
                                config=TritonCombineConfig(block_t=64, block_n=256)),
     "cannot run kernels.gather_sum.*accumulator values per thread"),
])
def test_bad_arguments_name_themselves(rng, call, match):
  rows, positions, gates = _operands(rng, 6, 2, 32, jnp.float32)
  with pytest.raises(ValueError, match=match):
    call(rows, positions, gates)


def test_config_rejects_non_powers_of_two():
  with pytest.raises(ValueError, match="config.block_n must be a power of two"):
    TritonCombineConfig(block_n=96)


def test_lowers_for_h100():
  """Forward with and without weights, bf16 rows, through Triton for an H100 (no GPU needed)."""
  from kernels.common.gpu_lowering import lower_for_gpu
  s = jax.ShapeDtypeStruct
  rows, pos = s((327680, 768), jnp.bfloat16), s((40960, 8), jnp.int32)
  gates = s((40960, 8), jnp.float32)
  for fn, args in ((lambda r, p, g: gather_sum(r, p, g, backend="triton"), (rows, pos, gates)),
                   (lambda r, p: gather_sum(r, p, backend="triton"), (rows, pos))):
    assert "jaxmoe_gather_sum" in lower_for_gpu(fn, *args)


def test_bench_combine_quick(tmp_path):
  """experiments.bench_combine --quick: the interpreted kernel checked (gates, plain sum, bad
  positions) and timed against the XLA reference; the JSON holds every row."""
  import json

  from experiments import bench_combine

  path = bench_combine.main(["--quick", "--out", str(tmp_path)])
  result = json.loads(open(path).read())
  assert path.endswith("-gather-sum.json") and result["backend"] == INTERPRET
  assert len(result["checks"]) == 3 * len(bench_combine.QUICK_SHAPES)
  assert all(c["pass"] for c in result["checks"])
  assert [r["what"] for r in result["timings"]] == ["combine", "sum"]
  assert all(r["kernel_us"] > 0 and r["xla_us"] > 0 for r in result["timings"])
