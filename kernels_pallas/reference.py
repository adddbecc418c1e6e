"""Dense jnp twins: obviously correct, O(L^2) memory, for tests and tiny shapes only.

Contract shared with every implementation: scores and softmax in float32, scale 1/sqrt(head_dim), a query
row with no visible key gives output 0 (and zero gradients), output in q's dtype.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kernels_pallas.masks import Mask
from kernels_pallas.ranges import as_ranges


def visibility(mask: Mask, q_len: int, kv_len: int, segment_ids=None, key_mask=None):
    """bool[B or 1, q_len, kv_len]: the structural mask AND key padding AND equal segments."""
    allowed = jnp.asarray(mask.dense(q_len, kv_len))[None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return allowed


def attention_dense(q, k, v, allowed):
    """q [B, Lq, H, Dh], k/v [B, Lk, Hkv, Dh], allowed bool [B or 1, Lq, Lk] -> [B, Lq, H, Dh]."""
    b, lq, h, dh = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, lq, hkv, h // hkv, dh)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) / np.sqrt(dh)
    vis = allowed[:, None, None]
    s = jnp.where(vis, s, -jnp.inf)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    # A row with no visible key would be exp(-inf - -inf) = NaN: give it max 0 and let the where() zero it.
    p = jnp.where(vis, jnp.exp(s - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32))
    return out.reshape(b, lq, h, dh).astype(q.dtype)


def block_attention(q, k, v, *, mask: Mask, segment_ids=None, key_mask=None):
    """Dense twin of `kernels_pallas.block_attention` (differentiable by plain autodiff)."""
    allowed = visibility(mask, q.shape[1], k.shape[1], segment_ids, key_mask)
    return attention_dense(q, k, v, allowed)


def cached_attention(q_block, k_cache, v_cache, k_block, v_block, cache_ranges, block_key_mask=None):
    """Dense twin of `kernels_pallas.cached_attention`: [cache slots in the row's ranges ; the block's keys under
    `block_key_mask`], bidirectional. cache_ranges int[B, R, 2] (or [B] prefix lengths); hidden values are zeroed
    (0 * NaN = NaN)."""
    b, lb = q_block.shape[0], k_block.shape[1]
    cache_ranges = as_ranges(cache_ranges, b)
    s = k_cache.shape[1]
    slot = jnp.arange(s)[None, None, :]
    cache_valid = jnp.any((slot >= cache_ranges[:, :, :1]) & (slot < cache_ranges[:, :, 1:]), axis=1)
    block_valid = jnp.ones((b, lb), bool) if block_key_mask is None else block_key_mask.astype(bool)
    key_valid = jnp.concatenate([cache_valid, block_valid], axis=1)
    keys = jnp.concatenate([k_cache, k_block.astype(k_cache.dtype)], axis=1)
    values = jnp.concatenate([v_cache, v_block.astype(v_cache.dtype)], axis=1)
    values = jnp.where(key_valid[:, :, None, None], values, 0)
    allowed = jnp.broadcast_to(key_valid[:, None, :], (b, q_block.shape[1], keys.shape[1]))
    return attention_dense(q_block, keys, values, allowed)
