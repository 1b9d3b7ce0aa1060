"""Memory-lean optimizer step: same numbers as the plain optax step, fewer temporary bytes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmoe import lean_optimizer as lo


def _params(n_big: int = 6, shape=(256, 512)):
  p = {f"w{i}": jax.random.normal(jax.random.key(i), shape, jnp.float32) for i in range(n_big)}
  p["bias"] = jax.random.normal(jax.random.key(99), (shape[1],), jnp.float32)
  p["nested"] = {"emb": jax.random.normal(jax.random.key(7), (64, 32), jnp.float32)}
  return p


def _grads(params, seed=1, scale=1.0):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])


def _decay_mask(ps):
  return jax.tree.map(lambda p: p.ndim >= 2, ps)


@pytest.mark.parametrize("num_chunks", [1, 3, 8])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_lean_step_equals_plain_update(num_chunks, clip):
  params = _params()
  inner = optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.1, mask=_decay_mask)
  plain = inner if clip is None else optax.chain(optax.clip_by_global_norm(clip), inner)
  lean = lo.chunked(inner, params, num_chunks, max_grad_norm=clip)
  assert 1 <= len(lean.groups) <= num_chunks

  @jax.jit
  def plain_step(p, g, s):
    u, s = plain.update(g, s, p)
    return optax.apply_updates(p, u), s

  lean_step = jax.jit(lambda p, g, s: lo.lean_step(lean, g, s, p))
  p1, s1 = params, plain.init(params)
  p2, s2 = params, lean.init(params)
  for step in range(3):  # several steps: the moments and the step count must agree too
    g = _grads(params, seed=step, scale=0.5 if step else 50.0)  # the first one is clipped
    p1, s1 = plain_step(p1, g, s1)
    p2, s2 = lean_step(p2, g, s2)
  # Equal to float32 rounding: XLA may fuse the elementwise math of a chunk differently.
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(p1) == jax.tree.structure(p2)
  # The chunked transformation's own update (optax interface) agrees too.
  u, _ = jax.jit(lean.update)(g, s2, p2)
  u_ref, _ = jax.jit(plain.update)(g, s1, p1)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def _temp_bytes(fn, *args) -> int:
  compiled = jax.jit(fn, donate_argnums=(0, 2)).lower(*args).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def test_lean_step_needs_fewer_temporary_bytes():
  """Plain clip+AdamW over 6 large leaves materializes the clipped gradient tree (all leaves);
  the lean step's temporaries are a fraction of it (compiled memory_analysis, state donated)."""
  params = _params(n_big=6, shape=(256, 512))
  grads = _grads(params)
  leaf_bytes = 256 * 512 * 4
  inner = optax.adamw(1e-3, weight_decay=0.1, mask=_decay_mask)
  plain = optax.chain(optax.clip_by_global_norm(1.0), inner)

  def plain_step(p, g, s):
    u, s = plain.update(g, s, p)
    return optax.apply_updates(p, u), s

  lean = lo.chunked(inner, params, 6, max_grad_norm=1.0)
  plain_temp = _temp_bytes(plain_step, params, grads, plain.init(params))
  lean_temp = _temp_bytes(lambda p, g, s: lo.lean_step(lean, g, s, p), params, grads,
                          lean.init(params))
  assert plain_temp >= 5 * leaf_bytes, plain_temp
  assert lean_temp <= plain_temp / 2, (lean_temp, plain_temp)


def test_chunk_groups_balanced_and_ordered():
  tree = {"a": jnp.zeros((100,)), "b": jnp.zeros((100,)), "c": jnp.zeros((300,)),
          "d": jnp.zeros((100,)), "e": jnp.zeros((100,))}
  groups = lo.chunk_groups(tree, 3)
  assert [i for g in groups for i in g] == list(range(5))
  assert len(groups) <= 3
  assert lo.chunk_groups(tree, 1) == ((0, 1, 2, 3, 4),)
  assert len(lo.chunk_groups(tree, 100)) == 5


@pytest.mark.parametrize("kwargs, field", [({"num_chunks": 0}, "num_chunks"),
                                           ({"max_grad_norm": -1.0}, "max_grad_norm")])
def test_chunked_validation(kwargs, field):
  with pytest.raises(ValueError, match=field):
    lo.chunked(optax.adam(1e-3), _params(1, (4, 4)), **kwargs)
  with pytest.raises(ValueError, match="tx must"):
    lo.lean_step(optax.adam(1e-3), {}, None, {})


def test_chunked_state_of_nnx_params_keeps_logical_names():
  """Params as an nnx.State: each Param is one leaf, so the chunks' moments keep the logical axis
  names and the sharding rules place them like the parameters; lean_step runs on the State."""
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from jaxmoe import MoE, MoEConfig
  from jaxmoe import parallel as par

  layer = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2), rngs=nnx.Rngs(0))
  params = nnx.state(layer, nnx.Param)
  mesh = par.make_mesh(par.MeshConfig(2, 2, 2))
  params = par.shard_tree(params, mesh)
  tx = lo.chunked(optax.adamw(1e-3, mask=_decay_mask), params, 2, max_grad_norm=1.0)
  state = par.shard_tree(tx.init(params), mesh)
  specs = [s.spec for s in jax.tree.leaves(par.tree_shardings(state, mesh))]
  assert P("expert", None, "tensor") in specs and P("expert", "tensor") in specs
  grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  new_params, _ = jax.jit(lambda p, g, s: lo.lean_step(tx, g, s, p))(params, grads, state)
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, mask=_decay_mask))
  u, _ = ref.update(grads, ref.init(params), params)
  want = optax.apply_updates(params, u)
  for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  w = new_params["experts"]["w_gate"].get_value()
  assert w.sharding.is_equivalent_to(NamedSharding(mesh, P("expert", None, "tensor")), 3)
