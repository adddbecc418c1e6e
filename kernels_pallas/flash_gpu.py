"""block_attention on GPU (Pallas Triton): forward, dq and dk/dv kernels.

Triton programs of one grid run concurrently, so a reduction cannot walk a grid axis as on TPU: each program
owns one row tile (a q tile for forward/dq, a kv tile for dk/dv) and loops over the compacted list of its
non-empty column tiles with a dynamic trip count; empty tiles are never loaded. The whole K/V (or Q/dO) of
one head is the block, and the loop loads `block` rows at a time from it.

Layout: q/o [B, H, Lq, Dh], k/v [B, Hkv, Lk, Dh] (tiles padded; Dh padded to a power of two because Triton
tensors must have power-of-two shapes), logsumexp/delta [B, H, Lq], segments [B, L] int32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels_pallas.masks import FULL
from kernels_pallas.tiles import FlashPlan, MASK_VALUE, dot_nn, dot_tn, finalize, grad_step, softmax_step, visible


def compiler_params(head_dim: int):
    # Passing Triton params also keeps jax from routing the call to Mosaic GPU (Hopper-only, see PLATFORM_NOTES).
    return plt.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def kernel_head_dim(dh: int) -> int:
    return max(16, pl.next_power_of_2(dh))


def segment_layout(q_seg, kv_seg):
    return q_seg, kv_seg


def _squeeze_rows(x):
    """[rows, 1] -> [rows] via a reduction: Triton lowering rejects the equivalent slice/reshape."""
    return jnp.sum(x, axis=1)


def _tile_vis(plan, q_start, kv_start, structural, q_seg, kv_seg):
    return visible(plan.mask, q_start, kv_start, (plan.block_q, plan.block_k), structural=structural,
                   kv_len=plan.tail_kv_len if structural else None, q_seg=q_seg, kv_seg=kv_seg, iota2d=False)


def _loop(count, body, carry):
    return lax.fori_loop(0, count, body, carry)


def _lists(lists):
    return tuple(jnp.asarray(a.reshape(-1)) for a in lists)


def _whole(shape):
    """BlockSpec for a small array every program reads whole (the compacted tile lists)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def forward(plan: FlashPlan, q, k, v, q_seg=None, kv_seg=None):
    """-> (out [B, H, Lq_pad, Dh] q.dtype, lse [B, H, Lq_pad] float32)."""
    b, h, lq, dh = q.shape
    lk = k.shape[2]
    bq, bk, g = plan.block_q, plan.block_k, plan.groups
    idx, kind, cnt = _lists(plan.kv_lists())
    width = plan.kv_lists()[0].shape[1]
    seg = plan.has_segments

    def kernel(idx_ref, kind_ref, cnt_ref, q_ref, k_ref, v_ref, *refs):
        (qs_ref, ks_ref, o_ref, lse_ref) = refs if seg else (None, None) + refs
        i = pl.program_id(2)
        q_t = q_ref[...]
        q_seg_t = qs_ref[...][:, None] if seg else None

        def body(j, carry):
            slot = i * width + j
            start = pl.multiple_of(idx_ref[slot] * bk, bk)
            k_t, v_t = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
            kv_seg_t = ks_ref[pl.ds(start, bk)][None, :] if seg else None

            def step(structural):
                return lambda c: softmax_step(q_t, k_t, v_t, *c, _tile_vis(plan, i * bq, start, structural,
                                                                             q_seg_t, kv_seg_t), plan.scale)

            return lax.cond(kind_ref[slot] == FULL, step(False), step(True), carry)

        init = (jnp.full((bq, 1), MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
                jnp.zeros((bq, dh), jnp.float32))
        out, lse = finalize(*_loop(cnt_ref[i], body, init))
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = _squeeze_rows(lse)

    in_specs = [_whole(idx.shape), _whole(kind.shape), _whole(cnt.shape),
                pl.BlockSpec((None, None, bq, dh), lambda b_, h_, i: (b_, h_, i, 0)),
                pl.BlockSpec((None, None, lk, dh), lambda b_, h_, i: (b_, h_ // g, 0, 0)),
                pl.BlockSpec((None, None, lk, dh), lambda b_, h_, i: (b_, h_ // g, 0, 0))]
    if seg:
        in_specs += [pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),
                     pl.BlockSpec((None, lk), lambda b_, h_, i: (b_, 0))]
    out_specs = [pl.BlockSpec((None, None, bq, dh), lambda b_, h_, i: (b_, h_, i, 0)),
                 pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i))]
    out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, lq), jnp.float32))
    args = (idx, kind, cnt, q, k, v) + ((q_seg, kv_seg) if seg else ())
    return pl.pallas_call(kernel, grid=(b, h, lq // bq), in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, compiler_params=compiler_params(dh), interpret=plan.interpret,
                          name="block_attention_fwd")(*args)


def backward(plan: FlashPlan, q, k, v, out, lse, do, q_seg=None, kv_seg=None):
    """-> dq [B, H, Lq_pad, Dh] (q.dtype), dk/dv per query head float32 [B, H, Lk_pad, Dh]."""
    b, h, lq, dh = q.shape
    lk = k.shape[2]
    bq, bk, g = plan.block_q, plan.block_k, plan.groups
    seg = plan.has_segments
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    params = compiler_params(dh)

    # dq: one program per q tile, looping over its kv tiles.
    kv_idx, kv_kind, kv_cnt = _lists(plan.kv_lists())
    kv_width = plan.kv_lists()[0].shape[1]

    def dq_kernel(idx_ref, kind_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        (qs_ref, ks_ref, dq_ref) = refs if seg else (None, None) + refs
        i = pl.program_id(2)
        q_t, do_t = q_ref[...], do_ref[...]
        lse_t, delta_t = lse_ref[...][:, None], delta_ref[...][:, None]
        q_seg_t = qs_ref[...][:, None] if seg else None

        def body(j, dq_acc):
            slot = i * kv_width + j
            start = pl.multiple_of(idx_ref[slot] * bk, bk)
            k_t, v_t = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
            kv_seg_t = ks_ref[pl.ds(start, bk)][None, :] if seg else None

            def step(structural):
                def run(acc):
                    vis = _tile_vis(plan, i * bq, start, structural, q_seg_t, kv_seg_t)
                    _, ds = grad_step(q_t, k_t, v_t, do_t, lse_t, delta_t, vis, plan.scale)
                    return acc + dot_nn(ds.astype(k_t.dtype), k_t)
                return run

            return lax.cond(kind_ref[slot] == FULL, step(False), step(True), dq_acc)

        dq_ref[...] = _loop(cnt_ref[i], body, jnp.zeros((bq, dh), jnp.float32)).astype(dq_ref.dtype)

    q_block = pl.BlockSpec((None, None, bq, dh), lambda b_, h_, i: (b_, h_, i, 0))
    kv_whole = pl.BlockSpec((None, None, lk, dh), lambda b_, h_, i: (b_, h_ // g, 0, 0))
    stat_block = pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i))
    in_specs = [_whole(kv_idx.shape), _whole(kv_kind.shape), _whole(kv_cnt.shape),
                q_block, kv_whole, kv_whole, q_block, stat_block, stat_block]
    if seg:
        in_specs += [pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),
                     pl.BlockSpec((None, lk), lambda b_, h_, i: (b_, 0))]
    segs = (q_seg, kv_seg) if seg else ()
    dq = pl.pallas_call(dq_kernel, grid=(b, h, lq // bq), in_specs=in_specs, out_specs=q_block,
                        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), compiler_params=params,
                        interpret=plan.interpret, name="block_attention_dq")(
        kv_idx, kv_kind, kv_cnt, q, k, v, do, lse, delta, *segs)

    # dk/dv: one program per (query head, kv tile), looping over the q tiles that see it.
    q_idx, q_kind, q_cnt = _lists(plan.q_lists())
    q_width = plan.q_lists()[0].shape[1]

    def dkv_kernel(idx_ref, kind_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        (qs_ref, ks_ref, dk_ref, dv_ref) = refs if seg else (None, None) + refs
        kj = pl.program_id(2)
        k_t, v_t = k_ref[...], v_ref[...]
        kv_seg_t = ks_ref[...][None, :] if seg else None

        def body(t, carry):
            slot = kj * q_width + t
            start = pl.multiple_of(idx_ref[slot] * bq, bq)
            q_t, do_t = q_ref[pl.ds(start, bq), :], do_ref[pl.ds(start, bq), :]
            lse_t, delta_t = lse_ref[pl.ds(start, bq)][:, None], delta_ref[pl.ds(start, bq)][:, None]
            q_seg_t = qs_ref[pl.ds(start, bq)][:, None] if seg else None

            def step(structural):
                def run(c):
                    vis = _tile_vis(plan, start, kj * bk, structural, q_seg_t, kv_seg_t)
                    p, ds = grad_step(q_t, k_t, v_t, do_t, lse_t, delta_t, vis, plan.scale)
                    return c[0] + dot_tn(ds.astype(q_t.dtype), q_t), c[1] + dot_tn(p.astype(do_t.dtype), do_t)
                return run

            return lax.cond(kind_ref[slot] == FULL, step(False), step(True), carry)

        zeros = jnp.zeros((bk, dh), jnp.float32)
        dk, dv = _loop(cnt_ref[kj], body, (zeros, zeros))
        dk_ref[...], dv_ref[...] = dk, dv

    q_whole = pl.BlockSpec((None, None, lq, dh), lambda b_, h_, j: (b_, h_, 0, 0))
    kv_block = pl.BlockSpec((None, None, bk, dh), lambda b_, h_, j: (b_, h_ // g, j, 0))
    stat_whole = pl.BlockSpec((None, None, lq), lambda b_, h_, j: (b_, h_, 0))
    in_specs = [_whole(q_idx.shape), _whole(q_kind.shape), _whole(q_cnt.shape),
                q_whole, kv_block, kv_block, q_whole, stat_whole, stat_whole]
    if seg:
        in_specs += [pl.BlockSpec((None, lq), lambda b_, h_, j: (b_, 0)),
                     pl.BlockSpec((None, bk), lambda b_, h_, j: (b_, j))]
    out_block = pl.BlockSpec((None, None, bk, dh), lambda b_, h_, j: (b_, h_, j, 0))
    grad_shape = jax.ShapeDtypeStruct((b, h, lk, dh), jnp.float32)
    dk, dv = pl.pallas_call(dkv_kernel, grid=(b, h, lk // bk), in_specs=in_specs, out_specs=[out_block] * 2,
                            out_shape=(grad_shape, grad_shape), compiler_params=params,
                            interpret=plan.interpret, name="block_attention_dkv")(
        q_idx, q_kind, q_cnt, q, k, v, do, lse, delta, *segs)
    return dq, dk, dv
