"""Row-tile metadata for grouped kernels, computed on device with a static tile count.

A kernel over expert-sorted rows walks tiles of `block_m` rows. A tile whose rows span a group
boundary is visited once per group it touches, each visit writing only its own group's rows
(masked stores; never a read-modify-write of the whole tile, which races on the GPU).

Rows past the last group (sum(group_sizes) <= row < m) form a virtual group G whose tiles write
zeros, so every output row is written exactly by the program that owns it. With G real groups
plus the virtual one, at most cdiv(m, block_m) + G tiles are visited: each group adds at most
one tile shared with its predecessor.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.common.groups import cdiv, clipped_group_offsets

__all__ = ["cdiv", "TileMetadata", "OwnedTile", "num_row_tiles", "tile_metadata",
           "group_row_blocks", "for_owned_tile"]


class TileMetadata(NamedTuple):
  tile_group: jax.Array   # (num_tiles,) int32 group of each tile; G = the zero-filled tail
  tile_block: jax.Array   # (num_tiles,) int32 row-block index of each tile
  offsets: jax.Array      # (G + 2,) int32 row offsets of groups 0..G (G = tail), clipped to m
  num_active: jax.Array   # (1,) int32 tiles in use; tiles past it do nothing
  num_real: jax.Array     # (1,) int32 tiles of real groups (0..G-1); tiles num_real.. are the tail


def num_row_tiles(m: int, num_groups: int, block_m: int) -> int:
  """Static upper bound on visited row tiles."""
  return cdiv(m, block_m) + num_groups


def tile_metadata(group_sizes: jax.Array, m: int, block_m: int) -> TileMetadata:
  num_groups = group_sizes.shape[0]
  offsets = jnp.concatenate(
      [clipped_group_offsets(group_sizes, m), jnp.full((1,), m, jnp.int32)]
  )
  starts, ends = offsets[:-1], offsets[1:]
  first_block = starts // block_m
  tiles = jnp.where(ends > starts, (ends + block_m - 1) // block_m - first_block, 0)
  num_tiles = num_row_tiles(m, num_groups, block_m)
  tile_group = jnp.repeat(
      jnp.arange(num_groups + 1, dtype=jnp.int32), tiles, total_repeat_length=num_tiles
  )
  first_tile_of_group = jnp.cumsum(tiles) - tiles
  idx = jnp.arange(num_tiles, dtype=jnp.int32)
  tile_block = first_block[tile_group] + idx - first_tile_of_group[tile_group]
  num_active = jnp.sum(tiles, dtype=jnp.int32).reshape(1)
  num_real = jnp.sum(tiles[:num_groups], dtype=jnp.int32).reshape(1)
  return TileMetadata(
      tile_group.astype(jnp.int32), tile_block.astype(jnp.int32), offsets.astype(jnp.int32),
      num_active, num_real,
  )


def group_row_blocks(group_sizes: jax.Array, m: int,
                     block_rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-group row blocks for kernels that reduce over each group's rows (group_xty).

  Returns (offsets (G + 1,) int32 row offsets of the groups, clipped to m; first_block (G,) int32
  index of the block_rows-row block holding each group's first row; num_blocks (G,) int32 blocks
  the group's rows touch, 0 for an empty group). A group's blocks are first_block + 0 .. num - 1;
  its first and last may hold rows of its neighbours, which the kernel must mask.
  """
  num_groups = group_sizes.shape[0]
  offsets = tile_metadata(group_sizes, m, block_rows).offsets[: num_groups + 1]
  starts, ends = offsets[:-1], offsets[1:]
  first_block = starts // block_rows
  num_blocks = jnp.where(ends > starts, (ends + block_rows - 1) // block_rows - first_block, 0)
  return offsets, first_block.astype(jnp.int32), num_blocks.astype(jnp.int32)


class OwnedTile(NamedTuple):
  """The rows and columns of one (row tile, column tile) visit that its program owns."""
  group: jax.Array   # () int32 group of the visit; G = the zero-filled tail past the last group
  row0: jax.Array    # () int32 first row of the row tile
  own: jax.Array     # (block_m,) bool: rows of the tile that belong to `group`
  ni: jax.Array      # () int32 column tile index
  cols: jax.Array    # (block_n,) int32 output columns of the tile
  col_ok: jax.Array  # (block_n,) bool: cols < n


def for_owned_tile(tile_group_ref, tile_block_ref, offsets_ref, num_active_ref, *, num_tiles: int,
                   num_n: int, group_m: int, block_m: int, block_n: int, n: int,
                   body: Callable[[OwnedTile], None]) -> None:
  """The tile-ownership walk of a Pallas-Triton kernel on a 1-D grid of num_tiles * num_n
  programs over `tile_metadata`: runs body(tile) for this program's visit when it is active.

  The grid is swizzled in bands of `group_m` row tiles with the column tiles inside a band, so
  the programs running together share row tiles and weight column tiles in L2. `tile.own` masks
  the stores: a row tile shared by two groups is visited twice, each visit writing only its
  group's rows (never a read-modify-write of the whole tile, which races on the GPU).
  """
  pid = pl.program_id(0)
  band_size = group_m * num_n
  first_tile = (pid // band_size) * group_m
  band_rows = jnp.minimum(num_tiles - first_tile, group_m)
  tile = first_tile + (pid % band_size) % band_rows
  ni = (pid % band_size) // band_rows

  @pl.when(tile < num_active_ref[0])
  def _():
    g = tile_group_ref[tile]
    row0 = tile_block_ref[tile] * block_m
    rows = row0 + jnp.arange(block_m, dtype=jnp.int32)
    own = (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1])
    cols = ni * block_n + jnp.arange(block_n, dtype=jnp.int32)
    body(OwnedTile(g, row0, own, ni, cols, cols < n))
