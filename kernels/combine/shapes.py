"""What the gather_sum backends' `default_config`, `check` and `search_space` are given.

  CombineShape(t, k, m, n)   rows (M, N) gathered k at a time into T output rows of N columns
  dtypes                     (rows dtype, out dtype)
"""

from __future__ import annotations

from typing import NamedTuple


class CombineShape(NamedTuple):
  t: int
  k: int
  m: int
  n: int
