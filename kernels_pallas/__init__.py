"""Pallas kernels for diffusion-LM attention: block-sparse masked attention and KV-cached block attention.

Standalone (nothing here imports `dlmjax`). Public API:

- `block_attention(q, k, v, *, mask, segment_ids=None, key_mask=None, impl="auto", ...)`: flash attention with
  an online softmax, forward and backward (Pallas kernels on TPU/GPU, blockwise XLA elsewhere). Tiles the
  mask never allows are skipped; see `masks.tile_map`.
- `cached_attention(q_block, k_cache, v_cache, k_block, v_block, cache_ranges, *, block_key_mask=None, ...)`:
  the active block against the cache slots in per-row half-open ranges (`[lo, hi)` pairs: a ragged prefix, or a
  dual cache's keys on both sides of the block, left padding excluded) plus its own keys (sampling; forward
  only). Only cache tiles the ranges touch are read; see `ranges`.
- `attention_for_model(...)`: the adapter for `dlmjax.models.attention.attention` (the same `Mask` classes).
- Masks: `Full`, `Causal(offset)`, `BlockCausal(block_size)`, `Bd3Training(length, block_size)`;
  `tile_map`, `skipped_fraction`.
- `ranges`: the cache-range helpers (`slot_mask`, `visit_plan`: which tiles a cached call reads).
- `lowering_target(platform)`: trace for a TPU/GPU this machine lacks (for `jax.export`).

Implementations (`impl`): "mosaic" (TPU kernels), "triton" (GPU kernels), "xla" (blockwise jnp scan),
"reference" (dense jnp, tests only), "auto" (by platform). `interpret=True` runs a Pallas kernel on CPU.
Shapes: q [B, Lq, H, Dh], k/v [B, Lk, Hkv, Dh] with H % Hkv == 0 (grouped-query attention); float32 or
bfloat16 inputs, float32 scores and accumulation, scale 1/sqrt(Dh). Query rows that see no key give 0.
"""
from __future__ import annotations

import jax.numpy as jnp

from kernels_pallas import cached as _cached
from kernels_pallas import ranges
from kernels_pallas import reference as _reference
from kernels_pallas import xla as _xla
from kernels_pallas.dispatch import BLOCK_SIZES, check_inputs, check_tiling, fit_block, lowering_target, resolve_impl
from kernels_pallas.flash import flash_attention as _flash_attention
from kernels_pallas.masks import Bd3Training, BlockCausal, Causal, Full, Mask, skipped_fraction, tile_map

__all__ = [
    "block_attention", "cached_attention", "attention_for_model", "lowering_target", "BLOCK_SIZES", "ranges",
    "Mask", "Full", "Causal", "BlockCausal", "Bd3Training", "tile_map", "skipped_fraction",
]


def block_attention(q, k, v, *, mask: Mask, segment_ids=None, key_mask=None, impl: str = "auto",
                    block_q: int | None = None, block_k: int | None = None, interpret: bool | None = None):
    """Masked attention, differentiable in q, k, v.

    Args:
      q: [B, Lq, H, Dh]; k, v: [B, Lk, Hkv, Dh].
      mask: a `Mask` (static: hashable dataclass), evaluated from (query index, key index).
      segment_ids: int [B, L] (needs Lq == Lk): a query sees a key only in the same segment (packing).
      key_mask: bool [B, Lk]; False marks padding keys no query may see.
      impl, interpret: see the module docstring. block_q/block_k: tile sizes (default: `BLOCK_SIZES`).
    Returns:
      [B, Lq, H, Dh] in q's dtype.
    """
    check_inputs(q, k, v)
    if not isinstance(mask, Mask):
        raise ValueError(f"mask={mask!r} must be a kernels_pallas Mask (Full, Causal, BlockCausal, Bd3Training)")
    b, lq, _, dh = q.shape
    lk = k.shape[1]
    if isinstance(mask, Bd3Training) and (lq, lk) != (2 * mask.length,) * 2:
        raise ValueError(f"Bd3Training(length={mask.length}) indexes [x_t ; x_0]: Lq and Lk must be "
                         f"{2 * mask.length}, got Lq={lq}, Lk={lk}")
    if segment_ids is not None and (lq != lk or segment_ids.shape != (b, lq)):
        raise ValueError(f"segment_ids {segment_ids.shape} must be [B, L] = {(b, lq)} with Lq == Lk (got Lk={lk})")
    if key_mask is not None and key_mask.shape != (b, lk):
        raise ValueError(f"key_mask {key_mask.shape} must be [B, Lk] = {(b, lk)}")
    impl, interpret = resolve_impl(impl, interpret)
    if impl == "reference":
        return _reference.block_attention(q, k, v, mask=mask, segment_ids=segment_ids, key_mask=key_mask)
    if impl == "xla":
        chunk = block_k if block_k is not None else BLOCK_SIZES["xla"]["block_k"]
        return _xla.block_attention(q, k, v, mask=mask, segment_ids=segment_ids, key_mask=key_mask, chunk=chunk)
    block_q = fit_block(impl, "block_q", block_q, lq)
    block_k = fit_block(impl, "block_k", block_k, lk)
    check_tiling(impl, head_dim=dh, block_q=block_q, block_k=block_k, interpret=interpret)
    return _flash_attention(q, k, v, mask=mask, segment_ids=segment_ids, key_mask=key_mask, backend=impl,
                            block_q=block_q, block_k=block_k, interpret=interpret)


def cached_attention(q_block, k_cache, v_cache, k_block, v_block, cache_ranges, *, block_key_mask=None,
                     impl: str = "auto", block_q: int | None = None, block_k: int | None = None,
                     interpret: bool | None = None):
    """The active block's queries against [the row's visible cache slots ; the block's own keys], bidirectional.

    Args:
      q_block: [B, Lb, H, Dh] (the block, or a longer chunk: a prefix cache's block and everything after it).
      k_cache, v_cache: [B, S, Hkv, Dh]; row b reads only the cache tiles its ranges touch.
      k_block, v_block: [B, Lb, Hkv, Dh].
      cache_ranges: int[B, R, 2], the half-open slot ranges [lo, hi) row b sees (their union; see
        `kernels_pallas.ranges`: any order, empty and overlapping ranges allowed, clipped to [0, S]), e.g.
        [[pad, block_start), [block_end, end)] for a dual cache over a left-padded row; or int[B], a valid
        prefix length per row (the special case [[0, length)]).
      block_key_mask: bool[B, Lb], False on the block's padding keys (default: every key is real).
    Returns:
      [B, Lb, H, Dh] in q_block's dtype; a query that sees no key gives 0. Forward only. Slots outside the
      ranges never reach the output, whatever they hold (NaN included).
    """
    check_inputs(q_block, k_cache, v_cache)
    check_inputs(q_block, k_block, v_block)
    b, lb, _, dh = q_block.shape
    s = k_cache.shape[1]
    if k_block.shape[1] != lb:
        raise ValueError(f"k_block {k_block.shape} must have the queries' length Lb={lb}")
    cache_ranges = ranges.as_ranges(cache_ranges, b)
    if block_key_mask is None:
        block_key_mask = jnp.ones((b, lb), bool)
    elif block_key_mask.shape != (b, lb):
        raise ValueError(f"block_key_mask {block_key_mask.shape} must be [B, Lb] = {(b, lb)}")
    block_key_mask = block_key_mask.astype(bool)
    impl, interpret = resolve_impl(impl, interpret)
    args = (q_block, k_cache, v_cache, k_block, v_block)
    if impl == "reference":
        return _reference.cached_attention(*args, cache_ranges, block_key_mask)
    if impl == "xla":
        return _cached.cached_xla(*args, cache_ranges, block_key_mask,
                                  chunk=block_k or BLOCK_SIZES["xla"]["block_k"])
    block_q = fit_block(impl, "cached_block_q", block_q, lb)
    block_k = fit_block(impl, "cached_block_k", block_k, s)
    check_tiling(impl, head_dim=dh, block_q=block_q, block_k=block_k, interpret=interpret,
                 q_rows=lb if lb <= block_q else 0)
    lo, hi = ranges.normalize(cache_ranges, s)
    kernel = _cached.cached_tpu if impl == "mosaic" else _cached.cached_triton
    return kernel(*args, lo, hi, block_key_mask, block_q=block_q, block_k=block_k, interpret=interpret)


def attention_for_model(q, k, v, *, mask, key_mask=None, impl: str = "auto", interpret: bool | None = None):
    """Drop-in for `dlmjax.models.attention.attention` when `dense_mask is None` (no arbitrary dense mask).

    Difference to keep in mind: a query row with no visible key returns 0 here, the dense path returns the
    mean of the values; models ignore such rows (padding), so losses and samples are unaffected.
    """
    return block_attention(q, k, v, mask=mask, key_mask=None if key_mask is None else key_mask.astype(bool),
                           impl=impl, interpret=interpret)
