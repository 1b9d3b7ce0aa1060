"""Row-wise top-k in Pallas, lowered through Triton (any CUDA GPU; interpret mode on CPU).

  indices[t], values[t] = the k largest of x[t, :E], best first, lowest index first among equals

jax.lax.top_k is an XLA sort on the GPU: 161 us for (40960, 128) float32, k = 8, on an H200,
where a row max (one read of the scores) takes 36 us and this kernel 42.5 us
(experiments/bench_topk.py). Here each program owns `block_t` rows and holds their E
scores in registers (E padded to a power of two, E_pad), then runs k rounds of: the largest score
among the lanes not taken yet, the lowest lane holding it, mark that lane taken. A row is read
once and the (T, k) results are written once.

Order: every score becomes an int32 key whose signed order is XLA's float total order
(-NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN), the order lax.top_k sorts by (checked on CPU:
NaN ranks above +inf, +0 above -0), so ties, infinities, NaN and signed zeros choose as it does.
The `taken` mask is kept apart from the keys: no key value can stand for "taken" (every int32 is
some float's key), and rows whose scores are all -inf (the router masks whole groups so) must
still choose k distinct lanes. The padding lanes start taken, so they are never chosen (k <= E).
A chosen key maps back to its float exactly (the map is its own inverse), so values come out of
the registers, not from a second read.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels.common.groups import cdiv, pow2_at_least
from kernels.topk.shapes import TopKShape

# A row lives in one program's registers. At E_pad = 1024 with 4 warps one row already takes 8
# registers per thread per (block_t, E_pad) array (keys, lane ids, taken mask, candidates); larger
# E would spill, and no published MoE routes over more than 384 experts. Larger E runs on "xla".
MAX_EXPERTS = 1024
# Scores a program holds by default: 32 per thread at 4 warps in each of the live (block_t, E_pad)
# arrays. The check refuses blocks 4x larger (128 per thread per array at 4 warps), past which the
# arrays cannot all stay in the 255 registers a thread has.
BLOCK_ELEMENTS = 4096
MAX_BLOCK_ELEMENTS = 16384
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_LOW_BITS = 0x7FFFFFFF
_INT32_MIN = -(2 ** 31)


@dataclasses.dataclass(frozen=True)
class TritonTopKConfig:
  """block_t: rows per program (a power of two). num_warps: Triton warps per program."""
  block_t: int = 32
  num_warps: int = 4

  def __post_init__(self):
    if self.block_t < 1 or self.block_t & (self.block_t - 1):
      raise ValueError(f"config.block_t must be a power of two >= 1, got {self.block_t}")
    if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
      raise ValueError(f"config.num_warps must be a power of two >= 1, got {self.num_warps}")


# From k = 16 on a program holds a quarter of BLOCK_ELEMENTS at 8 warps: its k rounds are serial,
# and fewer rows per program give more programs to hide them (H100 sweep at T 32768, E 256, k 16:
# 4 rows at 8 warps 93 us, the 16 rows at 4 warps that BLOCK_ELEMENTS gives 146-150 us;
# experiments/results/h100/2026-12-07-topk-sweep.json). At k <= 8 the sweep's best configs are
# within noise of the default, so it stays.
LARGE_K = 16


def default_config(shape: TopKShape, dtypes) -> TritonTopKConfig:
  """BLOCK_ELEMENTS scores per program (32 rows of 128 experts, 4 rows of 1024) at 4 warps; from
  k = LARGE_K a quarter of that at 8 warps (4 rows of 256 experts)."""
  e_pad = pow2_at_least(shape.e)
  elements, warps = (BLOCK_ELEMENTS // 4, 8) if shape.k >= LARGE_K else (BLOCK_ELEMENTS, 4)
  block_t = max(1, min(128, elements // e_pad, pow2_at_least(max(shape.t, 1))))
  return TritonTopKConfig(block_t=block_t, num_warps=warps)


def check(shape: TopKShape, dtypes, config: TritonTopKConfig) -> str | None:
  """Why the kernel cannot run this shape with `config`, or None."""
  dtype = jnp.dtype(dtypes[0])
  if dtype not in SUPPORTED_DTYPES:
    return f"scores of float32, bfloat16 or float16 (got {dtype})"
  if shape.e > MAX_EXPERTS:
    return f"E <= {MAX_EXPERTS} (a row of scores lives in registers; got E = {shape.e})"
  if config.block_t * pow2_at_least(shape.e) > MAX_BLOCK_ELEMENTS:
    return (f"block_t * E_pad <= {MAX_BLOCK_ELEMENTS} scores per program (got {config.block_t} * "
            f"{pow2_at_least(shape.e)})")
  return None


def search_space(shape: TopKShape, dtypes, smoke: bool = False) -> list[TritonTopKConfig]:
  """The default, then rows per program x0.25 .. x4 at 4 and 8 warps (those `check` accepts)."""
  base = default_config(shape, dtypes)
  if smoke:
    return [base]
  out = [base]
  for scale in (0.25, 0.5, 1, 2, 4):
    for warps in (4, 8):
      cfg = TritonTopKConfig(block_t=max(1, int(base.block_t * scale)), num_warps=warps)
      if cfg not in out and check(shape, dtypes, cfg) is None:
        out.append(cfg)
  return out


def _total_order_key(bits: jax.Array) -> jax.Array:
  """int32 float bits -> a key whose signed order is the float total order; its own inverse
  (negative floats, sign bit set, get their other 31 bits flipped, so larger magnitude sorts
  lower; the sign bit, and so the key's sign, stays)."""
  return bits ^ (jax.lax.shift_right_arithmetic(bits, 31) & _LOW_BITS)


def _kernel(x_ref, values_ref, indices_ref, *, t: int, e: int, k: int, block_t: int):
  e_pad, k_pad = pow2_at_least(e), pow2_at_least(k)
  row0 = pl.program_id(0) * block_t
  row_ok = row0 + jnp.arange(block_t, dtype=jnp.int32) < t
  lanes = jnp.arange(e_pad, dtype=jnp.int32)[None, :]
  x = plt.load(x_ref.at[pl.ds(row0, block_t), pl.ds(0, e_pad)],
               mask=row_ok[:, None] & (lanes < e), other=0.0)
  keys = _total_order_key(jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32))
  cols = jnp.arange(k_pad, dtype=jnp.int32)[None, :]

  def choose(j, carry):
    taken, out_idx, out_key = carry
    free_keys = jnp.where(taken, _INT32_MIN, keys)
    best = jnp.max(free_keys, axis=1)[:, None]                                 # (block_t, 1)
    # Among the free lanes holding the best key, the lowest (a free lane always exists: k <= E).
    lane = jnp.min(jnp.where(~taken & (free_keys == best), lanes, e_pad), axis=1)[:, None]
    taken = taken | (lanes == lane)
    out_idx = jnp.where(cols == j, lane, out_idx)
    out_key = jnp.where(cols == j, best, out_key)
    return taken, out_idx, out_key

  zeros = jnp.zeros((block_t, k_pad), jnp.int32)
  taken0 = jnp.broadcast_to(lanes >= e, (block_t, e_pad))
  _, out_idx, out_key = jax.lax.fori_loop(0, k, choose, (taken0, zeros, zeros))
  values = jax.lax.bitcast_convert_type(_total_order_key(out_key), jnp.float32)
  store_mask = row_ok[:, None] & (cols < k)
  plt.store(values_ref.at[pl.ds(row0, block_t), pl.ds(0, k_pad)],
            values.astype(values_ref.dtype), mask=store_mask)
  plt.store(indices_ref.at[pl.ds(row0, block_t), pl.ds(0, k_pad)], out_idx, mask=store_mask)


def top_k(x: jax.Array, k: int, *, config: TritonTopKConfig | None = None,
          interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """(values (T, k) of x's dtype, indices (T, k) int32) of the k largest scores of each row of
  x (T, E), as jax.lax.top_k; see the module docstring. Inputs are validated by the public op
  (kernels.top_k)."""
  t, e = x.shape
  out_shape = (jax.ShapeDtypeStruct((t, k), x.dtype), jax.ShapeDtypeStruct((t, k), jnp.int32))
  if t == 0:   # no program to launch
    return jnp.zeros((0, k), x.dtype), jnp.zeros((0, k), jnp.int32)
  cfg = config or default_config(TopKShape(t, e, k), (x.dtype,))
  return pl.pallas_call(
      functools.partial(_kernel, t=t, e=e, k=k, block_t=cfg.block_t),
      out_shape=out_shape,
      grid=(cdiv(t, cfg.block_t),),
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
      interpret=interpret,
      name="jaxmoe_top_k",
  )(x)
