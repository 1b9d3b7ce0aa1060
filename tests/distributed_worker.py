"""One process of the multi-process test (tests/test_distributed.py); also a launch example.

  python tests/distributed_worker.py PROCESS_ID NUM_PROCESSES COORDINATOR [D,E,T ...]

Each process runs on its own CPU devices (4 by default; XLA_FLAGS/JAX_PLATFORMS are set here before
jax is imported), joins JAX's multi-controller runtime with jax.distributed.initialize, builds the
global (data, expert, tensor) mesh over every process's devices (each layout D,E,T given; default
2,2,2 and 1,4,2), runs the expert-parallel MoE layer (forward and gradients) on it, and compares
with the same layer computed on one local device.
Prints "OK ..." and exits 0 on agreement; exits 1 with the errors otherwise.
"""

from __future__ import annotations

import os
import sys

LOCAL_DEVICES = int(os.environ.get("JAXMOE_LOCAL_DEVICES", "4"))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "").replace(
    "--xla_force_host_platform_device_count", "--ignored_device_count")
    + f" --xla_force_host_platform_device_count={LOCAL_DEVICES}")
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def main() -> int:
  process_id, num_processes, coordinator = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  layouts = [tuple(int(v) for v in a.split(",")) for a in sys.argv[4:]] or [(2, 2, 2), (1, 4, 2)]
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=120)
  assert jax.process_index() == process_id and jax.process_count() == num_processes
  assert jax.local_device_count() == LOCAL_DEVICES, jax.local_devices()
  assert jax.device_count() == LOCAL_DEVICES * num_processes, jax.devices()

  from flax import nnx
  from jax.experimental import multihost_utils

  from jaxmoe import MoE, MoEConfig
  from jaxmoe import parallel as par

  cfg = MoEConfig(d_model=16, d_ff=40, num_experts=8, top_k=2)
  t = 64
  x_np = np.asarray(jax.random.normal(jax.random.key(1), (t, 16), jnp.float32))
  g_np = np.asarray(jax.random.normal(jax.random.key(2), (t, 16), jnp.float32))

  def loss_fn(graphdef):
    def loss(state, x, g):
      y, stats = nnx.merge(graphdef, state)(x)
      return jnp.sum(y * g) + stats.loss, y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  # Reference: the single-device layer on this process's first device.
  ref = MoE(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(ref)
  (_, y0), (gs0, gx0) = loss_fn(graphdef)(state, x_np, g_np)

  def full(a):
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))

  def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

  ok = True
  for layout in layouts:
    # The same layer over the global mesh (every process's devices).
    mesh = par.make_mesh(par.MeshConfig(*layout))
    layer = MoE(cfg, rngs=nnx.Rngs(0), parallel=par.ParallelConfig(mesh, remat="comm_aware"))
    graphdef, state = nnx.split(layer)
    state = par.shard_tree(jax.device_get(state), mesh)   # same host values on every process
    bs = par.batch_sharding(mesh)
    x = jax.make_array_from_callback(x_np.shape, bs, lambda idx: x_np[idx])
    g = jax.make_array_from_callback(g_np.shape, bs, lambda idx: g_np[idx])
    (_, y), (gs, gx) = loss_fn(graphdef)(state, x, g)
    assert not y.is_fully_addressable   # really spread over the processes
    # Does one expert-parallel group hold devices of several processes (all-to-all across them)?
    groups = np.moveaxis(np.vectorize(lambda d: d.process_index)(mesh.devices), 1, -1)
    crosses = bool(np.any(groups.reshape(-1, mesh.shape["expert"]).min(-1)
                          != groups.reshape(-1, mesh.shape["expert"]).max(-1)))

    errs = {"y": rel(full(y), y0), "dx": rel(full(gx), gx0)}
    for (path, a), (_, b) in zip(jax.tree.leaves_with_path(gs), jax.tree.leaves_with_path(gs0)):
      errs["d" + jax.tree_util.keystr(path)] = rel(full(a), b)
    worst = max(errs.values())
    status = "OK" if worst < 1e-5 else "MISMATCH"
    ok = ok and status == "OK"
    print(f"{status} process {process_id}/{num_processes} devices {jax.device_count()} mesh "
          f"{dict(mesh.shape)} expert all-to-all across processes: {crosses}; max rel err "
          f"{worst:.2e} {errs}", flush=True)
  jax.distributed.shutdown()
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
