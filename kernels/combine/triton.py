"""Gather-and-sum over the k picks of each output row in Pallas, lowered through Triton (any CUDA
GPU; interpret mode on CPU).

  out[t, :] = sum_j weights[t, j] * rows[positions[t, j], :]      (float32 sum, then out dtype)

The MoE combine (rows: the expert outputs in expert-sorted order, positions: where each token's
k choices sit, weights: the router's gates) and the data gradient of a gather (rows: the sorted
rows' gradients, no weights). As XLA runs it, the gather and the sum over k are one fusion whose
form (loop or reduction emitter) XLA picks; here each program owns `block_t` output rows and
`block_n` columns, gathers its k row segments (each block_n contiguous values of one row, so the
loads are coalesced) and sums them in registers: every input byte is read once and every output
byte written once, with no atomics and a fixed order of the k terms (deterministic).

The k loop is unrolled (k is the router's top-k: a few to 16), so the k gathers of a program can
be in flight together. positions and weights come in (k, T) layout, so that one pick's positions
for a block of rows are one contiguous load.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels.combine.reference import gather_sum_reference
from kernels.combine.shapes import CombineShape
from kernels.common.groups import cdiv, pow2_at_least

# The picks are unrolled into one program; past this k the XLA backend runs the op.
MAX_K = 64
# float32 accumulator values per thread: block_t * block_n / (32 * num_warps). Past 64 the
# accumulator and the k loaded segments no longer fit the registers a thread has.
MAX_ACC_PER_THREAD = 64
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class TritonCombineConfig:
  """block_t: output rows per program; block_n: columns per program (powers of two);
  num_warps: Triton warps per program."""
  block_t: int = 16
  block_n: int = 256
  num_warps: int = 4

  def __post_init__(self):
    for name in ("block_t", "block_n", "num_warps"):
      v = getattr(self, name)
      if v < 1 or v & (v - 1):
        raise ValueError(f"config.{name} must be a power of two >= 1, got {v}")


def default_config(shape: CombineShape, dtypes) -> TritonCombineConfig:
  """256 columns (fewer for narrow rows) and 4096 accumulator values per program."""
  block_n = min(256, pow2_at_least(max(shape.n, 1)))
  block_t = max(1, min(64, 4096 // block_n, pow2_at_least(max(shape.t, 1))))
  return TritonCombineConfig(block_t=block_t, block_n=block_n)


def check(shape: CombineShape, dtypes, config: TritonCombineConfig) -> str | None:
  """Why the kernel cannot run this shape with `config`, or None."""
  for what, dtype in zip(("rows", "out"), dtypes):
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
      return f"{what} of float32, bfloat16 or float16 (got {jnp.dtype(dtype)})"
  if shape.k > MAX_K:
    return f"k <= {MAX_K} picks per row (they are unrolled; got k = {shape.k})"
  per_thread = config.block_t * config.block_n // (32 * config.num_warps)
  if per_thread > MAX_ACC_PER_THREAD:
    return (f"block_t * block_n / (32 * num_warps) <= {MAX_ACC_PER_THREAD} accumulator values "
            f"per thread (got {config.block_t} * {config.block_n} / (32 * {config.num_warps}))")
  return None


def search_space(shape: CombineShape, dtypes, smoke: bool = False) -> list[TritonCombineConfig]:
  """The default, then other row and column blocks at 4 and 8 warps (those `check` accepts)."""
  base = default_config(shape, dtypes)
  if smoke:
    return [base]
  out = [base]
  for block_t, block_n, warps in ((8, 256, 4), (32, 256, 8), (16, 512, 8), (32, 128, 4),
                                  (64, 128, 8), (8, 512, 4), (64, 256, 8)):
    cfg = TritonCombineConfig(block_t=block_t, block_n=min(block_n, base.block_n * 2),
                              num_warps=warps)
    if cfg not in out and check(shape, dtypes, cfg) is None:
      out.append(cfg)
  return out


def _kernel(pos_ref, *refs, t: int, k: int, m: int, n: int, block_t: int, block_n: int,
            has_weights: bool):
  w_ref, rows_ref, out_ref = refs if has_weights else (None, *refs)
  t0 = pl.program_id(0) * block_t
  cols = pl.program_id(1) * block_n + jnp.arange(block_n, dtype=jnp.int32)
  t_ok = t0 + jnp.arange(block_t, dtype=jnp.int32) < t
  c_ok = cols < n
  acc = jnp.zeros((block_t, block_n), jnp.float32)
  for j in range(k):
    pick = jnp.int32(j)   # an array index: the interpreter's load takes no Python int
    pos = plt.load(pos_ref.at[pick, pl.ds(t0, block_t)], mask=t_ok, other=0)
    in_range = (pos >= 0) & (pos < m)
    # The interpreter takes gathers only with array indices on every axis.
    picked = plt.load(rows_ref.at[pos[:, None], cols[None, :]],
                      mask=(t_ok & in_range)[:, None] & c_ok[None, :], other=0.0)
    # A position outside [0, M) gives NaN, as the reference's jnp.take does.
    picked = jnp.where(in_range[:, None], picked.astype(jnp.float32), jnp.nan)
    if has_weights:
      w = plt.load(w_ref.at[pick, pl.ds(t0, block_t)], mask=t_ok, other=0.0)
      picked = picked * w.astype(jnp.float32)[:, None]
    acc = acc + picked
  plt.store(out_ref.at[pl.ds(t0, block_t), pl.ds(pl.program_id(1) * block_n, block_n)],
            acc.astype(out_ref.dtype), mask=t_ok[:, None] & c_ok[None, :])


def gather_sum(rows: jax.Array, positions: jax.Array, weights: jax.Array | None = None, *,
               out_dtype, config: TritonCombineConfig | None = None,
               interpret: bool = False) -> jax.Array:
  """(T, N) of out_dtype: out[t] = sum_j weights[t, j] * rows[positions[t, j]]; see the module
  docstring. Inputs are validated by the public op (kernels.gather_sum)."""
  (m, n), (t, k) = rows.shape, positions.shape
  if t == 0 or n == 0 or m == 0:   # no program to launch, or nothing to gather (NaN, as XLA)
    return gather_sum_reference(rows, positions, weights, out_dtype=out_dtype)
  cfg = config or default_config(CombineShape(t, k, m, n), (rows.dtype, out_dtype))
  operands = [positions.T.astype(jnp.int32)]
  if weights is not None:
    operands.append(weights.T)
  operands.append(rows)
  return pl.pallas_call(
      functools.partial(_kernel, t=t, k=k, m=m, n=n, block_t=cfg.block_t, block_n=cfg.block_n,
                        has_weights=weights is not None),
      out_shape=jax.ShapeDtypeStruct((t, n), out_dtype),
      grid=(cdiv(t, cfg.block_t), cdiv(n, cfg.block_n)),
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
      interpret=interpret,
      name="jaxmoe_gather_sum",
  )(*operands)
