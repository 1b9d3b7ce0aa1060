"""kernels.top_k: the Triton kernel (in the Pallas interpreter) chooses exactly as jax.lax.top_k
(ties, -inf rows, rows with fewer than k finite scores, NaN and signed zeros, E off the powers of
two, k = 1 and k = E, T off the row block); values and their gradients equal lax.top_k's; bad
arguments are ValueErrors naming them; the kernel lowers for an H100 from CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.topk import TOPK_BACKENDS, TopKShape, TritonTopKConfig
from kernels.topk import triton as topk_triton

INTERPRET = "triton_interpret"
# block_t = 8 over T = 37 rows: five programs, the last one four rows short.
SMALL_BLOCK = TritonTopKConfig(block_t=8)


def _scores(rng, t: int, e: int, k: int) -> np.ndarray:
  """Random float32 scores with the router's hard rows: ties, all -inf, fewer than k finite."""
  x = rng.standard_normal((t, e)).astype(np.float32)
  x[1] = np.round(x[1])                               # a handful of values, many ties
  x[2] = -np.inf                                      # a whole row masked out
  x[3, :] = -np.inf
  x[3, rng.choice(e, size=max(0, k - 1), replace=False)] = 1.0   # k - 1 finite scores
  x[4] = 0.5                                          # every lane equal
  x[5, ::2] = -np.inf                                 # half the lanes masked (group-limited)
  return x


def _assert_same(got, want, name=""):
  gv, gi = got
  wv, wi = want
  assert gi.dtype == jnp.int32 and gv.dtype == wv.dtype, name
  np.testing.assert_array_equal(np.asarray(gi), np.asarray(wi), err_msg=f"{name} indices")
  np.testing.assert_array_equal(np.asarray(gv), np.asarray(wv), err_msg=f"{name} values")


@pytest.mark.parametrize("t, e, k", [(37, 6, 1), (37, 6, 6), (37, 60, 7), (37, 128, 8),
                                     (9, 1, 1), (12, 32, 32), (37, 256, 16)])
def test_kernel_chooses_as_lax_top_k(rng, t, e, k):
  x = jnp.asarray(_scores(rng, t, e, k))
  want = kernels.topk.top_k_reference(x, k)
  _assert_same(kernels.top_k(x, k, backend=INTERPRET), want, "default config")
  _assert_same(kernels.top_k(x, k, backend=INTERPRET, config=SMALL_BLOCK), want, "block_t=8")


def test_nan_and_signed_zeros_rank_as_lax_top_k():
  """lax.top_k (CPU) ranks scores in XLA's float total order: +NaN above +inf (payload order
  among NaNs), -NaN below -inf, +0 above -0. The kernel's int32 keys follow the same order."""
  bits = np.array([[0x7FC00000, 0x7FC00001, 0x7F800000, 0xFFC00000, 0x00000000, 0x80000000],
                   [0x80000000, 0x00000000, 0x80000000, 0x00000000, 0xFF800000, 0xFFC00001]],
                  np.uint32)
  x = jnp.asarray(bits.view(np.float32))
  want = kernels.topk.top_k_reference(x, 6)
  np.testing.assert_array_equal(want[1][0], [1, 0, 2, 4, 5, 3])   # the order the kernel matches
  got = kernels.top_k(x, 6, backend=INTERPRET)
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
  np.testing.assert_array_equal(np.asarray(got[0]).view(np.uint32),
                                np.asarray(want[0]).view(np.uint32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_scores(rng, dtype):
  x = jnp.asarray(_scores(rng, 20, 24, 5)).astype(dtype)   # bfloat16 rounding adds ties
  _assert_same(kernels.top_k(x, 5, backend=INTERPRET, config=SMALL_BLOCK),
               kernels.topk.top_k_reference(x, 5), jnp.dtype(dtype).name)


def test_values_differentiate_as_lax_top_k(rng):
  t, e, k = 21, 10, 3
  x = jnp.asarray(np.round(rng.standard_normal((t, e)), 1), jnp.float32)   # ties
  probe = jnp.asarray(rng.standard_normal((t, k)), jnp.float32)
  tangent = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)

  def loss(top_k):
    return lambda x: jnp.sum(top_k(x)[0] * probe)

  ours = lambda x: kernels.top_k(x, k, backend=INTERPRET, config=SMALL_BLOCK)
  ref = lambda x: jax.lax.top_k(x, k)
  want_val, want_grad = jax.jit(jax.value_and_grad(loss(ref)))(x)   # both jitted: one sum order
  got_val, got_grad = jax.jit(jax.value_and_grad(loss(ours)))(x)
  np.testing.assert_array_equal(got_val, want_val)
  np.testing.assert_array_equal(got_grad, want_grad)
  assert np.count_nonzero(got_grad) == t * k
  np.testing.assert_array_equal(jax.jvp(lambda x: ours(x)[0], (x,), (tangent,))[1],
                                jax.jvp(lambda x: ref(x)[0], (x,), (tangent,))[1])


def test_default_backend_is_xla_on_cpu(rng):
  x = jnp.asarray(_scores(rng, 8, 16, 4))
  assert TOPK_BACKENDS.select(None, TopKShape(8, 16, 4), (x.dtype,)).name == "xla"
  _assert_same(kernels.top_k(x, 4), kernels.topk.top_k_reference(x, 4))


def test_pallas_runs_the_kernel_up_to_its_expert_bound():
  f32 = (jnp.dtype(jnp.float32),)
  for e in (2, 128, 384, topk_triton.MAX_EXPERTS):
    assert TOPK_BACKENDS.select("pallas", TopKShape(4096, e, 2), f32).name == "triton", e
  assert TOPK_BACKENDS.select("pallas", TopKShape(4096, topk_triton.MAX_EXPERTS + 1, 2),
                              f32).name == "xla"
  # The default configs never exceed the register bound the check enforces.
  for e in (1, 6, 60, 128, 1000, 1024):
    for k in (1, min(e, topk_triton.LARGE_K)):
      shape = TopKShape(40960, e, k)
      assert topk_triton.check(shape, f32, topk_triton.default_config(shape, f32)) is None, e
  # From k = LARGE_K: a quarter of the scores per program, at 8 warps (4 rows of 256 experts).
  assert topk_triton.default_config(TopKShape(32768, 256, 16), f32) == TritonTopKConfig(4, 8)
  assert topk_triton.default_config(TopKShape(32768, 256, 8), f32) == TritonTopKConfig(16, 4)


@pytest.mark.parametrize("call, match", [
    (lambda: kernels.top_k(jnp.ones((8,)), 1), "x must have 2 dimensions"),
    (lambda: kernels.top_k(jnp.ones((4, 8), jnp.int32), 1), "x must be one of float32"),
    (lambda: kernels.top_k(jnp.ones((4, 0)), 1), r"x must have at least one column"),
    (lambda: kernels.top_k(jnp.ones((4, 8)), 0), r"k must be in \[1, E=8\].*got 0"),
    (lambda: kernels.top_k(jnp.ones((4, 8)), 9), r"k must be in \[1, E=8\].*got 9"),
    (lambda: kernels.top_k(jnp.ones((4, 8)), 2.0), r"k must be an int.*got 2.0"),
    (lambda: kernels.top_k(jnp.ones((4, 8)), True), r"k must be an int.*got True"),
    (lambda: kernels.top_k(jnp.ones((4, 8)), 2, backend="cuda"),
     r"backend must be one of .*'triton'.*got 'cuda'"),
    (lambda: kernels.top_k(jnp.ones((4, 8)), 2, backend="xla", config=SMALL_BLOCK),
     r"config must be one of \[\] for backend 'xla'"),
    (lambda: kernels.top_k(jnp.ones((4, 2048)), 2, backend=INTERPRET), r"E <= 1024"),
    (lambda: TritonTopKConfig(block_t=3), r"config.block_t must be a power of two"),
])
def test_bad_arguments_are_named(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_lowers_for_h100():
  """Forward and the values' gradient lower through Triton for an H100 (no GPU needed): float32
  at the router's shape and bfloat16 at the largest E the kernel takes."""
  from kernels.common.gpu_lowering import lower_for_gpu

  s = jax.ShapeDtypeStruct
  loss = lambda x: jnp.sum(kernels.top_k(x, 8, backend="triton")[0].astype(jnp.float32))
  assert lower_for_gpu(jax.grad(loss), s((40960, 128), jnp.float32)).count("jaxmoe_top_k") >= 1
  text = lower_for_gpu(lambda x: kernels.top_k(x, 16, backend="triton"),
                       s((1000, topk_triton.MAX_EXPERTS - 24), jnp.bfloat16))
  assert text.count("jaxmoe_top_k") >= 1


def test_bench_topk_quick(tmp_path):
  """experiments.bench_topk --quick: the interpreted kernel checked on every score set and timed
  against lax.top_k; the JSON names the device and holds every row."""
  import json

  from experiments import bench_topk

  path = bench_topk.main(["--quick", "--out", str(tmp_path)])
  result = json.loads(open(path).read())
  assert path.endswith("-topk.json") and result["backend"] == INTERPRET
  assert len(result["checks"]) == 4 * len(bench_topk.QUICK_SHAPES)
  assert all(c["pass"] and c["rows_differing"] == 0 for c in result["checks"])
  assert [r["T"] for r in result["timings"]] == [t for t, _, _ in bench_topk.QUICK_SHAPES]
  assert all(r["kernel_us"] > 0 and r["lax_us"] > 0 for r in result["timings"])
