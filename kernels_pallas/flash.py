"""block_attention through a Pallas backend: layout, padding, segments and the custom VJP.

The backends (`flash_tpu` for Mosaic, `flash_gpu` for Triton) see [B, heads, L_pad, Dh] arrays padded to
their tiles; this module transposes/pads on the way in, slices on the way out, and wires the Pallas forward
and backward kernels into one `jax.custom_vjp` (autodiff cannot see through `pallas_call`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import flash_gpu, flash_tpu
from kernels_pallas.tiles import FlashPlan

BACKENDS = {"mosaic": flash_tpu, "triton": flash_gpu}
# Key padding and padded tails become segment ids that no query holds; distinct from any user id >= -2^31+2.
KEY_PAD_SEGMENT = np.iinfo(np.int32).min
QUERY_PAD_SEGMENT = KEY_PAD_SEGMENT + 1


def _segments(segment_ids, key_mask, plan: FlashPlan, batch: int):
    """Padded (q_seg [B, Lq_pad], kv_seg [B, Lk_pad]) int32, or (None, None) when neither is given."""
    if not plan.has_segments:
        return None, None
    if segment_ids is None:
        q_seg = jnp.zeros((batch, plan.q_len), jnp.int32)
        kv_seg = jnp.zeros((batch, plan.kv_len), jnp.int32)
    else:
        q_seg = kv_seg = segment_ids.astype(jnp.int32)
    if key_mask is not None:
        kv_seg = jnp.where(key_mask, kv_seg, KEY_PAD_SEGMENT)
    q_seg = jnp.pad(q_seg, ((0, 0), (0, plan.q_pad - plan.q_len)), constant_values=QUERY_PAD_SEGMENT)
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, plan.kv_pad - plan.kv_len)), constant_values=KEY_PAD_SEGMENT)
    return q_seg, kv_seg


def _to_kernel(x, length_pad, dh_pad):
    """[B, L, heads, Dh] -> [B, heads, L_pad, Dh_pad] (zero padding changes no score and no output)."""
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, length_pad - x.shape[2]), (0, dh_pad - x.shape[3])))


def _from_kernel(x, length, dh):
    return jnp.swapaxes(x[:, :, :length, :dh], 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(backend: str, plan: FlashPlan, q, k, v, q_seg, kv_seg):
    return _flash_fwd(backend, plan, q, k, v, q_seg, kv_seg)[0]


def _flash_fwd(backend, plan, q, k, v, q_seg, kv_seg):
    mod = BACKENDS[backend]
    dh = q.shape[-1]
    dh_pad = mod.kernel_head_dim(dh)
    qt = _to_kernel(q, plan.q_pad, dh_pad)
    kt, vt = _to_kernel(k, plan.kv_pad, dh_pad), _to_kernel(v, plan.kv_pad, dh_pad)
    segs = mod.segment_layout(q_seg, kv_seg) if plan.has_segments else (None, None)
    out_t, lse = mod.forward(plan, qt, kt, vt, *segs)
    return _from_kernel(out_t, plan.q_len, dh), (qt, kt, vt, out_t, lse, segs, q_seg, kv_seg)


def _flash_bwd(backend, plan, residuals, d_out):
    qt, kt, vt, out_t, lse, segs, q_seg, kv_seg = residuals
    mod = BACKENDS[backend]
    b, h, _, dh_pad = qt.shape
    hkv, dh = kt.shape[1], d_out.shape[-1]
    do_t = _to_kernel(d_out.astype(qt.dtype), plan.q_pad, dh_pad)
    dq, dk, dv = mod.backward(plan, qt, kt, vt, out_t, lse, do_t, *segs)
    # The kernels give dk/dv per query head; the GQA group of a key/value head sums them.
    dk = dk.reshape(b, hkv, plan.groups, plan.kv_pad, dh_pad).sum(axis=2)
    dv = dv.reshape(b, hkv, plan.groups, plan.kv_pad, dh_pad).sum(axis=2)
    zero_seg = lambda s: None if s is None else np.zeros(s.shape, jax.dtypes.float0)
    return (_from_kernel(dq, plan.q_len, dh), _from_kernel(dk, plan.kv_len, dh).astype(kt.dtype),
            _from_kernel(dv, plan.kv_len, dh).astype(vt.dtype), zero_seg(q_seg), zero_seg(kv_seg))


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, mask, segment_ids, key_mask, backend, block_q, block_k, interpret):
    """Pallas block_attention; arguments as `kernels_pallas.block_attention` after dispatch validated them."""
    b, lq, h, dh = q.shape
    plan = FlashPlan(mask=mask, q_len=lq, kv_len=k.shape[1], block_q=block_q, block_k=block_k,
                     groups=h // k.shape[2], scale=float(1.0 / np.sqrt(dh)),
                     has_segments=segment_ids is not None or key_mask is not None, interpret=interpret)
    q_seg, kv_seg = _segments(segment_ids, key_mask, plan, b)
    return _flash(backend, plan, q, k, v, q_seg, kv_seg)
