"""Linen users: the NNX MoE through flax.nnx.bridge.ToLinen gives the same numbers as the NNX layer."""

from __future__ import annotations

import functools
import operator

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from flax.nnx import bridge

from conftest import assert_close
from jaxmoe import MoE, MoEConfig

CFG = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, num_shared_experts=1,
                bias_balancing=True)


class Block(nn.Module):
  """What a Linen user writes: a residual block around the bridged MoE."""

  @nn.compact
  def __call__(self, x):
    y, stats = bridge.ToLinen(MoE, args=(CFG,), name="moe")(nn.LayerNorm()(x))
    return x + y, stats


def _nnx_with(params) -> MoE:
  """An NNX MoE (initialized differently) holding the given Linen parameter tree."""
  layer = MoE(CFG, rngs=nnx.Rngs(123))
  for path, var in nnx.iter_graph(layer):
    if isinstance(var, nnx.Param):
      var[...] = functools.reduce(operator.getitem, path, params)
  return layer


def test_bridge_matches_nnx(rng):
  model = bridge.ToLinen(MoE, args=(CFG,))
  x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
  variables = model.init({"params": jax.random.key(0)}, x)
  params = nn.unbox(variables)["params"]
  chex.assert_shape(params["experts"]["w_gate"], (4, 16, 32))
  y, stats = jax.jit(model.apply)(variables, x)
  layer = _nnx_with(params)
  want, want_stats = layer(x)
  assert_close(y, want, np.float32)
  chex.assert_trees_all_close(stats, want_stats, rtol=1e-6)

  g = jax.grad(lambda v: jnp.sum(model.apply(v, x)[0] ** 2))(variables)
  want_g = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(layer)
  g = nn.unbox(g)["params"]
  for path, var in nnx.iter_graph(want_g):
    if isinstance(var, nnx.Param):
      assert_close(functools.reduce(operator.getitem, path, g), var[...], np.float32,
                   name="/".join(path))


def test_bridge_inside_linen_model_and_bias_update(rng):
  block = Block()
  x = jnp.asarray(rng.standard_normal((6, 16)), jnp.float32)
  variables = block.init({"params": jax.random.key(1)}, x)
  out, stats = jax.jit(block.apply)(variables, x)
  chex.assert_shape(out, x.shape)
  chex.assert_tree_all_finite((out, stats))
  # The loss-free balancing bias is its own collection, updated through the NNX method.
  moe = bridge.ToLinen(MoE, args=(CFG,))
  mvars = {k: v["moe"] for k, v in variables.items()}
  _, new = moe.apply(mvars, jnp.array([4.0, 0.0, 2.0, 6.0]), 0.5,
                     nnx_method="update_router_bias", mutable=["RouterBias"])
  np.testing.assert_array_equal(nn.unbox(new)["RouterBias"]["router"]["bias"], [-0.5, 0.5, 0.5, -0.5])
