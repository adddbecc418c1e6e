"""block_attention in plain jnp, blockwise: a `lax.scan` over key chunks with the online softmax.

Memory is O(Lq * chunk) per step instead of O(Lq * Lk): the visibility of one chunk is evaluated from indices,
never an L x L mask. The backward pass is its own scan (recomputing probabilities from the saved logsumexp,
as the kernels do), so autodiff does not store one probability matrix per chunk. No tile skipping: XLA has no
cheap way to not run a scan step; the Pallas kernels are the fast path.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels_pallas.tiles import EMPTY_ROW_LSE, MASK_VALUE


def _chunked(x, chunk):
    """[B, Lk, Hkv, Dh] -> [n_chunks, B, chunk, Hkv, Dh], zero-padded."""
    b, lk, hkv, dh = x.shape
    n = -(-lk // chunk)
    x = jnp.pad(x, ((0, 0), (0, n * chunk - lk), (0, 0), (0, 0)))
    return jnp.moveaxis(x.reshape(b, n, chunk, hkv, dh), 1, 0)


def _chunk_visible(mask, lq, kv_len, chunk, c, q_seg, kv_seg_c):
    """bool[B or 1, 1, 1, Lq, chunk] for key chunk `c` (kv_seg_c [B, chunk] or None)."""
    q_idx = jnp.arange(lq, dtype=jnp.int32)[:, None]
    kv_idx = c * chunk + jnp.arange(chunk, dtype=jnp.int32)[None, :]
    vis = (mask.allowed(q_idx, kv_idx) & (kv_idx < kv_len))[None]
    if q_seg is not None:
        vis = vis & (q_seg[:, :, None] == kv_seg_c[:, None, :])
    return vis[:, None, None]


def _scores(qg, k_c, scale):
    return jnp.einsum("bqhgd,bkhd->bhgqk", qg, k_c, preferred_element_type=jnp.float32) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(mask, chunk, q, k, v, q_seg, kv_seg):
    return _forward(mask, chunk, q, k, v, q_seg, kv_seg)[0]


def _forward(mask, chunk, q, k, v, q_seg, kv_seg):
    b, lq, h, dh = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    qg = q.reshape(b, lq, hkv, h // hkv, dh)
    scale = 1.0 / np.sqrt(dh)
    segs = None if kv_seg is None else jnp.moveaxis(kv_seg.reshape(b, -1, chunk), 1, 0)

    def body(carry, xs):
        m, l, acc = carry
        c, k_c, v_c, seg_c = xs
        vis = _chunk_visible(mask, lq, lk, chunk, c, q_seg, seg_c)
        s = jnp.where(vis, _scores(qg, k_c, scale), MASK_VALUE)
        m_new = jnp.maximum(m, s.max(-1, keepdims=True))
        p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype), v_c, preferred_element_type=jnp.float32)
        return (m_new, alpha * l + p.sum(-1, keepdims=True), alpha * acc + pv), None

    stats = (b, hkv, h // hkv, lq, 1)
    init = (jnp.full(stats, MASK_VALUE, jnp.float32), jnp.zeros(stats, jnp.float32),
            jnp.zeros(stats[:-1] + (dh,), jnp.float32))
    k_chunks, v_chunks = _chunked(k, chunk), _chunked(v, chunk)
    (m, l, acc), _ = lax.scan(body, init, (jnp.arange(k_chunks.shape[0]), k_chunks, v_chunks, segs))
    seen = l > 0
    out = jnp.where(seen, acc / jnp.where(seen, l, 1.0), 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), EMPTY_ROW_LSE)
    out_q = jnp.moveaxis(out, 3, 1).reshape(b, lq, h, dh).astype(q.dtype)
    return out_q, (q, k, v, q_seg, kv_seg, out, lse)


def _backward(mask, chunk, residuals, d_out):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    b, lq, h, dh = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    qg = q.reshape(b, lq, hkv, g, dh)
    dog = jnp.moveaxis(d_out.reshape(b, lq, hkv, g, dh), 1, 3).astype(jnp.float32)  # [b, hkv, g, lq, dh]
    delta = jnp.sum(dog * out, axis=-1, keepdims=True)
    scale = 1.0 / np.sqrt(dh)
    segs = None if kv_seg is None else jnp.moveaxis(kv_seg.reshape(b, -1, chunk), 1, 0)

    def body(dq, xs):
        c, k_c, v_c, seg_c = xs
        vis = _chunk_visible(mask, lq, lk, chunk, c, q_seg, seg_c)
        p = jnp.where(vis, jnp.exp(_scores(qg, k_c, scale) - lse), 0.0)
        dp = jnp.einsum("bhgqd,bkhd->bhgqk", dog, v_c.astype(jnp.float32))
        ds = p * (dp - delta) * scale
        dq = dq + jnp.einsum("bhgqk,bkhd->bqhgd", ds, k_c.astype(jnp.float32))
        dk_c = jnp.einsum("bhgqk,bqhgd->bkhd", ds, qg.astype(jnp.float32))
        dv_c = jnp.einsum("bhgqk,bhgqd->bkhd", p, dog)
        return dq, (dk_c, dv_c)

    k_chunks, v_chunks = _chunked(k, chunk), _chunked(v, chunk)
    dq, (dk, dv) = lax.scan(body, jnp.zeros(qg.shape, jnp.float32),
                            (jnp.arange(k_chunks.shape[0]), k_chunks, v_chunks, segs))
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, -1, hkv, dh)[:, :lk]
    zero_seg = lambda s: None if s is None else np.zeros(s.shape, jax.dtypes.float0)
    return (dq.reshape(q.shape).astype(q.dtype), unchunk(dk).astype(k.dtype), unchunk(dv).astype(v.dtype),
            zero_seg(q_seg), zero_seg(kv_seg))


_attention.defvjp(_forward, _backward)


def block_attention(q, k, v, *, mask, segment_ids=None, key_mask=None, chunk=512):
    """Blockwise-XLA block_attention (same contract as `kernels_pallas.block_attention`)."""
    b, lq = q.shape[:2]
    lk = k.shape[1]
    chunk = min(chunk, lk)
    q_seg = kv_seg = None
    if segment_ids is not None or key_mask is not None:
        q_seg = jnp.zeros((b, lq), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        kv_seg = jnp.zeros((b, lk), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        if key_mask is not None:
            kv_seg = jnp.where(key_mask, kv_seg, np.iinfo(np.int32).min)
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, -(-lk // chunk) * chunk - lk)), constant_values=np.iinfo(np.int32).min)
    return _attention(mask, chunk, q, k, v, q_seg, kv_seg)
