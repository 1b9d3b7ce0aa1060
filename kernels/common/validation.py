"""Argument checks shared by the public ops. Each raises ValueError naming the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_float_operand(name: str, x: jax.Array, ndim: int) -> None:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{name} must be an array, got {type(x).__name__}")
  if x.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
  if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
    raise ValueError(
        f"{name} must be one of float32, bfloat16, float16, got dtype {jnp.dtype(x.dtype)}"
    )


def check_same_dtype(**operands: jax.Array) -> None:
  dtypes = {name: jnp.dtype(x.dtype) for name, x in operands.items()}
  if len(set(dtypes.values())) > 1:
    desc = ", ".join(f"{name}: {dt}" for name, dt in dtypes.items())
    raise ValueError(f"operands must share one dtype, got {desc}")


def check_group_sizes(group_sizes: jax.Array, num_groups: int | None) -> None:
  if not hasattr(group_sizes, "shape") or group_sizes.ndim != 1:
    shape = getattr(group_sizes, "shape", type(group_sizes).__name__)
    raise ValueError(f"group_sizes must be a 1-D int32 array, got {shape}")
  if jnp.dtype(group_sizes.dtype) != jnp.dtype(jnp.int32):
    raise ValueError(f"group_sizes must have dtype int32, got {jnp.dtype(group_sizes.dtype)}")
  if num_groups is not None and group_sizes.shape[0] != num_groups:
    raise ValueError(
        f"group_sizes must have shape ({num_groups},) to match the {num_groups} groups of rhs, "
        f"got {tuple(group_sizes.shape)}"
    )


def check_dim(name: str, got: int, want: int, what: str) -> None:
  if got != want:
    raise ValueError(f"{name}: {what} must be {want}, got {got}")
