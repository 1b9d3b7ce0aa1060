"""kernels.hidden: act(gate) [* up] with a recomputing backward pass."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.hidden import hidden, hidden_packed


def _plain(activation, gate, up):
  a = activation(gate.astype(jnp.float32))
  if up is not None:
    a = a * up.astype(jnp.float32)
  return a.astype(gate.dtype)


@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("activation", [jax.nn.silu, jax.nn.gelu, jax.nn.relu])
def test_values_and_gradients_match_autodiff(rng, glu, dtype, activation):
  gate = jnp.asarray(rng.standard_normal((37, 24)) * 3, dtype)
  up = jnp.asarray(rng.standard_normal((37, 24)), dtype) if glu else None
  dh = jnp.asarray(rng.standard_normal((37, 24)), dtype)
  y, vjp = jax.vjp(lambda g, u: hidden(activation, g, u), gate, up)
  y0, vjp0 = jax.vjp(lambda g, u: _plain(activation, g, u), gate, up)
  chex.assert_trees_all_equal(y, y0)         # the same float32 operations: bitwise equal
  chex.assert_trees_all_equal(vjp(dh), vjp0(dh))


def test_saves_only_the_16bit_inputs(rng):
  """The backward pass keeps gate and up (bf16), not float32 intermediates of their shape."""
  gate = jnp.asarray(rng.standard_normal((64, 128)), jnp.bfloat16)
  up = jnp.asarray(rng.standard_normal((64, 128)), jnp.bfloat16)
  _, vjp = jax.vjp(lambda g, u: hidden(jax.nn.silu, g, u), gate, up)
  _, vjp0 = jax.vjp(lambda g, u: _plain(jax.nn.silu, g, u), gate, up)
  f32 = lambda f: [r for r in jax.tree.leaves(f) if getattr(r, "dtype", None) == jnp.float32
                   and r.shape == gate.shape]
  assert not f32(vjp)
  assert f32(vjp0)   # what autodiff alone keeps (so this test can tell them apart)


def test_inside_jit_and_grad(rng):
  gate = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
  loss = lambda g: jnp.sum(hidden(jax.nn.silu, g) ** 2)
  want = jax.grad(lambda g: jnp.sum(jax.nn.silu(g) ** 2))(gate)
  np.testing.assert_allclose(jax.jit(jax.grad(loss))(gate), want, rtol=1e-6)


def test_bad_input():
  with pytest.raises(ValueError, match="gate: must be a floating array"):
    hidden(jax.nn.silu, jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="up: must be a floating array of gate's shape"):
    hidden(jax.nn.silu, jnp.zeros((2, 3)), jnp.zeros((3, 2)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("activation", [jax.nn.silu, jax.nn.gelu])
def test_packed_is_hidden_of_the_halves(rng, dtype, activation):
  gate_up = jnp.asarray(rng.standard_normal((19, 2, 48)) * 3, dtype)
  dh = jnp.asarray(rng.standard_normal((19, 2, 24)), dtype)
  y, vjp = jax.vjp(lambda gu: hidden_packed(activation, gu), gate_up)
  y0, vjp0 = jax.vjp(lambda gu: hidden(activation, gu[..., :24], gu[..., 24:]), gate_up)
  chex.assert_trees_all_equal(y, y0)
  chex.assert_trees_all_equal(vjp(dh), vjp0(dh))
  # It keeps gate_up itself for the backward, no float32 copy and no halves.
  leaves = [tuple(r.shape) for r in jax.tree.leaves(vjp) if hasattr(r, "shape")]
  assert (19, 2, 48) in leaves and (19, 2, 24) not in leaves


def test_packed_refuses_an_odd_last_axis():
  with pytest.raises(ValueError, match="gate_up: the last axis packs gate and up"):
    hidden_packed(jax.nn.silu, jnp.zeros((4, 7)))
  with pytest.raises(ValueError, match="gate_up: must be a floating array"):
    hidden_packed(jax.nn.silu, jnp.zeros((4, 8), jnp.int32))
