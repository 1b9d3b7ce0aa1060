"""Block-sparse topology and padded gather/scatter: structure invariants, bounds, validation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.blocksparse import make_topology, pad_rows, unpad_rows, block_mask, num_row_blocks_bound
from kernels.blocksparse.padding import padded_destination_rows

# (group_sizes, num_rows): ragged, empty experts, one expert takes all, exact multiples, clipped.
CASES = [
    ([5, 0, 40, 3], 48),
    ([0, 0, 37, 0], 37),
    ([16, 32, 0, 16], 64),
    ([1, 1, 1, 1, 1], 5),
    ([10, 30, 20], 50),   # sum 60 > 50: last group clipped
]


def _expected_row_blocks(sizes, m, b):
  ends = np.minimum(np.cumsum(sizes), m)
  clipped = np.diff(np.concatenate([[0], ends]))
  return -(-clipped // b)


@pytest.mark.parametrize("sizes,m", CASES)
def test_structure(sizes, m):
  b, f = 16, 48
  topo = make_topology(jnp.asarray(sizes, jnp.int32), m, ffn_size=f, block_size=b)
  c, e = f // b, len(sizes)
  rb = _expected_row_blocks(np.asarray(sizes), m, b)
  assert topo.num_row_blocks == num_row_blocks_bound(m, e, b) >= rb.sum()
  nnz = int(topo.nnz[0])
  assert nnz == rb.sum() * c
  np.testing.assert_array_equal(np.asarray(topo.padded_offsets), np.concatenate([[0], np.cumsum(rb)]) * b)
  # Row-major blocks: row r of expert e holds columns e*c .. e*c + c - 1, in order.
  rows, cols = np.asarray(topo.row_indices)[:nnz], np.asarray(topo.column_indices)[:nnz]
  rb_expert = np.repeat(np.arange(e), rb)
  np.testing.assert_array_equal(rows, np.repeat(np.arange(rb.sum()), c))
  np.testing.assert_array_equal(cols, (rb_expert[rows] * c + np.tile(np.arange(c), rb.sum())))
  offsets = np.asarray(topo.offsets)
  for r in range(topo.num_row_blocks):
    blocks = np.arange(offsets[r], offsets[r + 1])
    assert np.all(rows[blocks] == r)
  # Transposed order lists every valid block exactly once, grouped by column, rows ascending.
  offsets_t = np.asarray(topo.offsets_t)
  assert offsets_t[-1] == nnz
  blk_t, rows_t = np.asarray(topo.block_offsets_t)[:nnz], np.asarray(topo.row_indices_t)[:nnz]
  assert sorted(blk_t.tolist()) == list(range(nnz))
  for col in range(e * c):
    js = np.arange(offsets_t[col], offsets_t[col + 1])
    assert np.all(cols[blk_t[js]] == col)
    np.testing.assert_array_equal(rows[blk_t[js]], rows_t[js])
    assert np.all(np.diff(rows_t[js]) > 0)
  mask = np.asarray(block_mask(topo))
  assert mask.sum() == nnz * b * b


@pytest.mark.parametrize("sizes,m", CASES)
def test_pad_unpad_roundtrip(sizes, m, rng):
  b = 16
  topo = make_topology(jnp.asarray(sizes, jnp.int32), m, ffn_size=32, block_size=b)
  x = jnp.asarray(rng.standard_normal((m, 6)), jnp.float32)
  xp = np.asarray(pad_rows(x, topo))
  assert xp.shape == (topo.padded_rows, 6)
  ends = np.minimum(np.cumsum(sizes), m)
  starts = np.concatenate([[0], ends[:-1]])
  poff = np.asarray(topo.padded_offsets)
  expected = np.zeros_like(xp)
  for g, (s, t) in enumerate(zip(starts, ends)):
    expected[poff[g]:poff[g] + (t - s)] = np.asarray(x)[s:t]
  np.testing.assert_array_equal(xp, expected)
  back = np.asarray(unpad_rows(jnp.asarray(xp), topo))
  in_group = np.arange(m) < ends[-1]
  np.testing.assert_array_equal(back[in_group], np.asarray(x)[in_group])
  assert np.all(back[~in_group] == 0)
  dst = np.asarray(padded_destination_rows(topo))
  assert np.all(dst[~in_group] == topo.padded_rows)


def test_validation():
  gs = jnp.asarray([3, 4], jnp.int32)
  with pytest.raises(ValueError, match="ffn_size"):
    make_topology(gs, 7, ffn_size=40, block_size=16)
  with pytest.raises(ValueError, match="group_sizes"):
    make_topology(gs.astype(jnp.float32), 7, ffn_size=32, block_size=16)
  with pytest.raises(ValueError, match="num_rows"):
    make_topology(gs, 0, ffn_size=32, block_size=16)
  topo = make_topology(gs, 7, ffn_size=32, block_size=16)
  with pytest.raises(ValueError, match="x_sorted"):
    pad_rows(jnp.zeros((8, 3)), topo)
