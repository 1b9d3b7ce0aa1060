"""Backend names and how a default is picked.

  "xla"               jax.lax.ragged_dot and its own transpose rules (portable; CPU default)
  "triton"            Pallas kernels lowered through Triton (GPU)
  "mosaic"            Pallas kernels lowered through Mosaic GPU: TMA + wgmma (Hopper only)
  "pallas"            the fastest Pallas kernel for the shape on this GPU (GPU default)
  "triton_interpret"  the Triton kernels run by the Pallas interpreter (how CPU tests check them)
  "mosaic_interpret"  the Mosaic GPU kernels run by the Pallas interpreter
"""

from __future__ import annotations

import jax

BACKENDS = ("xla", "triton", "mosaic", "pallas", "triton_interpret", "mosaic_interpret")


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def is_hopper() -> bool:
  if not on_gpu():
    return False
  kind = getattr(jax.devices()[0], "compute_capability", "")
  return str(kind).startswith("9")


def resolve_backend(backend: str | None) -> str:
  """Validates `backend` and maps None to the platform default."""
  if backend is None:
    return "pallas" if on_gpu() else "xla"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
  return backend
