"""What the top-k backends' `default_config`, `check` and `search_space` are given.

  TopKShape(t, e, k)   x (T, E) scores, k chosen per row
  dtypes               (x dtype,)
"""

from __future__ import annotations

from typing import NamedTuple


class TopKShape(NamedTuple):
  t: int
  e: int
  k: int
