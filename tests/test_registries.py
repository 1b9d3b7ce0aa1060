"""Every op's backend registry (kernels.REGISTRIES): each registered backend either runs here
(on CPU: "xla" and the interpret backends) and matches the op's reference, or says why not
(`Backend.unavailable`: no GPU, or its check's reason); an unknown name is a ValueError naming the
op's backends; "pallas" resolves to a registered backend; MoEConfig.backend is checked against
the registry of the op its impl runs on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

import kernels
from kernels import blocksparse
from kernels.common import registry
from kernels.gmm import mosaic_common
from kernels.gmm.shapes import GroupedShape, dtypes as make_dtypes
from kernels.combine import CombineShape
from kernels.topk import TopKShape

# (M, K, N): K and N fit the Mosaic kernels' tiles; M and the sizes are not tile multiples, one
# group is empty and rows 85..99 belong to no group.
M, K, N = 100, 128, 256
SIZES = [30, 0, 50, 5]
SHAPE = GroupedShape(M, K, N, len(SIZES))
DT = make_dtypes(jnp.bfloat16)                  # what the scatter op and the choosers are given
DT_F32_OUT = make_dtypes(jnp.bfloat16, jnp.float32)   # the grouped ops below write float32
# The ops whose registries take other shapes than GroupedShape: (shapes, dtypes) by op.
TOPK_SHAPE = (TopKShape(37, 60, 7), (jnp.dtype(jnp.float32),))
COMBINE_SHAPE = (CombineShape(37, 3, 111, 70), (jnp.dtype(jnp.bfloat16),) * 2)
OP_SHAPES = {"top_k": TOPK_SHAPE, "gather_sum": COMBINE_SHAPE}


@pytest.fixture(autouse=True)
def two_sms(monkeypatch):
  """The Mosaic kernels loop over their tiles on 2 SMs (fast in the interpreter)."""
  monkeypatch.setattr(mosaic_common, "num_sms", lambda: 2)


def _config(backend, shape, dtypes):
  """A small config the backend accepts (its smoke search space's first fitting one), else its
  default: small tiles keep the interpreter fast."""
  for cfg in backend.search_space(shape, dtypes, smoke=True):
    if backend.check(shape, dtypes, cfg) is None:
      return cfg
  return backend.default_config(shape, dtypes)


def _runnable(reg, shape, dtypes):
  """The registered backends that run here with their reasons for the others (always a text)."""
  out = []
  for b in reg:
    why = b.unavailable(shape, dtypes, _config(b, shape, dtypes) if b.config_classes else None)
    if why is None:
      out.append(b)
    else:
      assert isinstance(why, str) and why, b.name
  if not registry.on_gpu():
    assert {b.name for b in out} == {b.name for b in reg if not b.needs_gpu}
  return out


@pytest.mark.parametrize("op", list(kernels.REGISTRIES))
def test_unknown_backend_names_the_available_ones(op):
  reg = kernels.REGISTRIES[op]
  with pytest.raises(ValueError, match="backend must be one of .*'xla'.*got 'cuda'"):
    reg.validate("cuda")
  with pytest.raises(ValueError, match="'xla'"):
    reg.get("cuda")
  assert reg.validate(None) == registry.default_backend()
  assert reg.select("pallas", *OP_SHAPES.get(op, (SHAPE, DT))).name in {b.name for b in reg}


def test_blocksparse_has_no_mosaic():
  with pytest.raises(ValueError, match="backends of kernels.blocksparse.*got 'mosaic'"):
    blocksparse.sdd(jnp.ones((16, 8)), jnp.ones((8, 16)),
                    blocksparse.make_topology(jnp.array([16], jnp.int32), 16, ffn_size=16,
                                              block_size=16), backend="mosaic")


def _rand(rng, shape, dtype=jnp.bfloat16, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32).astype(dtype)


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_grouped_matmul_backends(rng, transpose_rhs):
  lhs = _rand(rng, (M, K))
  rhs = _rand(rng, (len(SIZES), N, K) if transpose_rhs else (len(SIZES), K, N), scale=K ** -0.5)
  gs = jnp.asarray(SIZES, jnp.int32)
  want = kernels.gmm_reference(lhs, rhs, gs, transpose_rhs=transpose_rhs, out_dtype=jnp.float32)
  for b in _runnable(kernels.GMM_BACKENDS, SHAPE, DT_F32_OUT):
    kw = {"config": _config(b, SHAPE, DT_F32_OUT)} if b.config_classes else {}
    got = b.fn(lhs, rhs, gs, transpose_rhs=transpose_rhs, out_dtype=jnp.float32, **kw)
    assert np.all(np.isfinite(np.asarray(got))), b.name
    assert_close(got, want, jnp.bfloat16, name=b.name)
    np.testing.assert_array_equal(np.asarray(got)[sum(SIZES):], 0.0)


def test_group_xty_backends(rng):
  x, dy = _rand(rng, (M, K)), _rand(rng, (M, N))
  gs = jnp.asarray(SIZES, jnp.int32)
  want = kernels.group_xty_reference(x, dy, gs, out_dtype=jnp.float32)
  for b in _runnable(kernels.XTY_BACKENDS, SHAPE, DT_F32_OUT):
    kw = {"config": _config(b, SHAPE, DT_F32_OUT)} if b.config_classes else {}
    got = b.fn(x, dy, gs, out_dtype=jnp.float32, **kw)
    assert_close(got, want, jnp.bfloat16, name=b.name)
    np.testing.assert_array_equal(np.asarray(got)[1], 0.0)   # the empty group


def test_scatter_matmul_backends(rng):
  """Token order -> grouped rows (the gathering product) and grouped rows -> combined tokens
  (the grouped product, on the grouped-matmul kernels for "mosaic"), through the public op."""
  t, k, e = 50, 2, 4
  idx = jnp.asarray(rng.integers(0, e - 1, (t, k)), jnp.int32)   # expert 3 gets no rows
  routing = kernels.sort_slots(idx, e)
  x, h = _rand(rng, (t, K)), _rand(rng, (t * k, K))
  w = _rand(rng, (e, K, N), scale=K ** -0.5)
  gates = jnp.asarray(rng.uniform(size=(t, k)), jnp.float32)
  ref = kernels.scatter.scatter_matmul_reference
  want_up = ref(x, w, *routing, y_grouped=True)
  want_down = ref(h, w, *routing, x_grouped=True, gates=gates)
  shape = GroupedShape(t * k, K, N, e)
  for b in _runnable(kernels.SCATTER_BACKENDS, shape, DT):
    up = kernels.scatter_matmul(x, w, routing, y_grouped=True, backend=b.name)
    down = kernels.scatter_matmul(h, w, routing, x_grouped=True, gates=gates, backend=b.name)
    assert_close(up, want_up, jnp.bfloat16, name=f"{b.name} gather")
    assert_close(down, want_down, jnp.bfloat16, name=f"{b.name} combine")


def test_scatter_glu_backends(rng):
  """The expert GLU through the public op on every backend that runs here (the fused kernels on
  the interpret ones, the products path on "xla"), forward and gradients, against the float32
  reference."""
  t, k, e = 50, 2, 4
  idx = jnp.asarray(rng.integers(0, e - 1, (t, k)), jnp.int32)   # expert 3 gets no rows
  routing = kernels.sort_slots(idx, e)
  x = _rand(rng, (t, K))
  ws = (_rand(rng, (e, K, N), scale=K ** -0.5), _rand(rng, (e, K, N), scale=K ** -0.5),
        _rand(rng, (e, N, K), scale=N ** -0.5))
  gates = jnp.asarray(rng.uniform(size=(t, k)), jnp.float32)
  probe = jnp.asarray(rng.standard_normal((t, K)), jnp.float32)   # the output's cotangent
  ref = lambda x, *ws: kernels.scatter.scatter_glu_reference(
      x.astype(jnp.float32), *(w.astype(jnp.float32) for w in ws), *routing, gates, jax.nn.silu)

  def out_and_grads(fn, *args):   # the output, and the gradients of <output, probe>
    y, vjp = jax.vjp(fn, *args)
    return y, vjp(probe.astype(y.dtype))

  want, want_grads = out_and_grads(ref, x, *ws)
  shape = GroupedShape(t * k, K, N, e)
  for b in _runnable(kernels.GLU_BACKENDS, shape, DT):
    cfg = _config(b, shape, DT) if b.config_classes else None
    glu = lambda x, *ws, b=b, cfg=cfg: kernels.scatter_glu(x, *ws, routing, gates, backend=b.name,
                                                            config=cfg, fused=b.fn is not None)
    got, grads = jax.jit(lambda *a, glu=glu: out_and_grads(glu, *a))(x, *ws)
    assert_close(got, want, jnp.bfloat16, name=f"{b.name} output")
    for name, g, w in zip(("dx", "dw_gate", "dw_up", "dw_down"), grads, want_grads):
      assert_close(g, w, jnp.bfloat16, name=f"{b.name} {name}")


def test_blocksparse_backends(rng):
  topo = blocksparse.make_topology(jnp.asarray([5, 0, 40, 3], jnp.int32), 48, ffn_size=32,
                                   block_size=16)
  p, ns = topo.sparse_shape
  cfg = blocksparse.BlockSparseConfig(block_k=16, block_n=16, block_m=16, group_lines=2)
  a, w = _rand(rng, (p, 40), jnp.float32), _rand(rng, (40, ns), jnp.float32)
  data = blocksparse.sdd_reference(a, w, topo)
  dense = _rand(rng, (ns, 24), jnp.float32)
  lhs = _rand(rng, (24, p), jnp.float32)
  for b in _runnable(kernels.BLOCKSPARSE_BACKENDS, None, (jnp.dtype(jnp.float32),)):
    kw = dict(backend=b.name, config=cfg)
    assert_close(blocksparse.sdd(a, w, topo, **kw), data, jnp.float32, name=f"{b.name} sdd")
    assert_close(blocksparse.dsd(data, dense, topo, **kw),
                 blocksparse.dsd_reference(data, dense, topo), jnp.float32, name=f"{b.name} dsd")
    assert_close(blocksparse.dds(lhs, data, topo, **kw),
                 blocksparse.dds_reference(lhs, data, topo), jnp.float32, name=f"{b.name} dds")


def test_top_k_backends(rng):
  """Every top-k backend that runs here chooses exactly as the reference (ties included)."""
  shape, dtypes = TOPK_SHAPE
  x = jnp.asarray(np.round(rng.standard_normal((shape.t, shape.e)), 1), jnp.float32)
  want_values, want_indices = kernels.topk.top_k_reference(x, shape.k)
  for b in _runnable(kernels.TOPK_BACKENDS, shape, dtypes):
    kw = {"config": _config(b, shape, dtypes)} if b.config_classes else {}
    values, indices = b.fn(x, shape.k, **kw)
    np.testing.assert_array_equal(indices, want_indices, err_msg=b.name)
    np.testing.assert_array_equal(values, want_values, err_msg=b.name)


def test_moe_config_backend_checked_against_its_impl_registry():
  from jaxmoe.config import MoEConfig

  base = dict(d_model=16, d_ff=128, num_experts=4, top_k=2, block_size=16)
  for impl in ("grouped", "scatter", "blocksparse"):
    MoEConfig(**base, impl=impl, backend="triton_interpret")
  MoEConfig(**base, impl="scatter", backend="mosaic")
  with pytest.raises(ValueError, match=r"MoEConfig.backend must be one of \('xla', 'triton', "
                                       r"'triton_interpret', 'pallas'\).*blocksparse.*'mosaic'"):
    MoEConfig(**base, impl="blocksparse", backend="mosaic")
  with pytest.raises(ValueError, match="MoEConfig.backend"):
    MoEConfig(**base, impl="grouped", backend="cuda")
