"""Lower (not run) a function for an H100 from a machine without a GPU.

CI has no GPU, but the Pallas Triton and Mosaic GPU lowerings are pure Python up to the MLIR
module, so lowering for an abstract H100 catches unsupported primitives, bad block shapes and
layout errors on CPU. Compiling to PTX and running still needs the GPU.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import AbstractDevice, AbstractMesh

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")


def lower_for_gpu(fn: Callable, *args, device: AbstractDevice = H100) -> str:
  """StableHLO text of jit(fn) lowered for CUDA on `device`; args may be ShapeDtypeStructs."""
  mesh = AbstractMesh((1,), ("_",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  return lowered.as_text()
