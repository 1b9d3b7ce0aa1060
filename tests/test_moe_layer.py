"""MoE layer: every impl against a dense per-expert reference (outputs and gradients), capacity
dropping policy, jit / grad / nnx.scan + remat, bf16, shapes and validation."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_close
import kernels
from jaxmoe import MoE, MoEConfig, MoEStats
from jaxmoe import capacity as capacity_lib
from jaxmoe.config import DROPLESS_IMPLS, IMPLS
from jaxmoe.experts import activation_fn

D, F, E = 16, 32, 4
BS = 16  # block size of impl="blocksparse" (d_ff must be a multiple)


def dense_reference(layer: MoE, x: jax.Array, kept=None) -> jax.Array:
  """Every expert on every token in float32, weighted by the router's (kept) choices."""
  cfg = layer.config
  tokens = x.reshape(-1, cfg.d_model).astype(jnp.float32)
  r = layer.router(tokens)
  ex = layer.experts
  act = activation_fn(cfg.activation)
  p = lambda v: None if v is None else v[...].astype(jnp.float32)
  mask = jnp.ones(r.indices.shape, bool) if kept is None else kept
  y = jnp.zeros_like(tokens)
  for e in range(cfg.num_experts):
    gate = tokens @ p(ex.w_gate)[e] + (0 if ex.b_gate is None else p(ex.b_gate)[e])
    h = act(gate)
    if cfg.is_glu:
      h = h * (tokens @ p(ex.w_up)[e] + (0 if ex.b_up is None else p(ex.b_up)[e]))
    out = h @ p(ex.w_out)[e] + (0 if ex.b_out is None else p(ex.b_out)[e])
    coef = jnp.sum(jnp.where((r.indices == e) & mask, r.weights, 0.0), axis=1)
    y = y + coef[:, None] * out
  y = y * cfg.routed_scale
  if layer.shared is not None:
    sh = layer.shared
    h = act(tokens @ p(sh.w_gate) + (0 if sh.b_gate is None else p(sh.b_gate)))
    if cfg.is_glu:
      h = h * (tokens @ p(sh.w_up) + (0 if sh.b_up is None else p(sh.b_up)))
    y = y + h @ p(sh.w_out) + (0 if sh.b_out is None else p(sh.b_out))
  return y.reshape(x.shape)


CONFIGS = {
    "swiglu": dict(activation="swiglu", top_k=2),
    "gelu_bias_shared": dict(activation="gelu", top_k=3, use_bias=True, num_shared_experts=1,
                             router="sigmoid", routed_scale=1.5),
}


def _layer(name, **overrides):
  kw = dict(d_model=D, d_ff=F, num_experts=E, capacity_factor=float(E),  # capacity: never drops
            block_size=BS)
  kw.update(CONFIGS[name])
  kw.update(overrides)
  layer = MoE(MoEConfig(**kw), rngs=nnx.Rngs(0))
  if layer.config.use_bias:  # nonzero biases, so the test sees them
    for path, v in nnx.iter_graph(layer):
      if isinstance(v, nnx.Param) and path[-1].startswith("b_"):
        v[...] = 0.1 * jax.random.normal(jax.random.key(len(path[-1])), v.shape)
  return layer


def _impls(cfg: MoEConfig, impls=IMPLS) -> list[str]:
  """The impls that can run cfg (blocksparse has no biases)."""
  out = []
  for impl in impls:
    try:
      cfg.check_impl(impl)
      out.append(impl)
    except ValueError:
      pass
  return out


def _loss(impl, x, g):
  def loss(m, x):
    y, stats = m(x, impl=impl)
    return jnp.sum(y * g) + stats.loss
  return loss


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_impls_match_reference_outputs_and_grads(name, rng):
  layer = _layer(name)
  x = jnp.asarray(rng.standard_normal((2, 9, D)), jnp.float32)
  g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  want = dense_reference(layer, x)

  def ref_loss(m, x):
    _, stats = m(x, impl="ragged_dot")
    return jnp.sum(dense_reference(m, x) * g) + stats.loss

  want_gm, want_gx = nnx.grad(ref_loss, argnums=(0, 1))(layer, x)
  impls = _impls(layer.config)
  assert len(impls) >= 3
  for impl in impls:
    y, stats = layer(x, impl=impl)
    chex.assert_shape(y, x.shape)
    assert_close(y, want, np.float32, factor=3, name=f"{impl} y")
    np.testing.assert_equal(float(stats.dropped_fraction), 0.0)
    gm, gx = nnx.grad(_loss(impl, x, g), argnums=(0, 1))(layer, x)
    assert_close(gx, want_gx, np.float32, factor=3, name=f"{impl} dx")
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(gm)), nnx.to_flat_state(nnx.state(want_gm))):
      assert_close(a[...], b[...], np.float32, factor=3, name=f"{impl} d{path}")


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_scatter_glu_activations_match_reference(activation, rng):
  """impl "scatter" on the Triton kernels in the interpreter, with each GLU activation (named in
  kernels.activations): outputs and gradients equal the dense reference."""
  layer = _layer("swiglu", activation=activation, impl="scatter", backend="triton_interpret")
  x = jnp.asarray(rng.standard_normal((2, 9, D)), jnp.float32)
  g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  y, _ = layer(x)
  assert_close(y, dense_reference(layer, x), np.float32, factor=3, name="y")

  def ref_loss(m, x):
    _, stats = m(x, impl="ragged_dot")
    return jnp.sum(dense_reference(m, x) * g) + stats.loss

  want_gm, want_gx = nnx.grad(ref_loss, argnums=(0, 1))(layer, x)
  gm, gx = nnx.grad(_loss("scatter", x, g), argnums=(0, 1))(layer, x)
  assert_close(gx, want_gx, np.float32, factor=3, name="dx")
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(gm)),
                               nnx.to_flat_state(nnx.state(want_gm))):
    assert_close(a[...], b[...], np.float32, factor=3, name=f"d{path}")


def _policy_kept(indices: np.ndarray, num_experts: int, capacity: int) -> np.ndarray:
  """GShard priority written as loops: first choices in token order, then second choices, ..."""
  t, k = indices.shape
  count = np.zeros(num_experts, int)
  kept = np.zeros((t, k), bool)
  for j in range(k):
    for i in range(t):
      e = indices[i, j]
      kept[i, j] = count[e] < capacity
      count[e] += 1
  return kept


def test_capacity_drops_exactly_the_policy(rng):
  layer = _layer("swiglu", impl="capacity", capacity_factor=0.5)
  x = jnp.asarray(rng.standard_normal((13, D)), jnp.float32)
  cap = layer.config.capacity(13)
  assert cap == 4  # ceil(2 * 13 * 0.5 / 4)
  r = layer.router(x)
  want_kept = _policy_kept(np.asarray(r.indices), E, cap)
  assert not want_kept.all()
  _, kept, dropped = capacity_lib.capacity_experts(layer.experts, x, r.indices, r.weights, cap)
  np.testing.assert_array_equal(kept, want_kept)
  y, stats = layer(x)
  np.testing.assert_allclose(stats.dropped_fraction, 1 - want_kept.mean(), rtol=1e-6)
  np.testing.assert_allclose(dropped, 1 - want_kept.mean(), rtol=1e-6)
  assert_close(y, dense_reference(layer, x, kept=jnp.asarray(want_kept)), np.float32, factor=3)
  # A token with every assignment dropped comes out zero (it rides the residual).
  all_dropped = ~want_kept.any(axis=1)
  np.testing.assert_array_equal(np.asarray(y)[all_dropped], 0.0)


def test_capacity_one_expert_takes_everything(rng):
  layer = _layer("swiglu", impl="capacity", capacity_factor=1.0, top_k=1, bias_balancing=True)
  layer.router.bias[...] = jnp.array([0.0, 50.0, 0.0, 0.0])
  x = jnp.asarray(rng.standard_normal((8, D)), jnp.float32)
  _, stats = layer(x)
  # Capacity 2 of 8 tokens on expert 1: the first two stay.
  np.testing.assert_allclose(stats.dropped_fraction, 6 / 8)
  np.testing.assert_array_equal(stats.tokens_per_expert, [0, 8, 0, 0])
  y_dropless, _ = layer(x, impl="grouped")
  assert_close(layer(x)[0][:2], y_dropless[:2], np.float32)


def test_jit_and_stats_pytree(rng):
  layer = _layer("swiglu")
  x = jnp.asarray(rng.standard_normal((4, 5, D)), jnp.float32)

  @nnx.jit
  def fwd(m, x):
    return m(x, deterministic=False)

  y, stats = fwd(layer, x)
  want, want_stats = layer(x)
  assert isinstance(stats, MoEStats)
  assert_close(y, want, np.float32)
  chex.assert_trees_all_close(stats, want_stats, rtol=1e-5)
  chex.assert_shape(stats.tokens_per_expert, (E,))
  np.testing.assert_allclose(np.sum(stats.tokens_per_expert), 20 * 2)
  np.testing.assert_allclose(stats.loss, 0.01 * stats.aux_loss + 0.001 * stats.z_loss, rtol=1e-6)
  np.testing.assert_allclose(stats.weighted_loss(), stats.loss)


def test_scan_remat_over_layers(rng):
  cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=2)
  n_layers = 3

  @nnx.split_rngs(splits=n_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return MoE(cfg, rngs=rngs)

  layers = create(nnx.Rngs(0))
  x = jnp.asarray(rng.standard_normal((6, D)), jnp.float32)

  def run_scan(layers, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
    @nnx.remat
    def step(layer, h):
      y, stats = layer(h)
      return h + y, stats
    return step(layers, x)

  def run_loop(layers, x):
    graphdef, state = nnx.split(layers)
    h, losses = x, []
    for i in range(n_layers):
      layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
      y, stats = layer(h)
      h, losses = h + y, losses + [stats.loss]
    return h, jnp.stack(losses)

  h, stats = nnx.jit(run_scan)(layers, x)
  chex.assert_shape(stats.tokens_per_expert, (n_layers, E))
  want_h, want_losses = run_loop(layers, x)
  assert_close(h, want_h, np.float32, factor=3)
  assert_close(stats.loss, want_losses, np.float32, factor=3)

  def loss_scan(m):
    h, stats = run_scan(m, x)
    return jnp.sum(h ** 2) + jnp.sum(stats.loss)

  def loss_loop(m):
    h, losses = run_loop(m, x)
    return jnp.sum(h ** 2) + jnp.sum(losses)

  g = nnx.jit(nnx.grad(loss_scan))(layers)
  want_g = nnx.grad(loss_loop)(layers)
  chex.assert_tree_all_finite(nnx.state(g))
  assert_close(g["experts"]["w_out"][...], want_g["experts"]["w_out"][...], np.float32, factor=3)
  assert_close(g["router"]["kernel"][...], want_g["router"]["kernel"][...], np.float32, factor=3)


def test_bf16(rng):
  cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=2, block_size=BS)
  layer16 = MoE(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
  x = jnp.asarray(rng.standard_normal((3, 7, D)), jnp.float32)
  x16 = x.astype(jnp.bfloat16)
  want = dense_reference(layer16, x16.astype(jnp.float32))
  for impl in DROPLESS_IMPLS:
    y, stats = layer16(x16, impl=impl)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert stats.aux_loss.dtype == jnp.float32
    assert_close(y, want, jnp.bfloat16, factor=2, name=impl)
    gm = nnx.grad(lambda m: jnp.sum(m(x16, impl=impl)[0].astype(jnp.float32)))(layer16)
    assert gm["experts"]["w_gate"][...].dtype == jnp.float32
    chex.assert_tree_all_finite(nnx.state(gm))


def test_switch_impl_keeps_results_on_same_params(rng):
  layer = _layer("swiglu")
  x = jnp.asarray(rng.standard_normal((10, D)), jnp.float32)
  y0, _ = layer(x)
  for impl in DROPLESS_IMPLS:
    other = MoE(dataclasses.replace(layer.config, impl=impl), rngs=nnx.Rngs(0))
    assert_close(other(x)[0], y0, np.float32, name=impl)


def test_param_logical_axes():
  layer = _layer("gelu_bias_shared")
  names = {"/".join(map(str, p)): v.get_metadata().get("out_sharding")
           for p, v in nnx.iter_graph(layer) if isinstance(v, nnx.Param)}
  assert names["experts/w_gate"] == ("expert", "embed", "mlp")
  assert names["experts/w_out"] == ("expert", "mlp", "embed")
  assert names["experts/b_gate"] == ("expert", "mlp")
  assert names["shared/w_gate"] == ("embed", "mlp")
  assert layer.experts.w_gate.shape == (E, D, F)


def test_input_validation():
  layer = _layer("swiglu")
  with pytest.raises(ValueError, match="d_model"):
    layer(jnp.ones((3, D + 1)))
  with pytest.raises(ValueError, match="impl"):
    layer(jnp.ones((3, D)), impl="magic")
  with pytest.raises(ValueError, match="dtype"):
    layer(jnp.ones((3, D), jnp.int32))
  biased = _layer("gelu_bias_shared")
  with pytest.raises(ValueError, match="use_bias"):
    biased(jnp.ones((3, D)), impl="blocksparse")
  with pytest.raises(ValueError, match="d_ff"):
    MoEConfig(d_model=D, d_ff=48, num_experts=E, impl="blocksparse", block_size=32)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("impl", ["grouped", "ragged_dot", "capacity"])
def test_remat_experts_same_values_smaller_residuals(name, impl, rng):
  """remat_experts: outputs and gradients equal the plain layer's; the backward pass keeps no
  (rows, d_ff) array (the plain layer keeps gate [and up] and the hidden); remat_experts is
  refused for the impls it does not cover."""
  plain = _layer(name, impl=impl)
  remat = _layer(name, impl=impl, remat_experts=True)   # same seed: same parameters
  x = jnp.asarray(rng.standard_normal((2, 9, D)), jnp.float32)
  g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  chex.assert_trees_all_close(remat(x)[0], plain(x)[0], rtol=1e-6, atol=1e-6)
  gm, gx = nnx.grad(_loss(impl, x, g), argnums=(0, 1))(remat, x)
  gm0, gx0 = nnx.grad(_loss(impl, x, g), argnums=(0, 1))(plain, x)
  chex.assert_trees_all_close(gx, gx0, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(nnx.state(gm), nnx.state(gm0), rtol=1e-6, atol=1e-6)

  def hidden_sized(layer):
    graphdef, state = nnx.split(layer)

    def residuals(state, x):
      return jax.vjp(lambda s: nnx.merge(graphdef, s)(x)[0], state)[1]

    saved = jax.tree.leaves(jax.eval_shape(residuals, state, x))
    rows = x.size // D * layer.config.top_k           # grouped: (rows, F); capacity: (E, C, F)
    cap = layer.config.capacity(x.size // D)
    return [a for a in saved if getattr(a, "shape", None) in ((rows, F), (E, cap, F))]

  assert hidden_sized(plain)          # so this test can tell them apart
  assert not hidden_sized(remat)
  with pytest.raises(ValueError, match="remat_experts"):
    MoEConfig(d_model=D, d_ff=F, num_experts=E, impl="scatter", remat_experts=True)


def _fused_runs(rng, monkeypatch, op: str, flag: str, base: dict) -> list[bool]:
  """Runs the layer of `base` with MoEConfig.<flag> off, on, and on under remat_experts, counting
  the calls of kernels.<op>; asserts the fused runs' outputs and gradients equal the unfused
  run's and the plain fused output the dense reference; returns the monkeypatched call log."""
  calls = []
  fused_op = getattr(kernels, op)
  monkeypatch.setattr(kernels, op, lambda *a, **k: calls.append(1) or fused_op(*a, **k))
  x = jnp.asarray(rng.standard_normal((2, 9, D)), jnp.float32)
  g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  results = {}
  for fuse, remat in ((False, False), (True, False), (True, True)):
    layer = MoE(MoEConfig(**base, **{flag: fuse}, remat_experts=remat), rngs=nnx.Rngs(0))
    calls.clear()
    y = layer(x)[0]
    grads = nnx.grad(_loss("grouped", x, g), argnums=(0, 1))(layer, x)
    assert bool(calls) == fuse, (fuse, remat)
    results[fuse, remat] = (y, nnx.state(grads[0]), grads[1])
    if fuse and not remat:
      assert_close(y, dense_reference(layer, x), jnp.float32, name="fused vs dense reference")
  for key in ((True, False), (True, True)):
    chex.assert_trees_all_close(results[key], results[False, False], rtol=1e-5, atol=1e-5)
  calls.clear()
  return calls


def test_fused_activation_same_function_as_separate_passes(rng, monkeypatch):
  """A plain MLP without biases runs as kernels.grouped_mlp (fuse_activation, the default) in
  impl "grouped": the same outputs and gradients as the separate products and passes and as the
  dense reference, with and without remat_experts; a GLU, or fuse_activation=False, does not
  call it."""
  base = dict(d_model=D, d_ff=F, num_experts=E, activation="gelu_tanh", top_k=2)
  calls = _fused_runs(rng, monkeypatch, "grouped_mlp", "fuse_activation", base)
  x = jnp.asarray(rng.standard_normal((2, 9, D)), jnp.float32)
  MoE(MoEConfig(**{**base, "activation": "swiglu"}), rngs=nnx.Rngs(0))(x)
  assert not calls
  with pytest.raises(ValueError, match="MoEConfig.fuse_activation must be a bool, got 'yes'"):
    MoEConfig(**base, fuse_activation="yes")


def test_recompute_activation_same_values_one_hidden_array_less(rng, monkeypatch):
  """recompute_activation=True: the layer passes keep_activation=False to kernels.grouped_mlp:
  the same output and gradients, and its VJP keeps one (rows, d_ff) array fewer; it is refused
  where the fused plain MLP does not run."""
  base = dict(d_model=D, d_ff=F, num_experts=E, activation="gelu_tanh", top_k=2)
  x = jnp.asarray(rng.standard_normal((2, 9, D)), jnp.float32)
  g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  out, kept = {}, {}
  for flag in (False, True):
    layer = MoE(MoEConfig(**base, recompute_activation=flag), rngs=nnx.Rngs(0))
    grads = nnx.grad(_loss("grouped", x, g), argnums=(0, 1))(layer, x)
    out[flag] = (layer(x)[0], nnx.state(grads[0]), grads[1])
    graphdef, state = nnx.split(layer)
    saved = jax.tree.leaves(jax.eval_shape(
        lambda s: jax.vjp(lambda s: nnx.merge(graphdef, s)(x)[0], s)[1], state))
    kept[flag] = sum(getattr(a, "shape", None) == (x.size // D * 2, F) for a in saved)
  chex.assert_trees_all_close(out[True], out[False], rtol=0, atol=0)
  assert kept[False] == kept[True] + 1, kept
  for bad in (dict(activation="swiglu"), dict(fuse_activation=False), dict(impl="ragged_dot"),
              dict(use_bias=True)):
    with pytest.raises(ValueError, match="recompute_activation=True needs impl='grouped' with "
                                         "fuse_activation=True, a plain"):
      MoEConfig(**{**base, **bad}, recompute_activation=True)


def test_fuse_glu_runs_grouped_glu_with_the_same_values(rng, monkeypatch):
  """fuse_glu=True: a GLU without biases in impl "grouped" runs as kernels.grouped_glu, with the
  outputs and gradients of the separate products (and the dense reference), under remat too;
  it is refused for a plain MLP or a d_ff that is not a multiple of 64."""
  base = dict(d_model=D, d_ff=64, num_experts=E, activation="swiglu", top_k=2)
  _fused_runs(rng, monkeypatch, "grouped_glu", "fuse_glu", base)
  with pytest.raises(ValueError, match="fuse_glu=True needs a GLU activation and d_ff a multiple "
                                       "of 64, got activation='gelu', d_ff=64"):
    MoEConfig(**{**base, "activation": "gelu"}, fuse_glu=True)
  with pytest.raises(ValueError, match="d_ff=96"):
    MoEConfig(**{**base, "d_ff": 96}, fuse_glu=True)


def test_fuse_glu_scatter_runs_the_fused_path_with_the_same_values(rng, monkeypatch):
  """fuse_glu=True in impl "scatter" on a backend with the fused GLU kernels runs
  scatter_glu(fused=True), off its default path (fused=None): the same outputs and gradients;
  on "xla" (no fused kernels) it runs the default path."""
  from kernels import scatter
  seen = []
  glu = scatter.scatter_glu
  monkeypatch.setattr(scatter, "scatter_glu", lambda *a, **k: seen.append(k["fused"]) or glu(*a, **k))
  x = jnp.asarray(rng.standard_normal((2, 9, D)), jnp.float32)
  g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  base = dict(d_model=D, d_ff=64, num_experts=E, activation="swiglu", top_k=2, impl="scatter")
  results = []
  for fuse in (False, True):
    layer = MoE(MoEConfig(**base, backend="triton_interpret", fuse_glu=fuse), rngs=nnx.Rngs(0))
    y = layer(x)[0]
    grads = nnx.grad(_loss("scatter", x, g), argnums=(0, 1))(layer, x)
    results.append((y, nnx.state(grads[0]), grads[1]))
  assert seen[0] is None and seen[-1] is True, seen
  chex.assert_trees_all_close(results[1], results[0], rtol=1e-5, atol=1e-5)
  seen.clear()
  MoE(MoEConfig(**base, backend="xla", fuse_glu=True), rngs=nnx.Rngs(0))(x)
  assert seen == [None]
