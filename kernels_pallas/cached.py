"""cached_attention: the active block's queries against a ragged KV-cache prefix plus the block's own keys.

Sampling-time, forward only. Keys seen by row b: cache slots [0, cache_lengths[b]) and every key of the block
(bidirectional inside the block; the "block" may carry a suffix for a dual cache). Cache tiles at or past a
row's length are skipped: on TPU the cache index map clamps to the row's last valid tile (no new DMA) and the
compute is predicated off; on GPU the loop's trip count is the row's tile count.

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

from kernels_pallas import flash_gpu, masks, xla
from kernels_pallas.tiles import MASK_VALUE, finalize, softmax_step, visible


def _pad_rows(x, multiple):
    extra = -x.shape[1] % multiple
    return jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2)) if extra else x


def cached_tpu(q, k_cache, v_cache, k_block, v_block, cache_lengths, *, block_q, block_k, interpret):
    b, lb, h, dh = q.shape
    hkv = k_cache.shape[2]
    g = h // hkv
    scale = float(1.0 / np.sqrt(dh))
    bq = block_q if lb > block_q else lb  # one q tile equal to the array's rows is always a legal block
    q2 = _pad_rows(q, bq).reshape(b, -1, h * dh)
    # A partial last cache tile would read past the array (unspecified data, and 0 * NaN = NaN): pad.
    k_cache, v_cache = _pad_rows(k_cache, block_k), _pad_rows(v_cache, block_k)
    s_pad = k_cache.shape[1]
    n_cache = s_pad // block_k
    kc2, vc2 = (x.reshape(b, s_pad, hkv * dh) for x in (k_cache, v_cache))
    kb2, vb2 = (x.reshape(b, lb, hkv * dh) for x in (k_block, v_block))

    def cache_index(bi, hi, i, j, lens):
        last = jnp.maximum(lax.div(lens[bi] + block_k - 1, block_k) - 1, 0)
        return bi, jnp.minimum(j, last), lax.div(hi, g)

    def kernel(lens_ref, q_ref, kc_ref, vc_ref, kb_ref, vb_ref, o_ref, m_sc, l_sc, acc_sc):
        bi, j = pl.program_id(0), pl.program_id(3)
        length = lens_ref[bi]

        @pl.when(j == 0)
        def _init():
            m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
            acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

        def update(k_t, v_t, vis):
            m, l, acc = softmax_step(q_ref[...], k_t, v_t, m_sc[:, :1], l_sc[:, :1], acc_sc[...], vis, scale)
            m_sc[...] = jnp.broadcast_to(m, m_sc.shape)
            l_sc[...] = jnp.broadcast_to(l, l_sc.shape)
            acc_sc[...] = acc

        @pl.when((j < n_cache) & (j * block_k < length))
        def _cache_tile():
            vis = visible(None, 0, j * block_k, (bq, block_k), structural=False, kv_len=length)
            update(kc_ref[...], vc_ref[...], vis)

        @pl.when(j == n_cache)
        def _block_and_finish():
            update(kb_ref[...], vb_ref[...], None)
            out, _ = finalize(m_sc[:, :1], l_sc[:, :1], acc_sc[...])
            o_ref[...] = out.astype(o_ref.dtype)

    q_spec = pl.BlockSpec((None, bq, dh), lambda bi, hi, i, j, lens: (bi, i, hi))
    cache_spec = pl.BlockSpec((None, block_k, dh), cache_index)
    block_spec = pl.BlockSpec((None, lb, dh), lambda bi, hi, i, j, lens: (bi, 0, lax.div(hi, g)))
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, h, q2.shape[1] // bq, n_cache + 1),
            in_specs=[q_spec, cache_spec, cache_spec, block_spec, block_spec], out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, 128), jnp.float32), pltpu.VMEM((bq, 128), jnp.float32),
                            pltpu.VMEM((bq, dh), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q2.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="cached_attention",
    )(cache_lengths.astype(jnp.int32), q2, kc2, vc2, kb2, vb2)
    return out.reshape(b, -1, h, dh)[:, :lb]


def cached_triton(q, k_cache, v_cache, k_block, v_block, cache_lengths, *, block_q, block_k, interpret):
    b, lb, h, dh = q.shape
    hkv = k_cache.shape[2]
    g = h // hkv
    scale = float(1.0 / np.sqrt(dh))
    # Triton tensors need power-of-two shapes: pad the head dim, the query tile and the block's keys.
    dhp = flash_gpu.kernel_head_dim(dh)
    lbp = max(16, pl.next_power_of_2(lb))
    bq = min(block_q, lbp)
    pad_dh = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, dhp - dh),)) if dhp != dh else x
    qp = pad_dh(_pad_rows(q, bq))
    kc, vc = (pad_dh(_pad_rows(x, block_k)) for x in (k_cache, v_cache))
    kb, vb = (pad_dh(jnp.pad(x, ((0, 0), (0, lbp - lb), (0, 0), (0, 0)))) for x in (k_block, v_block))
    s_pad = kc.shape[1]

    def kernel(lens_ref, q_ref, kc_ref, vc_ref, kb_ref, vb_ref, o_ref):
        length = lens_ref[pl.program_id(0)]
        q_t = q_ref[...]

        def body(j, carry):
            start = pl.multiple_of(j * block_k, block_k)
            vis = visible(None, 0, start, (bq, block_k), structural=False, kv_len=length, iota2d=False)
            return softmax_step(q_t, kc_ref[pl.ds(start, block_k), :], vc_ref[pl.ds(start, block_k), :], *carry,
                                vis, scale)

        init = (jnp.full((bq, 1), MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
                jnp.zeros((bq, dhp), jnp.float32))
        carry = lax.fori_loop(0, lax.div(length + block_k - 1, block_k), body, init)
        vis = visible(None, 0, 0, (bq, lbp), structural=False, kv_len=lb if lbp != lb else None, iota2d=False)
        carry = softmax_step(q_t, kb_ref[...], vb_ref[...], *carry, vis, scale)
        o_ref[...] = finalize(*carry)[0].astype(o_ref.dtype)

    q_spec = pl.BlockSpec((None, bq, None, dhp), lambda bi, hi, i: (bi, i, hi, 0))
    cache_spec = pl.BlockSpec((None, s_pad, None, dhp), lambda bi, hi, i: (bi, 0, lax.div(hi, g), 0))
    block_spec = pl.BlockSpec((None, lbp, None, dhp), lambda bi, hi, i: (bi, 0, lax.div(hi, g), 0))
    out = pl.pallas_call(
        kernel, grid=(b, h, qp.shape[1] // bq),
        in_specs=[pl.BlockSpec((b,), lambda *_: (0,)), q_spec, cache_spec, cache_spec, block_spec, block_spec],
        out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=flash_gpu.compiler_params(dhp), interpret=interpret, name="cached_attention",
    )(cache_lengths.astype(jnp.int32), qp, kc, vc, kb, vb)
    return out[:, :lb, :, :dh]


def cached_xla(q, k_cache, v_cache, k_block, v_block, cache_lengths, *, chunk=512):
    """Blockwise XLA twin: the block-attention scan over [cache ; block] with a per-row key mask."""
    b, lb = q.shape[:2]
    s = k_cache.shape[1]
    keys = jnp.concatenate([k_cache, k_block.astype(k_cache.dtype)], axis=1)
    values = jnp.concatenate([v_cache, v_block.astype(v_cache.dtype)], axis=1)
    key_mask = jnp.concatenate([jnp.arange(s)[None, :] < cache_lengths[:, None], jnp.ones((b, lb), bool)], axis=1)
    # Queries index the block, keys index [cache ; block]: an all-true structural mask, rows told apart by key_mask.
    return xla.block_attention(q, keys, values, mask=masks.Full(), key_mask=key_mask, chunk=chunk)
