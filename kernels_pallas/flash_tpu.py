"""block_attention on TPU (Pallas Mosaic): forward, dq and dk/dv kernels.

Layout: q/o [B, H, Lq, Dh], k/v [B, Hkv, Lk, Dh] (padded to the tiles), logsumexp and delta [B, H, Lq, 128]
(one row statistic repeated over 128 lanes: Mosaic tiles are (8, 128)). Segment ids, when present, are
q_seg [B, Lq, 1] and kv_seg [B, 1, Lk] int32 (key padding and the padded tail are a segment id no query holds).

Tile skipping: the grid's last axis walks a compacted list of the non-empty tiles of each row (scalar
prefetch, so the index maps can read it). Slots past a row's count repeat its last tile index, which the
pipeline recognises as "same block" and does not DMA again, and have kind EMPTY, so no compute runs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.masks import FULL, PARTIAL
from kernels_pallas.tiles import FlashPlan, MASK_VALUE, finalize, grad_step, softmax_step, visible, dot_nn, dot_tn

LANES = 128
_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _lanes(x, block_rows):
    """[rows, 1] -> [rows, 128]: row statistics are stored lane-replicated."""
    return jnp.broadcast_to(x, (block_rows, LANES))


def _tile_vis(plan: FlashPlan, q_tile, kv_tile, structural, seg_refs):
    q_seg = kv_seg = None
    if seg_refs:
        q_seg, kv_seg = seg_refs[0][...], seg_refs[1][...]
    return visible(plan.mask, q_tile * plan.block_q, kv_tile * plan.block_k, (plan.block_q, plan.block_k),
                   structural=structural, kv_len=plan.tail_kv_len if structural else None,
                   q_seg=q_seg, kv_seg=kv_seg)


def _by_kind(kind, step):
    """Run `step(structural)` for FULL and PARTIAL tiles; EMPTY slots (list padding) do nothing."""
    pl.when(kind == FULL)(lambda: step(False))
    pl.when(kind == PARTIAL)(lambda: step(True))


def _specs(plan: FlashPlan, width, dh, *, rows_are_q):
    """BlockSpecs for grid (b, h, row tile, slot); rows are q tiles (forward, dq) or kv tiles (dk/dv).

    The slot's column tile is read from the compacted list `idx` (scalar prefetch). K/V of query head h
    come from key/value head h // groups (grouped-query attention without repeating K/V in memory); it is
    written `lax.div` because `//` on traced ints lowers through `sign`, which Mosaic lowers only on a TPU.
    """
    bq, bk, g = plan.block_q, plan.block_k, plan.groups

    def q_tile(i, j, idx):
        return i if rows_are_q else idx[i * width + j]

    def kv_tile(i, j, idx):
        return idx[i * width + j] if rows_are_q else i

    return dict(
        q=pl.BlockSpec((None, None, bq, dh), lambda b, h, i, j, idx, *_: (b, h, q_tile(i, j, idx), 0)),
        kv=pl.BlockSpec((None, None, bk, dh), lambda b, h, i, j, idx, *_: (b, lax.div(h, g), kv_tile(i, j, idx), 0)),
        q_stat=pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j, idx, *_: (b, h, q_tile(i, j, idx), 0)),
        q_seg=pl.BlockSpec((None, bq, 1), lambda b, h, i, j, idx, *_: (b, q_tile(i, j, idx), 0)),
        kv_seg=pl.BlockSpec((None, 1, bk), lambda b, h, i, j, idx, *_: (b, 0, kv_tile(i, j, idx))),
        # dk/dv per query head (not h // g: two query heads must not accumulate into one block).
        dkv_out=pl.BlockSpec((None, None, bk, dh), lambda b, h, i, j, idx, *_: (b, h, kv_tile(i, j, idx), 0)),
    )


def _call(kernel, plan, lists, grid, in_specs, out_specs, out_shape, scratch, args):
    # The per-row counts are not needed here: padding slots carry kind EMPTY.
    idx, kind = (jnp.asarray(a.reshape(-1)) for a in lists[:2])
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape, compiler_params=_SEMANTICS, interpret=plan.interpret,
    )(idx, kind, *args)


def forward(plan: FlashPlan, q, k, v, q_seg=None, kv_seg=None):
    """-> (out [B, H, Lq_pad, Dh] q.dtype, lse [B, H, Lq_pad, 128] float32)."""
    b, h, lq, dh = q.shape
    lists = plan.kv_lists()
    width = lists[0].shape[1]
    sp = _specs(plan, width, dh, rows_are_q=True)
    bq = plan.block_q
    seg = plan.has_segments

    def kernel(idx_ref, kind_ref, q_ref, k_ref, v_ref, *refs):
        seg_refs, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = (refs[:2], refs[2:]) if seg else ((), refs)
        i, j = pl.program_id(2), pl.program_id(3)

        @pl.when(j == 0)
        def _init():
            m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
            acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

        slot = i * width + j

        def step(structural):
            vis = _tile_vis(plan, i, idx_ref[slot], structural, seg_refs)
            m, l, acc = softmax_step(q_ref[...], k_ref[...], v_ref[...], m_sc[:, :1], l_sc[:, :1], acc_sc[...],
                                     vis, plan.scale)
            m_sc[...], l_sc[...], acc_sc[...] = _lanes(m, bq), _lanes(l, bq), acc

        _by_kind(kind_ref[slot], step)

        @pl.when(j == width - 1)
        def _finish():
            out, lse = finalize(m_sc[:, :1], l_sc[:, :1], acc_sc[...])
            o_ref[...] = out.astype(o_ref.dtype)
            lse_ref[...] = _lanes(lse, bq)

    in_specs = [sp["q"], sp["kv"], sp["kv"]] + ([sp["q_seg"], sp["kv_seg"]] if seg else [])
    args = (q, k, v) + ((q_seg, kv_seg) if seg else ())
    out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, lq, LANES), jnp.float32))
    scratch = [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
               pltpu.VMEM((bq, dh), jnp.float32)]
    return _call(kernel, plan, lists, (b, h, lq // bq, width), in_specs, [sp["q"], sp["q_stat"]], out_shape,
                 scratch, args)


def backward_dq(plan: FlashPlan, q, k, v, do, lse, delta, q_seg=None, kv_seg=None):
    """dq [B, H, Lq_pad, Dh] in q.dtype; lse/delta [B, H, Lq_pad, 128] float32."""
    b, h, lq, dh = q.shape
    lists = plan.kv_lists()
    width = lists[0].shape[1]
    sp = _specs(plan, width, dh, rows_are_q=True)
    seg = plan.has_segments

    def kernel(idx_ref, kind_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        seg_refs, (dq_ref, dq_sc) = (refs[:2], refs[2:]) if seg else ((), refs)
        i, j = pl.program_id(2), pl.program_id(3)

        @pl.when(j == 0)
        def _init():
            dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

        slot = i * width + j

        def step(structural):
            vis = _tile_vis(plan, i, idx_ref[slot], structural, seg_refs)
            k_t = k_ref[...]
            _, ds = grad_step(q_ref[...], k_t, v_ref[...], do_ref[...], lse_ref[:, :1], delta_ref[:, :1], vis,
                              plan.scale)
            dq_sc[...] += dot_nn(ds.astype(k_t.dtype), k_t)

        _by_kind(kind_ref[slot], step)

        @pl.when(j == width - 1)
        def _finish():
            dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)

    in_specs = [sp["q"], sp["kv"], sp["kv"], sp["q"], sp["q_stat"], sp["q_stat"]]
    in_specs += [sp["q_seg"], sp["kv_seg"]] if seg else []
    args = (q, k, v, do, lse, delta) + ((q_seg, kv_seg) if seg else ())
    return _call(kernel, plan, lists, (b, h, lq // plan.block_q, width), in_specs, sp["q"],
                 jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((plan.block_q, dh), jnp.float32)], args)


def backward_dkv(plan: FlashPlan, q, k, v, do, lse, delta, q_seg=None, kv_seg=None):
    """(dk, dv) per query head: float32 [B, H, Lk_pad, Dh]; the caller sums the GQA groups."""
    b, h, lq, dh = q.shape
    lk = k.shape[2]
    lists = plan.q_lists()
    width = lists[0].shape[1]
    sp = _specs(plan, width, dh, rows_are_q=False)
    seg = plan.has_segments

    def kernel(idx_ref, kind_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        seg_refs, (dk_ref, dv_ref, dk_sc, dv_sc) = (refs[:2], refs[2:]) if seg else ((), refs)
        kj, t = pl.program_id(2), pl.program_id(3)

        @pl.when(t == 0)
        def _init():
            dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
            dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

        slot = kj * width + t

        def step(structural):
            vis = _tile_vis(plan, idx_ref[slot], kj, structural, seg_refs)
            q_t, do_t = q_ref[...], do_ref[...]
            p, ds = grad_step(q_t, k_ref[...], v_ref[...], do_t, lse_ref[:, :1], delta_ref[:, :1], vis, plan.scale)
            dv_sc[...] += dot_tn(p.astype(do_t.dtype), do_t)
            dk_sc[...] += dot_tn(ds.astype(q_t.dtype), q_t)

        _by_kind(kind_ref[slot], step)

        @pl.when(t == width - 1)
        def _finish():
            dk_ref[...], dv_ref[...] = dk_sc[...], dv_sc[...]

    in_specs = [sp["q"], sp["kv"], sp["kv"], sp["q"], sp["q_stat"], sp["q_stat"]]
    in_specs += [sp["q_seg"], sp["kv_seg"]] if seg else []
    args = (q, k, v, do, lse, delta) + ((q_seg, kv_seg) if seg else ())
    out = jax.ShapeDtypeStruct((b, h, lk, dh), jnp.float32)
    scratch = [pltpu.VMEM((plan.block_k, dh), jnp.float32)] * 2
    return _call(kernel, plan, lists, (b, h, lk // plan.block_k, width), in_specs, [sp["dkv_out"]] * 2,
                 (out, out), scratch, args)


def segment_layout(q_seg, kv_seg):
    """[B, Lq], [B, Lk] int32 -> the sublane / lane oriented blocks the kernels read."""
    return q_seg[:, :, None], kv_seg[:, None, :]


def backward(plan: FlashPlan, q, k, v, out, lse, do, q_seg=None, kv_seg=None):
    """-> dq [B, H, Lq_pad, Dh] (q.dtype), dk/dv per query head float32 [B, H, Lk_pad, Dh]."""
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    delta = jnp.broadcast_to(delta, lse.shape)
    dq = backward_dq(plan, q, k, v, do, lse, delta, q_seg, kv_seg)
    dk, dv = backward_dkv(plan, q, k, v, do, lse, delta, q_seg, kv_seg)
    return dq, dk, dv


def kernel_head_dim(dh: int) -> int:
    """Mosaic takes the head dim as is (dispatch checks it is lane-aligned for real TPU runs)."""
    return dh
