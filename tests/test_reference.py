"""The references themselves against a per-row loop in numpy float64."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.common.groups import row_group_ids
from kernels.gmm.reference import gmm_reference, group_xty_reference


def loop_gmm(lhs, rhs, sizes):
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for g, s in enumerate(sizes):
    end = min(start + s, lhs.shape[0])
    for r in range(start, end):
      out[r] = lhs[r].astype(np.float64) @ rhs[g].astype(np.float64)
    start = end
  return out


@pytest.mark.parametrize("sizes", [[3, 0, 5], [8, 0, 0], [0, 0, 2], [4, 4, 4]])
def test_gmm_reference_matches_loop(rng, sizes):
  lhs = rng.standard_normal((10, 4)).astype(np.float32)
  rhs = rng.standard_normal((3, 4, 5)).astype(np.float32)
  gs = np.array(sizes, np.int32)
  got = gmm_reference(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(gs))
  np.testing.assert_allclose(got, loop_gmm(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)


def test_row_group_ids_clip_and_tail():
  ids = row_group_ids(jnp.array([2, 0, 3], jnp.int32), 7)
  np.testing.assert_array_equal(ids, [0, 0, 2, 2, 2, 3, 3])


def test_group_xty_reference_matches_loop(rng):
  x = rng.standard_normal((9, 3)).astype(np.float32)
  dy = rng.standard_normal((9, 2)).astype(np.float32)
  sizes = [4, 0, 3]
  got = group_xty_reference(jnp.asarray(x), jnp.asarray(dy), jnp.array(sizes, jnp.int32))
  want = np.zeros((3, 3, 2))
  want[0] = x[:4].T.astype(np.float64) @ dy[:4]
  want[2] = x[4:7].T.astype(np.float64) @ dy[4:7]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
