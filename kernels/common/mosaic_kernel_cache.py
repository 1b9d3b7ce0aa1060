"""Identical Mosaic GPU kernels compile once per process, not once per call site (JAX 0.11.2).

Mosaic GPU compiles each kernel (LLVM, then ptxas) when XLA instantiates its custom call, and
caches the result by `kernel_hash`, the SHA-256 of the serialized MLIR module. The lowering stamps
every module with a `mosaic_gpu.dump_basename` attribute, "<kernel name>_<process-wide counter>",
which names its debug dumps. The counter makes every call site's module unique, so the cache never
hits: a 12-layer dMoE train step compiled its ~84 grouped-matmul call sites one by one, though
only a handful differ (the Small preset: train step 143 s to compile on the H100, against 29 s for
the capacity baseline's, which has no Mosaic kernels).

`install()` wraps the lowering's serialization step to drop the attribute before the module is
hashed, so equal kernels get equal hashes and share one compiled binary. The attribute is kept
when a MOSAIC_GPU_DUMP_* variable asks for dumps (they need distinct names); the C++ compile step
sets a fresh name where it needs one. A no-op if this JAX's internals differ (the wrapped
function is private API): kernels then compile per call site, as before, and stay correct.
"""

from __future__ import annotations

import functools
import os

_ATTR = "mosaic_gpu.dump_basename"
_MARK = "_jaxmoe_drops_dump_basename"


def _dumping() -> bool:
  return any(k.startswith("MOSAIC_GPU_DUMP") for k in os.environ)


def install() -> bool:
  """Make the Mosaic GPU lowering hash kernels by content; True if the hook is in place."""
  try:
    from jax.experimental.mosaic.gpu import core
  except ImportError:  # a jaxlib without Mosaic GPU
    return False
  serde = getattr(core, "_run_serde_pass", None)
  if serde is None:
    return False
  if getattr(serde, _MARK, False):
    return True

  @functools.wraps(serde)
  def run_serde_pass(module, *args, **kwargs):
    out = serde(module, *args, **kwargs)
    if kwargs.get("serialize") and not _dumping():
      attrs = out.operation.attributes
      if _ATTR in attrs:
        del attrs[_ATTR]
    return out

  setattr(run_serde_pass, _MARK, True)
  core._run_serde_pass = run_serde_pass
  return True
