"""Expert/tensor-parallel MoE (jaxmoe.parallel) against the single-device layer, on 8 fake
CPU devices: outputs, gradients, statistics; the TED options (duplicate token dropping, checkpoint
policy, ragged bookkeeping) change no numbers; the compiled HLO really holds the all-to-all and no
all-gather of expert weights; validation."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import assert_close, rel_err
from jaxmoe import MoE, MoEConfig, dispatch
from jaxmoe import parallel as par

# d_ff=40 (20 per tensor rank) appears in no activation shape, so any collective whose shape holds
# 40 or 20 moves expert weights.
D, F, E, K, T = 16, 40, 8, 2, 32
MESHES = [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]


def _config(**kw) -> MoEConfig:
  base = dict(d_model=D, d_ff=F, num_experts=E, top_k=K)
  base.update(kw)
  return MoEConfig(**base)


def _randomize(layer: nnx.Module, seed: int = 5) -> None:
  """Non-zero random values everywhere (biases start at zero otherwise)."""
  state = nnx.state(layer, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  nnx.update(layer, jax.tree.unflatten(treedef, new))


def _inputs(dtype=jnp.float32):
  x = jax.random.normal(jax.random.key(1), (T, D), jnp.float32).astype(dtype)
  g = jax.random.normal(jax.random.key(2), (T, D), jnp.float32)
  return x, g


def _value_and_grads(layer: MoE, x, g, mesh=None):
  """(y, stats, grads of (params, x)) of loss = sum(y * g) + stats.loss, jitted; with a mesh the
  parameters are placed by the logical rules and x by the batch rule first."""
  graphdef, state = nnx.split(layer)
  if mesh is not None:
    state = par.shard_tree(state, mesh)
    x = jax.device_put(x, par.batch_sharding(mesh))

  def loss(state, x):
    y, stats = nnx.merge(graphdef, state)(x)
    return jnp.sum(y.astype(jnp.float32) * g) + stats.loss, (y, stats)

  (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)
  return y, stats, grads


def _reference(cfg: MoEConfig, dtype_name: str = "float32"):
  """The single-device layer's results; every dropless impl and backend computes the same
  function, so the reference runs one ("grouped" on the XLA backend), computed once per config."""
  return _reference_cached(dataclasses.replace(cfg, impl="grouped", backend=None), dtype_name)


@functools.lru_cache(maxsize=None)
def _reference_cached(cfg: MoEConfig, dtype_name: str):
  dtype = jnp.dtype(dtype_name)
  layer = MoE(cfg, rngs=nnx.Rngs(0), dtype=dtype)
  _randomize(layer)
  x, g = _inputs(dtype)
  return jax.device_get(_value_and_grads(layer, x, g))


def _parallel(cfg: MoEConfig, mesh_shape, dtype=jnp.float32, **pkw):
  mesh = par.make_mesh(par.MeshConfig(*mesh_shape))
  layer = MoE(cfg, rngs=nnx.Rngs(0), dtype=dtype, parallel=par.ParallelConfig(mesh, **pkw))
  _randomize(layer)
  x, g = _inputs(dtype)
  return _value_and_grads(layer, x, g, mesh)


def _assert_matches(got, want, dtype=jnp.float32, factor=1.0):
  y, stats, (gs, gx) = got
  y0, stats0, (gs0, gx0) = want
  assert_close(y, y0, dtype, factor=factor, name="y")
  assert_close(gx, gx0, dtype, factor=factor, name="dx")
  flat, flat0 = jax.tree.leaves_with_path(gs), jax.tree.leaves_with_path(gs0)
  assert [p for p, _ in flat] == [p for p, _ in flat0]
  for (path, a), (_, b) in zip(flat, flat0):
    assert_close(a, b, dtype, factor=factor, name=f"d{jax.tree_util.keystr(path)}")
  np.testing.assert_array_equal(np.asarray(stats.tokens_per_expert),
                                np.asarray(stats0.tokens_per_expert))
  np.testing.assert_allclose(float(stats.aux_loss), float(stats0.aux_loss), rtol=1e-5)
  np.testing.assert_allclose(float(stats.z_loss), float(stats0.z_loss), rtol=1e-5)
  assert float(stats.dropped_fraction) == 0.0


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_layer_matches_single_device(mesh_shape):
  cfg = _config()
  _assert_matches(_parallel(cfg, mesh_shape), _reference(cfg))


# Each TED option (and the ragged path's bookkeeping) leaves every number as on one device.
OPTIONS = [
    ((2, 2, 2), dict(duplicate_token_dropping=False), {}),
    ((1, 4, 2), dict(duplicate_token_dropping=False), dict(activation="gelu", use_bias=True)),
    ((1, 4, 2), dict(remat="comm_aware"), {}),
    ((1, 4, 2), dict(remat="comm_aware"), dict(remat_experts=True)),   # model.remat_mlp on EP
    ((2, 2, 2), dict(remat="full", duplicate_token_dropping=False), {}),
    ((2, 4, 1), dict(a2a="ragged_emulated"), {}),
    ((1, 4, 2), dict(a2a="ragged_emulated", remat="comm_aware"), dict(use_bias=True)),
    ((2, 2, 2), dict(capacity_factor=100.0), {}),     # capped at the dropless bound: no drop
    ((2, 2, 2), dict(compute_capacity_factor=0.1), {}),   # the full-buffer branch of the cond
    ((1, 8, 1), dict(compute_capacity_factor=None), dict(impl="ragged_dot")),
    # The dropless padded exchange without its fast path, and with a fast path that random
    # routing sometimes fits (3.5: 7 of the 8-row bound per pair) and seldom (1.0: 2 rows).
    ((2, 4, 1), dict(a2a_capacity_factor=None), {}),
    ((2, 4, 1), dict(a2a_capacity_factor=3.5), {}),
    ((1, 4, 2), dict(a2a_capacity_factor=1.0, duplicate_token_dropping=False), {}),
]


@pytest.mark.parametrize("mesh_shape, pkw, ckw", OPTIONS,
                         ids=[f"{'x'.join(map(str, m))}-{p}-{c}" for m, p, c in OPTIONS])
def test_options_change_no_numbers(mesh_shape, pkw, ckw):
  cfg = _config(**ckw)
  _assert_matches(_parallel(cfg, mesh_shape, **pkw), _reference(cfg))


def test_pallas_kernels_inside_shard_map():
  """The local experts run the project's Pallas grouped matmul (Triton kernel, interpret mode on
  CPU) inside the shard_map, as on the GPU: same numbers as the single-device layer."""
  cfg = _config(backend="triton_interpret")
  _assert_matches(_parallel(cfg, (1, 4, 2), compute_capacity_factor=None), _reference(cfg),
                  factor=2.0)


def test_checked_shard_map_gives_the_same_numbers(monkeypatch):
  """The check_vma=True formulation (pvary'd weights, invariant all-gather) stays correct too."""
  monkeypatch.setattr(par.collectives, "CHECK_VMA", True)
  cfg = _config(use_bias=True)
  _assert_matches(_parallel(cfg, (2, 2, 2), remat="comm_aware"), _reference(cfg))


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (2, 4, 1)], ids=lambda s: "x".join(map(str, s)))
def test_bfloat16_matches_single_device(mesh_shape):
  """bf16 compute: tensor > 1 reduces float32 partial sums; tensor = 1 rounds like one device."""
  cfg = _config()
  _assert_matches(_parallel(cfg, mesh_shape, jnp.bfloat16), _reference(cfg, "bfloat16"),
                  jnp.bfloat16)


@pytest.mark.parametrize("a2a", ["padded", "ragged_emulated"])
def test_all_tokens_to_one_expert_rank(a2a):
  """Every token picks experts 0 and 1, both on expert rank 0: that rank receives the worst case
  the static buffers are sized for (dropless bound), the compute takes the full-buffer branch, and
  the other ranks get nothing (empty experts). Still the single-device numbers."""
  cfg = _config()
  x = np.asarray(_inputs()[0]).copy()
  x[:, 0] = 5.0 + 0.1 * x[:, 0]
  g = _inputs()[1]
  results = []
  for parallel in (None, par.ParallelConfig(_mesh(1, 4, 2), a2a=a2a)):
    layer = MoE(cfg, rngs=nnx.Rngs(0), parallel=parallel)
    _randomize(layer)
    kernel = np.zeros((D, E), np.float32)
    kernel[0, 0], kernel[0, 1] = 10.0, 9.0
    kernel[1:] = 0.01 * np.asarray(layer.router.kernel[...])[1:]
    layer.router.kernel[...] = jnp.asarray(kernel)
    results.append(jax.device_get(_value_and_grads(
        layer, jnp.asarray(x), g, None if parallel is None else parallel.mesh)))
  assert set(np.nonzero(np.asarray(results[0][1].tokens_per_expert))[0]) == {0, 1}
  _assert_matches(results[1], results[0])


def test_capacity_factor_drops_the_overflow_like_a_reference():
  """padded a2a with a small capacity: rows past C per (source, destination), in expert-sorted
  order, are dropped; the output equals the single-device layer with those slots' weights zeroed."""
  cfg = _config()
  mesh_shape, cf = (1, 4, 1), 0.5
  mesh = par.make_mesh(par.MeshConfig(*mesh_shape))
  pcfg = par.ParallelConfig(mesh, capacity_factor=cf)
  layer = MoE(cfg, rngs=nnx.Rngs(0), parallel=pcfg)
  _randomize(layer)
  x, _ = _inputs()
  graphdef, state = nnx.split(layer)
  y, stats = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(par.shard_tree(state, mesh), x)

  ref_layer = MoE(cfg, rngs=nnx.Rngs(0))
  _randomize(ref_layer)
  routing = ref_layer.router(x)
  idx, w = np.asarray(routing.indices), np.array(routing.weights)
  ranks, e_local, t_local = 4, E // 4, T // 4
  cap = pcfg.capacity(t_local, K, e_local)
  assert cap < t_local * K   # the test must actually drop something
  dropped = 0
  for s in range(ranks):
    rows = range(s * t_local, (s + 1) * t_local)
    pairs = sorted(((idx[t, j], t, j) for t in rows for j in range(K)), key=lambda p: p[0])
    seen = {}
    for e, t, j in pairs:
      dest = e // e_local
      seen[dest] = seen.get(dest, 0) + 1
      if seen[dest] > cap:
        w[t, j] = 0.0
        dropped += 1
  assert dropped > 0
  disp = dispatch.sort_by_expert(routing.indices, E)
  y_sorted = ref_layer.experts.apply_sorted(dispatch.gather_sorted(x, disp), disp.group_sizes,
                                            disp.expert, jax.lax.ragged_dot)
  want = dispatch.combine_sorted(y_sorted, disp, jnp.asarray(w))
  assert_close(y, want, jnp.float32, name="y with drops")
  np.testing.assert_allclose(float(stats.dropped_fraction), dropped / (T * K), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# HLO: the all-to-all is there, expert weights never move.


def _compiled_grad_hlo(mesh_shape, params_sharding=None, **pkw) -> str:
  """The compiled gradient's HLO; one padded exchange (no fast-path lax.cond, whose two branches
  would each hold the all-to-alls) unless a2a_capacity_factor is given."""
  pkw.setdefault("a2a_capacity_factor", None)
  cfg = _config()
  mesh = par.make_mesh(par.MeshConfig(*mesh_shape))
  layer = MoE(cfg, rngs=nnx.Rngs(0), parallel=par.ParallelConfig(mesh, **pkw))
  graphdef, state = nnx.split(layer)
  state = par.shard_tree(state, mesh) if params_sharding is None else params_sharding(state, mesh)
  x = jax.device_put(_inputs()[0], par.batch_sharding(mesh))

  def loss(state, x):
    y, stats = nnx.merge(graphdef, state)(x)
    return jnp.sum(y ** 2) + stats.loss

  return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile().as_text()


def _weight_moves(hlo: str, tp: int) -> list[str]:
  """Collectives whose result has a d_ff-sized dimension (40, or 20 per tensor rank): those move
  expert weights (or their full gradients) rather than tokens. The per-expert gradient all-reduce
  over "data" (data-parallel replicas) is expected and excluded by only looking at gathers and
  all-to-alls."""
  bad = []
  for c in par.hlo_collectives(hlo):
    if c["op"] in ("all-gather", "all-to-all", "ragged-all-to-all", "collective-permute"):
      if any(d in (F, F // tp) for _, dims in c["shapes"] for d in dims):
        bad.append(c["line"])
  return bad


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2), (2, 4, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_hlo_has_all_to_all_and_no_expert_weight_gather(mesh_shape):
  hlo = _compiled_grad_hlo(mesh_shape)
  summary = par.collective_summary(hlo)
  assert summary.get("all-to-all", {}).get("count", 0) == 4, summary  # dispatch/combine, fwd+bwd
  assert _weight_moves(hlo, mesh_shape[2]) == []


def test_hlo_weight_check_catches_misplaced_weights():
  """Control: expert weights placed with E split over "data" instead of "expert" must be moved by
  the compiled program, and the check above must see it."""
  def wrong(state, mesh):
    def place(leaf):
      spec = P("data") if leaf.ndim == 3 else P()
      return jax.device_put(leaf, NamedSharding(mesh, spec))
    return jax.tree.map(place, state)

  hlo = _compiled_grad_hlo((2, 2, 2), params_sharding=wrong)
  assert _weight_moves(hlo, 2), "misplaced expert weights were not detected"


def test_padded_fast_path_sizes_and_both_exchanges_in_hlo():
  """a2a_capacity_factor f: C_f = ceil(f * T_s * k / EP) rows per pair, below the dropless bound
  T_s * min(k, E_l); the compiled program holds both exchanges (the lax.cond's branches)."""
  pcfg = par.ParallelConfig(_mesh(2, 4, 1))             # default factor 1.25
  assert pcfg.capacity(4, K, E // 4) == 8              # T_s = 32 / 8 devices, E_l = 2
  assert pcfg.fast_capacity(4, K, E // 4) == 3         # ceil(1.25 * 4 * 2 / 4)
  assert par.ParallelConfig(_mesh(2, 4, 1), a2a_capacity_factor=4.0).fast_capacity(4, K, 2) is None
  assert par.ParallelConfig(_mesh(2, 4, 1), capacity_factor=1.0).fast_capacity(4, K, 2) is None
  hlo = _compiled_grad_hlo((2, 4, 1), a2a_capacity_factor=1.25)
  rows = sorted({c["shapes"][0][1][1] for c in par.hlo_collectives(hlo) if c["op"] == "all-to-all"})
  assert rows == [3, 8], rows                          # C of the fast and the full buffers


def test_duplicate_token_dropping_halves_all_to_all_bytes():
  on = par.collective_summary(_compiled_grad_hlo((1, 4, 2), duplicate_token_dropping=True))
  off = par.collective_summary(_compiled_grad_hlo((1, 4, 2), duplicate_token_dropping=False))
  assert on["all-to-all"]["count"] == off["all-to-all"]["count"]
  assert on["all-to-all"]["bytes"] * 2 == off["all-to-all"]["bytes"], (on, off)
  assert "all-gather" in on   # the tokens are all-gathered over "tensor" instead


def test_comm_aware_checkpoint_recomputes_compute_not_communication():
  """remat="comm_aware": the backward recomputes expert matmuls (more dots than no remat) but no
  all-to-all (as many as no remat); remat="full" recomputes the all-to-alls too."""
  cfg = _config()
  mesh = par.make_mesh(par.MeshConfig(2, 2, 2))
  counts = {}
  for remat in par.REMAT_MODES:
    layer = MoE(cfg, rngs=nnx.Rngs(0), parallel=par.ParallelConfig(mesh, remat=remat))
    graphdef, state = nnx.split(layer)

    def loss(state, x, graphdef=graphdef):
      return jnp.sum(nnx.merge(graphdef, state)(x)[0] ** 2)

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, _inputs()[0]).as_text()
    counts[remat] = (len(re.findall(r"stablehlo\.dot_general|ragged_dot", text)),
                     len(re.findall(r"all_to_all", text)))
  assert counts["comm_aware"][1] == counts["none"][1] < counts["full"][1], counts
  assert counts["comm_aware"][0] > counts["none"][0], counts


def test_ragged_path_lowers_for_gpu():
  """XLA:CPU cannot compile ragged-all-to-all; lowering for CUDA checks the real primitive's
  arguments and types (forward and backward: 2 + 2 ragged all-to-alls)."""
  cfg = _config(backend="xla")
  mesh = par.make_mesh(par.MeshConfig(2, 2, 2))
  layer = MoE(cfg, rngs=nnx.Rngs(0), parallel=par.ParallelConfig(mesh, a2a="ragged"))
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    return jnp.sum(nnx.merge(graphdef, state)(x)[0] ** 2)

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(state, _inputs()[0]).lower(
      lowering_platforms=("cuda",))
  assert len(re.findall(r"ragged_all_to_all", lowered.as_text())) == 4


def test_ragged_all_to_all_emulation_matches_documented_example():
  """The example of jax.lax.ragged_all_to_all's docstring (axis of size 2)."""
  mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:2])
  operand = jnp.array([[1, 2, 2], [3, 4, 0]], jnp.float32)
  output = jnp.zeros((2, 4), jnp.float32)
  input_offsets = jnp.array([[0, 1], [0, 1]], jnp.int32)
  send_sizes = jnp.array([[1, 2], [1, 1]], jnp.int32)
  output_offsets = jnp.array([[0, 0], [1, 2]], jnp.int32)
  recv_sizes = jnp.array([[1, 1], [2, 1]], jnp.int32)

  def f(*args):
    return par.ragged_all_to_all_emulated(*(a[0] for a in args), axis_name="x")[None]

  got = jax.shard_map(f, mesh=mesh, in_specs=(P("x"),) * 6, out_specs=P("x"))(
      operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)
  np.testing.assert_array_equal(np.asarray(got), [[1, 3, 0, 0], [2, 2, 4, 0]])


# ------------------------------------------------------------------------------------------------
# The whole model.


def test_transformer_model_runs_expert_parallel():
  from jaxmoe.config import ModelConfig
  from jaxmoe.model import TransformerLM, cross_entropy

  mcfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=48,
                     expert_d_ff=F, num_experts=E, top_k=K, max_seq_len=16, dtype="float32")
  tokens = jax.random.randint(jax.random.key(3), (8, 8), 0, 64)
  mesh = par.make_mesh(par.MeshConfig(2, 2, 2))

  def run(parallel):
    model = TransformerLM(mcfg, rngs=nnx.Rngs(0))
    if parallel:
      assert par.set_parallel(model, par.ParallelConfig(mesh, remat="comm_aware")) == 2
      par.shard_model(model, mesh)
    graphdef, state = nnx.split(model)
    x = jax.device_put(tokens, par.batch_sharding(mesh)) if parallel else tokens

    def loss(state, x):
      logits, stats = nnx.merge(graphdef, state)(x)
      return cross_entropy(logits[:, :-1], x[:, 1:]) + stats["moe_loss"], logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(state, x)

  (l1, logits1), g1 = run(True)
  (l0, logits0), g0 = run(False)
  assert rel_err(logits1, logits0) < 1e-5
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    assert rel_err(a, b) < 1e-4
  assert par.set_parallel(TransformerLM(mcfg, rngs=nnx.Rngs(0)), None) == 2


# ------------------------------------------------------------------------------------------------
# Validation.


def _mesh(*shape):
  return par.make_mesh(par.MeshConfig(*shape))


@pytest.mark.parametrize("kwargs, match", [
    (dict(a2a="nccl"), "ParallelConfig.a2a"),
    (dict(remat="some"), "ParallelConfig.remat"),
    (dict(capacity_factor=0.0), "ParallelConfig.capacity_factor"),
    (dict(capacity_factor=1.0, a2a="ragged"), "ParallelConfig.capacity_factor"),
    (dict(duplicate_token_dropping=1), "ParallelConfig.duplicate_token_dropping"),
    (dict(a2a_capacity_factor=0.5), "ParallelConfig.a2a_capacity_factor"),
])
def test_parallel_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    par.ParallelConfig(_mesh(2, 2, 2), **kwargs)
  with pytest.raises(ValueError, match="ParallelConfig.mesh"):
    par.ParallelConfig("not a mesh")


def test_layer_does_not_fit_mesh():
  with pytest.raises(ValueError, match=r"num_experts=4 .*expert axis \(8\)"):
    MoE(_config(num_experts=4), rngs=nnx.Rngs(0), parallel=par.ParallelConfig(_mesh(1, 8, 1)))
  with pytest.raises(ValueError, match=r"d_ff=36 .*tensor axis \(8\)"):
    MoE(_config(d_ff=36), rngs=nnx.Rngs(0), parallel=par.ParallelConfig(_mesh(1, 1, 8)))
  layer = MoE(_config(), rngs=nnx.Rngs(0), parallel=par.ParallelConfig(_mesh(2, 2, 2)))
  with pytest.raises(ValueError, match="number of tokens 10 must be divisible"):
    layer(jnp.ones((10, D)))
  with pytest.raises(ValueError, match="duplicate_token_dropping"):
    layer(jnp.ones((4, D)))   # 1 token per device cannot be split over 2 tensor ranks
  with pytest.raises(ValueError, match="impl must be one of"):
    layer(jnp.ones((32, D)), impl="capacity")
  recompute = MoE(_config(remat_experts=True), rngs=nnx.Rngs(0),
                  parallel=par.ParallelConfig(_mesh(2, 2, 2)))   # remat="none": nothing to recompute
  with pytest.raises(ValueError, match="remat_experts=True on the expert-parallel layer needs"):
    recompute(jnp.ones((32, D)))


def test_router_jitter_runs_outside_shard_map_with_the_same_noise():
  """jitter > 0 at train time: the router keeps its RNG state in the ordinary jit program, so the
  noise (and the output) equals the single-device layer's."""
  cfg = _config(jitter=0.1)
  mesh = _mesh(2, 2, 2)
  x, _ = _inputs()
  outs = []
  for parallel in (None, par.ParallelConfig(mesh)):
    layer = MoE(cfg, rngs=nnx.Rngs(0), parallel=parallel)
    graphdef, state = nnx.split(layer)
    outs.append(jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x, deterministic=False)[0])(
        state, x))
  assert_close(outs[1], outs[0], jnp.float32, name="y with jitter")


def _cond_output_rows(jaxpr) -> set[int]:
  """The leading dimensions of every lax.cond output in `jaxpr`, nested jaxprs included."""
  rows = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "cond":
      rows |= {v.aval.shape[0] for v in eqn.outvars if v.aval.ndim >= 2}
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          rows |= _cond_output_rows(inner)
  return rows


def test_fast_path_gradient_keeps_no_residuals_of_the_dropless_bound():
  """Differentiating the a2a fast path's lax.cond must not keep the dropless-bound branch's
  activations (the untaken branch's residuals are zero-filled every step): that branch is
  rematerialized, so no cond output has the bound receive buffer's row count (EP x C)."""
  cfg = _config()
  mesh = par.make_mesh(par.MeshConfig(4, 2, 1))
  pcfg = par.ParallelConfig(mesh)
  tokens = 64
  t_send, e_local = tokens // 8, E // 2            # 8 token shards, 2 expert ranks
  cap, cap_fast = pcfg.capacity(t_send, K, e_local), pcfg.fast_capacity(t_send, K, e_local)
  assert (cap, cap_fast) == (16, 10)               # receive buffers of 32 and 20 rows
  layer = MoE(cfg, rngs=nnx.Rngs(0), parallel=pcfg)
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    return jnp.sum(nnx.merge(graphdef, state)(x)[0] ** 2)

  x = jax.random.normal(jax.random.key(1), (tokens, D), jnp.float32)
  rows = _cond_output_rows(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(state, x).jaxpr)
  assert 2 * cap_fast in rows, rows      # the fast branch's activations are kept
  assert 2 * cap not in rows, rows       # the bound branch's are not
