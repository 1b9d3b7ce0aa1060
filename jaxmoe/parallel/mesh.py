"""The device mesh: one `jax.sharding.Mesh` with named axes ("data", "expert", "tensor").

  data    replicas of everything except the experts; the batch is split over it.
  expert  experts are split over it (expert parallelism); outside the experts it is one more
          data-parallel axis, so the batch is split over ("data", "expert") (DeepSpeed-TED).
  tensor  each expert's hidden width d_ff is split over it (Megatron: first matmul column-split,
          second row-split, one reduction). Tensor ranks hold the same tokens.

  mesh = make_mesh(MeshConfig(data=2, expert=4, tensor=1))        # or data=-1: "the rest"
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "expert", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes. -1 (at most one field) means "all remaining devices".

  Attributes:
    data: data-parallel replicas (default -1: the devices not used by expert x tensor).
    expert: expert-parallel ranks; num_experts must be divisible by it.
    tensor: tensor-parallel ranks inside each expert; d_ff must be divisible by it.
  """

  data: int = -1
  expert: int = 1
  tensor: int = 1

  def __post_init__(self):
    for name in AXES:
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
        raise ValueError(f"MeshConfig.{name} must be a positive int or -1 (the rest), got {v!r}")
    rest = [name for name in AXES if getattr(self, name) == -1]
    if len(rest) > 1:
      raise ValueError(f"MeshConfig: at most one axis may be -1 (the rest), got -1 for {rest}")

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    """(data, expert, tensor) sizes on `num_devices` devices, -1 resolved.

    ValueError if they do not fit: with a -1 the fixed axes must divide num_devices; without one,
    the product must be <= num_devices (a mesh may use a prefix of the devices).
    """
    sizes = {name: getattr(self, name) for name in AXES}
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    for name, v in sizes.items():
      if v == -1:
        if num_devices % fixed:
          raise ValueError(f"MeshConfig.{name}=-1: the other axes ({fixed} devices) must divide "
                           f"the {num_devices} devices")
        sizes[name] = num_devices // fixed
    total = int(np.prod(list(sizes.values())))
    if total > num_devices:
      raise ValueError(f"MeshConfig data={sizes['data']} x expert={sizes['expert']} x tensor="
                       f"{sizes['tensor']} = {total} devices does not fit the {num_devices} "
                       "available")
    return sizes["data"], sizes["expert"], sizes["tensor"]


def make_mesh(config: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh with axes ("data", "expert", "tensor") of `config`'s sizes.

  devices: default all (global) devices, jax.devices(); on several hosts (after
  jax.distributed.initialize) that is every process's devices. With all devices, jax.make_mesh
  orders them for the interconnect (the last axis, "tensor", varies fastest: NVLink neighbours;
  "data" slowest: across hosts). Axis types are Auto (GSPMD propagation outside shard_map).
  """
  config = MeshConfig() if config is None else config
  if not isinstance(config, MeshConfig):
    raise ValueError(f"config must be a MeshConfig, got {type(config).__name__}")
  devices = list(jax.devices() if devices is None else devices)
  shape = config.shape(len(devices))
  n = int(np.prod(shape))
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  if n == len(devices) and devices == list(jax.devices()):
    return jax.make_mesh(shape, AXES, axis_types=auto)
  return Mesh(np.array(devices[:n]).reshape(shape), AXES, axis_types=auto)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
  """{axis: size} for the three TED axes; an axis the mesh lacks counts as size 1."""
  return {name: int(mesh.shape.get(name, 1)) for name in AXES}
