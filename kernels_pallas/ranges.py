"""Cache ranges: which KV-cache slots a row's queries see, as a few half-open slot ranges per row.

A sampler's cached step sees a region of the cache that is a union of at most two runs of slots per row:

    prefix / block cache     [lo, index)                        (lo > 0: the row's left padding)
    dual cache               [lo, block_start) U [block_end, hi) (the block's own slots hidden; hi: right padding)

so the visibility travels as `cache_ranges` int32[B, R, 2] (R static, usually 1 or 2): row b sees slot s iff
`lo <= s < hi` for one of its R pairs `(lo, hi)`. Pairs are clipped to [0, S]; `lo >= hi` is an empty range;
pairs may come in any order, overlap or share a tile. R = 0 sees nothing. A prefix length per row, int[B], is
the special case `[[0, length)]`. Unlike a dense [B, n, S] mask this is O(B R) numbers, and it tells a kernel
which cache tiles hold any visible slot, so the others are never read (`visit_plan`).

Plain jnp, no Pallas: the model's dense path and the benchmarks use it too.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.masks import EMPTY, FULL, PARTIAL


def as_ranges(cache_ranges, batch: int) -> jax.Array:
    """int32[B, R, 2] from `cache_ranges` given as [B, R, 2] ranges or [B] prefix lengths; raises on other shapes."""
    r = jnp.asarray(cache_ranges)
    if not jnp.issubdtype(r.dtype, jnp.integer):
        raise ValueError(f"cache_ranges must be integer slot indices, got dtype {r.dtype}")
    if r.shape == (batch,):
        return jnp.stack([jnp.zeros_like(r), r], axis=-1)[:, None, :].astype(jnp.int32)
    if r.ndim != 3 or r.shape[0] != batch or r.shape[2] != 2:
        raise ValueError(f"cache_ranges {tuple(r.shape)} must be [B, R, 2] half-open slot ranges (lo, hi) per row, "
                         f"or [B] prefix lengths, with B = {batch}")
    return r.astype(jnp.int32)


def slot_mask(cache_ranges: jax.Array, slots: int) -> jax.Array:
    """bool[B, slots]: True where a slot lies in one of its row's ranges (cache_ranges int[B, R, 2])."""
    s = jnp.arange(slots, dtype=jnp.int32)[None, None, :]
    inside = (s >= cache_ranges[:, :, :1]) & (s < cache_ranges[:, :, 1:])
    return jnp.any(inside, axis=1)


def normalize(cache_ranges: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
    """(lo, hi) int32[B, R]: clipped to [0, slots], empty ranges as (slots, slots), sorted by lo.

    The same slots as `cache_ranges`; the sorted form lets `visit_plan` list each tile once.
    """
    lo = jnp.clip(cache_ranges[..., 0], 0, slots)
    hi = jnp.clip(cache_ranges[..., 1], 0, slots)
    empty = hi <= lo
    lo = jnp.where(empty, slots, lo)
    hi = jnp.where(empty, slots, hi)
    order = jnp.argsort(lo, axis=1, stable=True)
    return jnp.take_along_axis(lo, order, axis=1), jnp.take_along_axis(hi, order, axis=1)


def visit_plan(lo: jax.Array, hi: jax.Array, block_k: int, n_tiles: int):
    """The cache tiles a kernel visits per row, in order, each once.

    Args:
      lo, hi: int32[B, R] from `normalize` (sorted, empty ranges at `slots`).
      block_k: slots per tile; n_tiles: tiles in the (padded) cache.
    Returns:
      tiles int32[B, n_tiles]: the visited tile indices packed to the front; slots past a row's count repeat
        its last visited tile (a TPU pipeline sees "same block" and issues no DMA), 0 if it visits none.
      kinds int32[B, n_tiles]: FULL (one range covers the whole tile: no mask arithmetic), PARTIAL (mask per
        slot; also a tile that only two ranges cover together), EMPTY past the count.
      counts int32[B]: tiles visited per row (<= n_tiles).
    """
    first = lo // block_k
    end = jnp.where(hi > lo, -(-hi // block_k), first)  # one past the last tile touched; empty: no tile
    reach = jnp.zeros(lo.shape[:1], jnp.int32)  # tiles before `reach` are already listed
    starts, counts = [], []
    for r in range(lo.shape[1]):  # R is static and small
        start = jnp.maximum(first[:, r], reach)
        counts.append(jnp.maximum(end[:, r] - start, 0))
        starts.append(start)
        reach = jnp.maximum(reach, end[:, r])
    total = sum(counts) if counts else jnp.zeros(lo.shape[:1], jnp.int32)
    j = jnp.minimum(jnp.arange(n_tiles, dtype=jnp.int32)[None, :], jnp.maximum(total - 1, 0)[:, None])
    tiles = jnp.zeros(j.shape, jnp.int32)
    offset = jnp.zeros(lo.shape[:1], jnp.int32)
    for start, count in zip(starts, counts):
        here = (j >= offset[:, None]) & (j < (offset + count)[:, None])
        tiles = jnp.where(here, start[:, None] + j - offset[:, None], tiles)
        offset = offset + count
    tile_lo, tile_hi = tiles * block_k, (tiles + 1) * block_k
    full = jnp.any((lo[:, :, None] <= tile_lo[:, None, :]) & (tile_hi[:, None, :] <= hi[:, :, None]), axis=1)
    listed = jnp.arange(n_tiles, dtype=jnp.int32)[None, :] < total[:, None]
    kinds = jnp.where(listed, jnp.where(full, FULL, PARTIAL), EMPTY).astype(jnp.int32)
    return tiles, kinds, total.astype(jnp.int32)


__all__ = ["as_ranges", "normalize", "slot_mask", "visit_plan"]
