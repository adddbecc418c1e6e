"""cached_attention: the active block's queries against the visible slots of a KV cache plus the block's own keys.

Sampling-time, forward only. Keys seen by row b: the cache slots inside its ranges (`kernels_pallas.ranges`:
int32[B, R, 2] half-open slot ranges, e.g. [lo, block_start) U [block_end, hi) for a dual cache) and the block's
keys where `block_mask` is set (bidirectional inside the block; the "block" may be a long chunk, e.g. a prefix
cache's block and everything after it). One online softmax runs over the visited cache tiles, then over the
block's key tiles.

Tile skipping: `ranges.visit_plan` lists, per row, the cache tiles that hold a visible slot (each once, in order)
and whether each is FULL (no mask arithmetic) or PARTIAL (per-slot mask); no other tile is read. On TPU the grid's
cache steps walk that list through scalar prefetch (steps past a row's count repeat its last tile, so no DMA is
issued, and compute is predicated off); on GPU the loop's trip count is the row's count. On TPU up to
`RESIDENT_Q_ROWS` query rows stay in VMEM while the tiles stream past, so a long chunk reads each tile once; on GPU
each program owns one q tile and loops over the tiles (a long chunk re-reads them per q tile, mostly from L2). Invisible slots never
reach the output even when they hold NaN: scores are replaced (`where`, not added to) and a PARTIAL tile's values
are zeroed outside the ranges before the probability-value product (0 * NaN = NaN).

The cache keeps the model's layout [B, S, Hkv, Dh]: the TPU kernel views it as [B, S, Hkv * Dh] (a free
reshape) and slices one head's Dh lanes, so no per-step transpose copies the cache.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import flash_gpu, masks, ranges, xla
from kernels_pallas.masks import EMPTY, FULL, PARTIAL
from kernels_pallas.tiles import MASK_VALUE, finalize, softmax_step


# Query rows a TPU program keeps in VMEM (q, output, and float32 m / l / accumulator: ~20 bytes x 128 lanes a row,
# double-buffered in and out: ~5 MB at 2048 rows, Dh 128); each cache tile is read once per this many rows.
RESIDENT_Q_ROWS = 2048


def _pad_rows(x, multiple):
    extra = -x.shape[1] % multiple
    return jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2)) if extra else x


def _bounds(lo, hi):
    """The ranges flattened to int32[B * R * 2] for scalar memory (two dummy zeros when R = 0: no empty arrays)."""
    return jnp.stack([lo, hi], axis=-1).reshape(-1) if lo.shape[1] else jnp.zeros((2,), jnp.int32)


def _in_ranges(bounds_ref, bi, n_ranges: int, slot):
    """bool of `slot`'s shape: the slot index lies in one of row `bi`'s ranges (read from `bounds_ref`)."""
    keep = jnp.zeros(slot.shape, bool)
    for r in range(n_ranges):
        base = (bi * n_ranges + r) * 2
        keep = keep | ((slot >= bounds_ref[base]) & (slot < bounds_ref[base + 1]))
    return keep


def _block_mask(block_mask, length):
    """int32[B, length]: the block's key mask, zero on the padded tail (Mosaic and Triton take no bool inputs)."""
    return jnp.pad(block_mask.astype(jnp.int32), ((0, 0), (0, length - block_mask.shape[1])))


def cached_tpu(q, k_cache, v_cache, k_block, v_block, lo, hi, block_mask, *, block_q, block_k, interpret):
    b, lb, h, dh = q.shape
    hkv = k_cache.shape[2]
    g = h // hkv
    n_ranges = lo.shape[1]
    scale = float(1.0 / np.sqrt(dh))
    bq = block_q if lb > block_q else lb  # one q tile equal to the array's rows is always a legal block
    # Up to RESIDENT_Q_ROWS query rows stay in VMEM while the cache tiles stream past them (the q tiles are the
    # grid's innermost axis), so a long chunk (a prefix cache's) reads each cache tile once, not once per q tile.
    q_rows = min(-(-lb // bq), max(RESIDENT_Q_ROWS // bq, 1)) * bq
    n_inner = q_rows // bq
    q2 = _pad_rows(q, q_rows).reshape(b, -1, h * dh)
    # No padding copy of the cache: a partial last tile reads unspecified rows past S, and since every range stops
    # at S that tile is PARTIAL, so those rows are masked out (scores and values) like any hidden slot.
    s = k_cache.shape[1]
    n_cache = -(-s // block_k)
    kc2, vc2 = (x.reshape(b, s, hkv * dh) for x in (k_cache, v_cache))
    # The block's keys: one tile when they fit a cache tile (a block equal to the array is legal), else tiles.
    bkb = lb if lb <= block_k else block_k
    k_block, v_block = _pad_rows(k_block, bkb), _pad_rows(v_block, bkb)
    lb_pad = k_block.shape[1]
    n_block = lb_pad // bkb
    kb2, vb2 = (x.reshape(b, lb_pad, hkv * dh) for x in (k_block, v_block))
    bmask = _block_mask(block_mask, lb_pad)[:, None, :]
    tiles, kinds, _ = ranges.visit_plan(lo, hi, block_k, n_cache)

    def cache_slot(bi, j):
        return bi * n_cache + jnp.minimum(j, n_cache - 1)  # block steps keep the last cache tile: no new DMA

    # Grid (row, head, resident q rows, key tile, q tile): the key tiles' index maps ignore the q tile.
    def cache_index(bi, hi_, r, j, i, tiles_ref, kinds_ref, bounds_ref):
        return bi, tiles_ref[cache_slot(bi, j)], lax.div(hi_, g)

    def block_index(bi, hi_, r, j, i, *_):
        return bi, jnp.maximum(j - n_cache, 0), lax.div(hi_, g)

    def kernel(tiles_ref, kinds_ref, bounds_ref, q_ref, kc_ref, vc_ref, kb_ref, vb_ref, bm_ref, o_ref,
               m_sc, l_sc, acc_sc):
        bi, j, i = pl.program_id(0), pl.program_id(3), pl.program_id(4)
        rows = slice(None) if n_inner == 1 else pl.ds(pl.multiple_of(i * bq, bq), bq)

        @pl.when(j == 0)
        def _init():
            m_sc[rows, :] = jnp.full((bq, 128), MASK_VALUE, jnp.float32)
            l_sc[rows, :] = jnp.zeros((bq, 128), jnp.float32)
            acc_sc[rows, :] = jnp.zeros((bq, dh), jnp.float32)

        def update(k_t, v_t, vis):
            m, l, acc = softmax_step(q_ref[rows, :], k_t, v_t, m_sc[rows, :1], l_sc[rows, :1], acc_sc[rows, :], vis,
                                     scale)
            m_sc[rows, :] = jnp.broadcast_to(m, (bq, 128))
            l_sc[rows, :] = jnp.broadcast_to(l, (bq, 128))
            acc_sc[rows, :] = acc

        slot = cache_slot(bi, j)
        kind = jnp.where(j < n_cache, kinds_ref[slot], EMPTY)
        pl.when(kind == FULL)(lambda: update(kc_ref[...], vc_ref[...], None))

        @pl.when(kind == PARTIAL)
        def _partial_cache_tile():
            start = tiles_ref[slot] * block_k
            vis = _in_ranges(bounds_ref, bi, n_ranges, start + lax.broadcasted_iota(jnp.int32, (bq, block_k), 1))
            keep = _in_ranges(bounds_ref, bi, n_ranges, start + lax.broadcasted_iota(jnp.int32, (block_k, dh), 0))
            update(kc_ref[...], jnp.where(keep, vc_ref[...], 0), vis)

        @pl.when(j >= n_cache)
        def _block_tile():
            update(kb_ref[...], vb_ref[...], jnp.broadcast_to(bm_ref[...] > 0, (bq, bkb)))

        @pl.when(j == n_cache + n_block - 1)
        def _finish():
            out, _ = finalize(m_sc[rows, :1], l_sc[rows, :1], acc_sc[rows, :])
            o_ref[rows, :] = out.astype(o_ref.dtype)

    q_spec = pl.BlockSpec((None, q_rows, dh), lambda bi, hi_, r, j, i, *_: (bi, r, hi_))
    cache_spec = pl.BlockSpec((None, block_k, dh), cache_index)
    block_spec = pl.BlockSpec((None, bkb, dh), block_index)
    bmask_spec = pl.BlockSpec((None, 1, bkb), lambda bi, hi_, r, j, i, *_: (bi, 0, jnp.maximum(j - n_cache, 0)))
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, h, q2.shape[1] // q_rows, n_cache + n_block, n_inner),
            in_specs=[q_spec, cache_spec, cache_spec, block_spec, block_spec, bmask_spec], out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((q_rows, 128), jnp.float32), pltpu.VMEM((q_rows, 128), jnp.float32),
                            pltpu.VMEM((q_rows, dh), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q2.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret, name="cached_attention",
    )(tiles.reshape(-1), kinds.reshape(-1), _bounds(lo, hi), q2, kc2, vc2, kb2, vb2, bmask)
    return out.reshape(b, -1, h, dh)[:, :lb]


def cached_triton(q, k_cache, v_cache, k_block, v_block, lo, hi, block_mask, *, block_q, block_k, interpret):
    b, lb, h, dh = q.shape
    hkv = k_cache.shape[2]
    g = h // hkv
    n_ranges = lo.shape[1]
    scale = float(1.0 / np.sqrt(dh))
    # Triton tensors need power-of-two shapes: pad the head dim, the query tile and the block's key tiles.
    dhp = flash_gpu.kernel_head_dim(dh)
    lbp = max(16, pl.next_power_of_2(lb))
    bq = min(block_q, lbp)
    bkb = min(block_k, lbp)
    pad_dh = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, dhp - dh),)) if dhp != dh else x  # noqa: E731
    qp = pad_dh(_pad_rows(q, bq))
    # The cache is not copied to a tile multiple (only a cache smaller than one tile is padded): the last tile is
    # read from S - block_k on, and its slots before the tile's own start are masked (the previous tile has them).
    kc, vc = (pad_dh(_pad_rows(x, block_k) if x.shape[1] < block_k else x) for x in (k_cache, v_cache))
    kb, vb = (pad_dh(_pad_rows(x, bkb)) for x in (k_block, v_block))
    s_pad, lb_pad = kc.shape[1], kb.shape[1]
    n_cache, n_block = -(-s_pad // block_k), lb_pad // bkb
    bmask = _block_mask(block_mask, lb_pad)
    tiles, kinds, counts = ranges.visit_plan(lo, hi, block_k, n_cache)

    def kernel(tiles_ref, kinds_ref, counts_ref, bounds_ref, q_ref, kc_ref, vc_ref, kb_ref, vb_ref, bm_ref, o_ref):
        bi = pl.program_id(0)
        q_t = q_ref[...]

        def cache_tile(j, carry):
            slot = bi * n_cache + j
            tile_start = tiles_ref[slot] * block_k

            def full(c):  # a FULL tile lies inside [0, S): never the shifted last one
                start = pl.multiple_of(tile_start, block_k)
                return softmax_step(q_t, kc_ref[pl.ds(start, block_k), :], vc_ref[pl.ds(start, block_k), :], *c,
                                    None, scale)

            def partial(c):
                start = jnp.minimum(tile_start, s_pad - block_k)
                slots = start + jnp.arange(block_k, dtype=jnp.int32)
                keep = _in_ranges(bounds_ref, bi, n_ranges, slots) & (slots >= tile_start)
                v_t = jnp.where(keep[:, None], vc_ref[pl.ds(start, block_k), :], 0)
                return softmax_step(q_t, kc_ref[pl.ds(start, block_k), :], v_t, *c, keep[None, :], scale)

            return lax.cond(kinds_ref[slot] == FULL, full, partial, carry)

        def block_tile(j, carry):
            start = pl.multiple_of(j * bkb, bkb)
            keep = bm_ref[pl.ds(start, bkb)] > 0
            return softmax_step(q_t, kb_ref[pl.ds(start, bkb), :], vb_ref[pl.ds(start, bkb), :], *carry,
                                keep[None, :], scale)

        carry = (jnp.full((bq, 1), MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
                 jnp.zeros((bq, dhp), jnp.float32))
        carry = lax.fori_loop(0, counts_ref[bi], cache_tile, carry)
        carry = lax.fori_loop(0, n_block, block_tile, carry)
        o_ref[...] = finalize(*carry)[0].astype(o_ref.dtype)

    whole = lambda n: pl.BlockSpec((n,), lambda *_: (0,))  # noqa: E731  (small tables every program reads)
    q_spec = pl.BlockSpec((None, bq, None, dhp), lambda bi, hi_, i: (bi, i, hi_, 0))
    cache_spec = pl.BlockSpec((None, s_pad, None, dhp), lambda bi, hi_, i: (bi, 0, lax.div(hi_, g), 0))
    block_spec = pl.BlockSpec((None, lb_pad, None, dhp), lambda bi, hi_, i: (bi, 0, lax.div(hi_, g), 0))
    bounds = _bounds(lo, hi)
    out = pl.pallas_call(
        kernel, grid=(b, h, qp.shape[1] // bq),
        in_specs=[whole(b * n_cache), whole(b * n_cache), whole(b), whole(bounds.shape[0]), q_spec, cache_spec,
                  cache_spec, block_spec, block_spec, pl.BlockSpec((None, lb_pad), lambda bi, hi_, i: (bi, 0))],
        out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=flash_gpu.compiler_params(dhp), interpret=interpret, name="cached_attention",
    )(tiles.reshape(-1), kinds.reshape(-1), counts, bounds, qp, kc, vc, kb, vb, bmask)
    return out[:, :lb, :, :dh]


def cached_xla(q, k_cache, v_cache, k_block, v_block, cache_ranges, block_mask, *, chunk=512):
    """Blockwise XLA twin: the block-attention scan over [cache ; block] with a per-row key mask (no skipping)."""
    s = k_cache.shape[1]
    key_mask = jnp.concatenate([ranges.slot_mask(cache_ranges, s), block_mask], axis=1)
    keys = jnp.concatenate([k_cache, k_block.astype(k_cache.dtype)], axis=1)
    # Scores of hidden keys are replaced by the mask value; hidden values must be zeroed (0 * NaN = NaN).
    values = jnp.where(key_mask[:, :, None, None], jnp.concatenate([v_cache, v_block.astype(v_cache.dtype)], axis=1),
                       0)
    # Queries index the block, keys index [cache ; block]: an all-true structural mask, rows told apart by key_mask.
    return xla.block_attention(q, keys, values, mask=masks.Full(), key_mask=key_mask, chunk=chunk)
