"""Block-sparse products as Pallas kernels lowered through Triton (GPU; interpret mode on CPU).

Layouts (see topology.py): S is the (P, E*f) block-sparse matrix stored as data (Z, b, b).
  sdd: one program per nonzero block z (grid Z, the static bound): data[z] = lhs[row block] @
       rhs[:, column block] with a K loop; programs z >= nnz write zeros.
  dsd: one program per (output block line, N tile): loops over the nonzero blocks of its block row
       or, for S^T, of its block column.
  dds: one program per (M tile, output block line): loops over the blocks of its block column or,
       for S^T, of its block row.
All three walk a 1-D grid swizzled in bands of `group_lines` block rows/columns (as a tiled GEMM
rasterizes), so the programs running together share their sparse blocks and dense tiles in L2.
Each output tile is owned by exactly one program (block rows/columns never straddle two lines), so
there is no shared-tile race; every program writes its tile, zeros for empty lines.
Metadata arrays are passed as ordinary int32 operands and read with scalar loads.

The kernels rely on the dMoE layout that make_topology builds (the only producer of a Topology;
_line_operands checks the static shapes, the values are make_topology's precondition): expert e
owns the contiguous valid row blocks [r0_e, r0_e + n_e), r0_e = padded_offsets[e] / b; every valid
row block r of expert e holds exactly C = f / b blocks, at block columns e*C + j (j < C), stored at
data[r*C + j]. So a line's blocks are affine in the loop index and no index array is read inside
the loop, which Triton can software-pipeline like a GEMM's K loop (a CSR/CSC walk's indirect
data[blk[t]] loads are the likely reason dsd/dds ran ~1.5x sdd's time on the H100 with one):
  block row r < num_valid_row_blocks:  t < C (static),  data[r*C + t],  column column_indices[r*C] + t
  block column (e, j):                 t < n_e,         data[(r0_e + t)*C + j],  row r0_e + t
sdd's program z is likewise (row z // C, column column_indices[z]).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels.blocksparse.products import BlockSparseKernels
from kernels.blocksparse.topology import Topology
from kernels.common.groups import cdiv
from kernels.common.registry import Backend
from kernels.common.triton_dot import dot_f32


@dataclasses.dataclass(frozen=True)
class BlockSparseConfig:
  """Tile sizes for the Triton kernels (the sparse block size itself comes from the topology).

  block_k: K step of sdd.  block_n: dense N tile of dsd.  block_m: dense M tile of dds.
  All must be powers of two >= 16 for Triton dots.  group_lines: block rows (sdd, dsd) or block
  columns (dds) per band of the swizzled grid.
  """
  block_k: int = 64
  block_n: int = 128
  block_m: int = 128
  group_lines: int = 8
  num_warps: int = 8
  num_stages: int = 3

  def validate(self) -> None:
    for name in ("block_k", "block_n", "block_m"):
      v = getattr(self, name)
      if v < 16 or v & (v - 1):
        raise ValueError(f"config.{name} must be a power of two >= 16, got {v}")
    if self.group_lines < 1:
      raise ValueError(f"config.group_lines must be >= 1, got {self.group_lines}")


def default_config(dtype) -> BlockSparseConfig:
  """The default tiles; 2 pipeline stages for 32-bit operands. Since the inner loops became
  affine, Triton software-pipelines them with num_stages buffers: 3 stages of float32 tiles
  asked for 262144 bytes of shared memory on the H100 (limit 232448); 2 fit."""
  return BlockSparseConfig(num_stages=2) if jnp.dtype(dtype).itemsize >= 4 else BlockSparseConfig()


def _params(cfg: BlockSparseConfig):
  return plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _swizzle(num_lines: int, num_other: int, group: int):
  """(line, other) of this program on a 1-D grid of num_lines * num_other programs, in bands of
  `group` lines: consecutive programs sweep the lines of a band before moving to the next `other`."""
  pid = pl.program_id(0)
  band_size = group * num_other
  first = (pid // band_size) * group
  band_lines = jnp.minimum(num_lines - first, group)
  return first + (pid % band_size) % band_lines, (pid % band_size) // band_lines


# Contract dim 1 of a with dim 0 of b, optionally with either operand stored transposed.
def _mm(a, b, ta: bool, tb: bool):
  dims = (((0,) if ta else (1,), (1,) if tb else (0,)), ((), ()))
  return dot_f32(a, b, dims)


def _sdd_kernel(nnz_ref, row_ref, col_ref, lhs_ref, rhs_ref, out_ref, *, k, b, cfg, ta, tb,
                num_rows, per_row):
  # Every valid block row holds exactly `per_row` blocks (its expert's), so z = row * per_row + j.
  r, j = _swizzle(num_rows, per_row, cfg.group_lines)
  z = r * per_row + j
  bk = cfg.block_k

  @pl.when(z >= nnz_ref[0])
  def _():
    out_ref[z] = jnp.zeros((b, b), out_ref.dtype)

  @pl.when(z < nnz_ref[0])
  def _():
    r0 = row_ref[z] * b
    c0 = col_ref[z] * b
    ragged = k % bk != 0

    def body(ki, acc):
      k0 = ki * bk
      kmask = (k0 + jnp.arange(bk, dtype=jnp.int32)) < k
      if ta:  # lhs (K, P)
        a_idx, a_mask = lhs_ref.at[pl.ds(k0, bk), pl.ds(r0, b)], kmask[:, None]
      else:
        a_idx, a_mask = lhs_ref.at[pl.ds(r0, b), pl.ds(k0, bk)], kmask[None, :]
      if tb:  # rhs (E*f, K)
        w_idx, w_mask = rhs_ref.at[pl.ds(c0, b), pl.ds(k0, bk)], kmask[None, :]
      else:
        w_idx, w_mask = rhs_ref.at[pl.ds(k0, bk), pl.ds(c0, b)], kmask[:, None]
      if ragged:
        a = plt.load(a_idx, mask=a_mask, other=0.0)
        w = plt.load(w_idx, mask=w_mask, other=0.0)
      else:
        a, w = a_idx[...], w_idx[...]
      return acc + _mm(a, w, ta, tb)

    acc = jax.lax.fori_loop(0, cdiv(k, bk), body, jnp.zeros((b, b), jnp.float32))
    out_ref[z] = acc.astype(out_ref.dtype)


def sdd(lhs, rhs, topo: Topology, *, transpose_lhs, transpose_rhs, out_dtype,
        config: BlockSparseConfig | None = None, interpret: bool = False):
  """(Z, b, b) blocks of lhs @ rhs at the topology; inputs validated by the public op."""
  cfg = config or default_config(lhs.dtype)
  k = lhs.shape[0] if transpose_lhs else lhs.shape[1]
  b = topo.block_size
  kernel = functools.partial(_sdd_kernel, k=k, b=b, cfg=cfg, ta=transpose_lhs, tb=transpose_rhs,
                             num_rows=topo.num_row_blocks, per_row=topo.blocks_per_expert)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(topo.data_shape, out_dtype),
      grid=(topo.max_nnz,),
      compiler_params=_params(cfg),
      interpret=interpret,
      name="jaxmoe_bsr_sdd",
  )(topo.nnz, topo.row_indices, topo.column_indices, lhs, rhs)


def _line_operands(topo: Topology, by_column: bool) -> tuple[jax.Array, ...]:
  """Metadata operands of _reduce_line: for block columns the padded row offsets (E+1,); for
  block rows the valid row-block count (1,) and the column indices (Z,)."""
  e, z = topo.num_experts, topo.max_nnz
  # Static shapes only: the value-level layout is make_topology's (see the module docstring).
  shapes = {"padded_offsets": (topo.padded_offsets.shape, (e + 1,)),
            "num_valid_row_blocks": (topo.num_valid_row_blocks.shape, (1,)),
            "column_indices": (topo.column_indices.shape, (z,))}
  for name, (got, want) in shapes.items():
    if tuple(got) != want:
      raise ValueError(f"topo.{name} must have shape {want}, got {tuple(got)}: build the "
                       "topology with make_topology")
  if by_column:
    return (topo.padded_offsets,)
  return (topo.num_valid_row_blocks, topo.column_indices)


def _reduce_line(meta, line, step, init, store, *, by_column: bool, b: int, per_expert: int):
  """store(init + sum of step(z, o0) over the nonzero blocks of `line`); store(init) if it has none.

  step(z, o0) multiplies data[z] with the dense operand's b rows/columns starting at o0 (the block
  index on the other side, times b). The base indices are scalar loads made once; inside the loop
  z and o0 are affine in the loop index (the module docstring's invariant), so Triton can pipeline
  the block loads as it does sdd's K loop.
  """
  c = per_expert
  if by_column:
    (offsets_ref,) = meta
    e, j = line // c, line % c
    r0 = offsets_ref[e] // b
    n = offsets_ref[e + 1] // b - r0      # 0 for an empty expert: the loop stores init (zeros)

    # Block column (e, j) holds expert e's row blocks r0 .. r0+n-1, stored at data[r*c + j].
    def col_body(t, acc):
      r = r0 + t
      return acc + step(r * c + j, r * b)

    store(jax.lax.fori_loop(0, n, col_body, init))
    return

  nvalid_ref, col_ref = meta
  nvalid = nvalid_ref[0]

  @pl.when(line < nvalid)
  def _():
    # Block row r holds its expert's c blocks, stored at data[r*c + t], column col[r*c] + t: a
    # static trip count, like sdd's K loop.
    z0 = line * c
    o0 = col_ref[z0] * b

    def row_body(t, acc):
      return acc + step(z0 + t, o0 + t * b)

    store(jax.lax.fori_loop(0, c, row_body, init))

  @pl.when(line >= nvalid)
  def _():
    store(init)                           # padding row block


def _dsd_kernel(*refs, n, b, cfg, ta, tb, num_lines, per_expert):
  *meta, data_ref, rhs_ref, out_ref = refs
  line, ni = _swizzle(num_lines, cdiv(n, cfg.block_n), cfg.group_lines)
  bn = cfg.block_n
  n0 = ni * bn
  nmask = (n0 + jnp.arange(bn, dtype=jnp.int32)) < n
  ragged = n % bn != 0

  def step(z, o0):
    s = data_ref[z]                              # (b, b)
    if tb:  # rhs (N, K_sparse)
      idx, mask = rhs_ref.at[pl.ds(n0, bn), pl.ds(o0, b)], nmask[:, None]
    else:
      idx, mask = rhs_ref.at[pl.ds(o0, b), pl.ds(n0, bn)], nmask[None, :]
    w = plt.load(idx, mask=mask, other=0.0) if ragged else idx[...]
    return _mm(s, w, ta, tb)

  def store(acc):
    out = out_ref.at[pl.ds(line * b, b), pl.ds(n0, bn)]
    if ragged:
      plt.store(out, acc.astype(out_ref.dtype), mask=nmask[None, :])
    else:
      out[...] = acc.astype(out_ref.dtype)

  # S^T @ rhs walks S's block columns; S @ rhs its block rows.
  _reduce_line(meta, line, step, jnp.zeros((b, bn), jnp.float32), store, by_column=ta, b=b,
               per_expert=per_expert)


def dsd(data, rhs, topo: Topology, *, transpose_lhs, transpose_rhs, out_dtype,
        config: BlockSparseConfig | None = None, interpret: bool = False):
  """S @ rhs or S^T @ rhs (rhs optionally stored transposed); see the module docstring."""
  cfg = config or default_config(data.dtype)
  b = topo.block_size
  n = rhs.shape[0] if transpose_rhs else rhs.shape[1]
  meta = _line_operands(topo, by_column=transpose_lhs)
  num_lines = topo.num_col_blocks if transpose_lhs else topo.num_row_blocks
  kernel = functools.partial(_dsd_kernel, n=n, b=b, cfg=cfg, ta=transpose_lhs, tb=transpose_rhs,
                             num_lines=num_lines, per_expert=topo.blocks_per_expert)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_lines * b, n), out_dtype),
      grid=(num_lines * cdiv(n, cfg.block_n),),
      compiler_params=_params(cfg),
      interpret=interpret,
      name="jaxmoe_bsr_dsd",
  )(*meta, data, rhs)


def _dds_kernel(*refs, m, b, cfg, ta, tb, num_lines, per_expert):
  *meta, lhs_ref, data_ref, out_ref = refs
  line, mi = _swizzle(num_lines, cdiv(m, cfg.block_m), cfg.group_lines)
  bm = cfg.block_m
  m0 = mi * bm
  mmask = (m0 + jnp.arange(bm, dtype=jnp.int32)) < m
  ragged = m % bm != 0

  def step(z, o0):
    s = data_ref[z]                              # (b, b)
    if ta:  # lhs (K_sparse, M)
      idx, mask = lhs_ref.at[pl.ds(o0, b), pl.ds(m0, bm)], mmask[None, :]
    else:
      idx, mask = lhs_ref.at[pl.ds(m0, bm), pl.ds(o0, b)], mmask[:, None]
    a = plt.load(idx, mask=mask, other=0.0) if ragged else idx[...]
    return _mm(a, s, ta, tb)

  def store(acc):
    out = out_ref.at[pl.ds(m0, bm), pl.ds(line * b, b)]
    if ragged:
      plt.store(out, acc.astype(out_ref.dtype), mask=mmask[:, None])
    else:
      out[...] = acc.astype(out_ref.dtype)

  # lhs @ S walks S's block columns; lhs @ S^T its block rows.
  _reduce_line(meta, line, step, jnp.zeros((bm, b), jnp.float32), store, by_column=not tb, b=b,
               per_expert=per_expert)


def dds(lhs, data, topo: Topology, *, transpose_lhs, transpose_rhs, out_dtype,
        config: BlockSparseConfig | None = None, interpret: bool = False):
  """lhs @ S or lhs @ S^T (lhs optionally stored transposed); see the module docstring."""
  cfg = config or default_config(lhs.dtype)
  b = topo.block_size
  m = lhs.shape[1] if transpose_lhs else lhs.shape[0]
  meta = _line_operands(topo, by_column=not transpose_rhs)
  num_lines = topo.num_row_blocks if transpose_rhs else topo.num_col_blocks
  kernel = functools.partial(_dds_kernel, m=m, b=b, cfg=cfg, ta=transpose_lhs, tb=transpose_rhs,
                             num_lines=num_lines, per_expert=topo.blocks_per_expert)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, num_lines * b), out_dtype),
      grid=(num_lines * cdiv(m, cfg.block_m),),
      compiler_params=_params(cfg),
      interpret=interpret,
      name="jaxmoe_bsr_dds",
  )(*meta, lhs, data)


# ---------------------------------------------------------------------------------------------
# Backend records ("triton" and its interpreted twin).


def _default_config(shapes, dtypes) -> BlockSparseConfig:
  return default_config(dtypes[0])


def _check(shapes, dtypes, config: BlockSparseConfig) -> str | None:
  try:
    config.validate()
  except ValueError as e:
    return str(e)
  return None


TRITON = Backend(name="triton", fn=BlockSparseKernels(sdd, dsd, dds),
                 config_classes=(BlockSparseConfig,), default_config=_default_config,
                 check=_check, needs_gpu=True)
TRITON_INTERPRET = Backend(
    name="triton_interpret",
    fn=BlockSparseKernels(*(functools.partial(f, interpret=True) for f in (sdd, dsd, dds))),
    config_classes=(BlockSparseConfig,), default_config=_default_config, check=_check,
    interpret=True)
