"""Mesh construction and logical-axis sharding rules (jaxmoe.parallel) on 8 fake CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmoe import MoE, MoEConfig
from jaxmoe import parallel as par


def test_device_count():
  assert jax.device_count() == 8


@pytest.mark.parametrize("cfg, shape", [
    (par.MeshConfig(), (8, 1, 1)),
    (par.MeshConfig(data=2, expert=4, tensor=1), (2, 4, 1)),
    (par.MeshConfig(data=-1, expert=2, tensor=2), (2, 2, 2)),
    (par.MeshConfig(data=1, expert=-1, tensor=2), (1, 4, 2)),
    (par.MeshConfig(data=1, expert=1, tensor=-1), (1, 1, 8)),
    (par.MeshConfig(data=1, expert=2, tensor=1), (1, 2, 1)),   # a prefix of the devices
])
def test_make_mesh_shapes(cfg, shape):
  mesh = par.make_mesh(cfg)
  assert mesh.axis_names == par.AXES
  assert tuple(mesh.shape[a] for a in par.AXES) == shape
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert len(set(d.id for d in mesh.devices.flat)) == int(np.prod(shape))
  assert par.mesh_shape(mesh) == dict(zip(par.AXES, shape))


def test_make_mesh_on_given_devices():
  devs = jax.devices()[4:]
  mesh = par.make_mesh(par.MeshConfig(data=-1, expert=2), devices=devs)
  assert [d.id for d in mesh.devices.flat] == [d.id for d in devs]


@pytest.mark.parametrize("kwargs, match", [
    (dict(data=0), "MeshConfig.data"),
    (dict(expert=-2), "MeshConfig.expert"),
    (dict(tensor=1.5), "MeshConfig.tensor"),
    (dict(data=-1, expert=-1), "at most one axis"),
])
def test_mesh_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    par.MeshConfig(**kwargs)


def test_mesh_config_does_not_fit():
  with pytest.raises(ValueError, match="does not fit the 8 available"):
    par.make_mesh(par.MeshConfig(data=4, expert=4))
  with pytest.raises(ValueError, match="MeshConfig.data=-1"):
    par.make_mesh(par.MeshConfig(data=-1, expert=3))
  with pytest.raises(ValueError, match="config must be a MeshConfig"):
    par.make_mesh((2, 2, 2))


def test_logical_to_spec_rules():
  mesh = par.make_mesh(par.MeshConfig(2, 2, 2))
  assert par.logical_to_spec(("expert", "embed", "mlp"), mesh) == P("expert", None, "tensor")
  assert par.logical_to_spec(("expert", "mlp", "embed"), mesh) == P("expert", "tensor")
  assert par.logical_to_spec(("batch", None), mesh) == P(("data", "expert"))
  assert par.logical_to_spec(("embed", None), mesh) == P()
  assert par.logical_to_spec(None, mesh) == P()
  assert par.logical_to_spec(("unknown_name",), mesh) == P()
  # Axes of size 1 are dropped, so the same rules serve every mesh.
  mesh_ep = par.make_mesh(par.MeshConfig(1, 8, 1))
  assert par.logical_to_spec(("expert", "embed", "mlp"), mesh_ep) == P("expert")
  assert par.logical_to_spec(("batch",), mesh_ep) == P("expert")
  custom = (("embed", "data"), ("mlp", "tensor"))
  assert par.logical_to_spec(("embed", "mlp"), mesh, custom) == P("data", "tensor")
  with pytest.raises(ValueError, match="mesh axis 'tensor' to two dimensions"):
    par.logical_to_spec(("mlp", "ffn"), mesh)


def test_moe_state_shardings_follow_logical_names():
  cfg = MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2, use_bias=True,
                  num_shared_experts=1)
  layer = MoE(cfg, rngs=nnx.Rngs(0))
  mesh = par.make_mesh(par.MeshConfig(2, 2, 2))
  specs = par.tree_specs(nnx.state(layer), mesh)
  assert specs["experts"]["w_gate"].get_value() == P("expert", None, "tensor")
  assert specs["experts"]["w_up"].get_value() == P("expert", None, "tensor")
  assert specs["experts"]["w_out"].get_value() == P("expert", "tensor")
  assert specs["experts"]["b_gate"].get_value() == P("expert", "tensor")
  assert specs["experts"]["b_out"].get_value() == P("expert")
  assert specs["router"]["kernel"].get_value() == P()
  assert specs["shared"]["w_gate"].get_value() == P(None, "tensor")

  par.shard_model(layer, mesh)
  w = layer.experts.w_gate[...]
  assert w.sharding.is_equivalent_to(NamedSharding(mesh, P("expert", None, "tensor")), 3)
  assert w.addressable_shards[0].data.shape == (4, 16, 16)
  assert layer.router.kernel[...].sharding.is_fully_replicated


def test_optimizer_state_inherits_parameter_shardings():
  """optax moments built from nnx Params keep their logical names: the same rules place them."""
  layer = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2), rngs=nnx.Rngs(0))
  mesh = par.make_mesh(par.MeshConfig(1, 4, 2))
  params = nnx.state(layer, nnx.Param)
  opt = optax.adamw(1e-3).init(params)
  placed = par.shard_tree(opt, mesh)
  mu = placed[0].mu["experts"]["w_out"][...]
  assert mu.sharding.is_equivalent_to(NamedSharding(mesh, P("expert", "tensor")), 3)
  assert placed[0].count.sharding.is_fully_replicated


def test_indivisible_dimension_names_the_parameter():
  layer = MoE(MoEConfig(d_model=16, d_ff=36, num_experts=8, top_k=2), rngs=nnx.Rngs(0))
  mesh = par.make_mesh(par.MeshConfig(1, 1, 8))
  with pytest.raises(ValueError, match=r"w_gate.*divisible by 8, got 36"):
    par.tree_shardings(nnx.state(layer), mesh)


def test_batch_sharding_and_constrain():
  mesh = par.make_mesh(par.MeshConfig(2, 2, 2))
  assert par.batch_sharding(mesh).spec == P(("data", "expert"))
  assert par.batch_sharding(mesh, 3).spec == P(("data", "expert"))
  x = jnp.arange(64.0).reshape(8, 8)

  @jax.jit
  def f(x):
    return par.constrain(x * 2, ("batch", "mlp"), mesh)

  y = f(x)
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "expert"), "tensor")), 2)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)
  # Without a mesh (argument or ambient), constrain is the identity.
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: par.constrain(x, ("batch", None)))(x)),
                                np.asarray(x))
  with pytest.raises(ValueError, match="one entry per dimension"):
    par.constrain(x, ("batch",), mesh)
