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

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels.reference import clipped_group_offsets


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


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
