"""Per-tile math shared by the Mosaic (TPU) and Triton (GPU) kernels (the XLA path shares the constants).

Everything here works on one (q tile, kv tile) pair held in registers/VMEM: scores, the online-softmax
update of the forward pass, and the probabilities / score gradients of the backward pass. Row statistics
(running max m, running sum l, logsumexp, delta) are shaped [block_q, 1] so they broadcast against
[block_q, block_k] tiles on every backend.
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax

from kernels_pallas.masks import compact_tiles, tile_map

# Finite stand-in for -inf: a row that has seen no visible key keeps m = MASK_VALUE and never meets
# exp(-inf + inf) = NaN. EMPTY_ROW_LSE makes exp(s - lse) exactly 0 for such rows in the backward pass.
MASK_VALUE = -1e30
EMPTY_ROW_LSE = 1e30

_NT = (((1,), (1,)), ((), ()))  # a @ b.T without materialising the transpose
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def dot_nt(a, b):
    return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def dot_tn(a, b):
    return lax.dot_general(a, b, _TN, preferred_element_type=jnp.float32)


def dot_nn(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def visible(mask, q_start, kv_start, shape, *, structural, kv_len=None, q_seg=None, kv_seg=None, iota2d=True):
    """bool[block_q, block_k] visibility of a tile, or None when nothing needs masking.

    structural: evaluate `mask` (PARTIAL tiles); FULL tiles skip it. kv_len: mask keys at or past it (the
    padded tail). q_seg [block_q, 1] / kv_seg [1, block_k]: equal-segment rule (also carries key padding).
    iota2d: Mosaic wants 2-D iotas; Triton prefers 1-D aranges broadcast.
    """
    bq, bk = shape
    vis = None
    if structural or kv_len is not None:
        if iota2d:
            q_idx = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
            kv_idx = kv_start + lax.broadcasted_iota(jnp.int32, shape, 1)
        else:
            q_idx = q_start + jnp.arange(bq, dtype=jnp.int32)[:, None]
            kv_idx = kv_start + jnp.arange(bk, dtype=jnp.int32)[None, :]
        if structural:
            vis = mask.allowed(q_idx, kv_idx)
        if kv_len is not None:
            tail = kv_idx < kv_len
            vis = tail if vis is None else vis & tail
    if q_seg is not None:
        same = q_seg == kv_seg
        vis = same if vis is None else vis & same
    return vis


def softmax_step(q, k, v, m_prev, l_prev, acc_prev, vis, scale):
    """One online-softmax update. q [bq, Dh], k/v [bk, Dh], m/l [bq, 1], acc [bq, Dh] float32."""
    s = dot_nt(q, k) * scale
    if vis is not None:
        s = jnp.where(vis, s, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    if vis is not None:
        # Without this a row whose keys so far are all masked would count them with weight exp(0) = 1.
        p = jnp.where(vis, p, 0.0)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    acc_new = alpha * acc_prev + dot_nn(p.astype(v.dtype), v)
    return m_new, l_new, acc_new


def finalize(m, l, acc):
    """(output float32 [bq, Dh], logsumexp [bq, 1]); rows that saw no key give 0 and EMPTY_ROW_LSE."""
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    out = jnp.where(seen, acc / safe_l, 0.0)
    lse = jnp.where(seen, m + jnp.log(safe_l), EMPTY_ROW_LSE)
    return out, lse


def grad_step(q, k, v, do, lse, delta, vis, scale):
    """Backward of one tile: (p [bq, bk] float32, ds [bq, bk] float32, already times `scale`).

    dq += ds @ k, dk += ds.T @ q, dv += p.T @ do. lse/delta [bq, 1]; delta = rowsum(do * out).
    """
    s = dot_nt(q, k) * scale
    p = jnp.exp(s - lse)
    if vis is not None:
        p = jnp.where(vis, p, 0.0)
    dp = dot_nt(do, v)
    ds = p * (dp - delta) * scale
    return p, ds


@dataclasses.dataclass(frozen=True)
class FlashPlan:
    """Static description of one block_attention call after padding: hashable, so it can key jit caches.

    q_len/kv_len are the true lengths; the arrays the kernels see are padded to multiples of the tiles.
    """

    mask: object
    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    groups: int  # query heads per key/value head
    scale: float
    has_segments: bool
    interpret: object  # bool, or pltpu.InterpretParams for TPU interpret mode

    @property
    def q_pad(self) -> int:
        return -(-self.q_len // self.block_q) * self.block_q

    @property
    def kv_pad(self) -> int:
        return -(-self.kv_len // self.block_k) * self.block_k

    @property
    def tail_kv_len(self):
        """kv_len when the padded key tail must be masked, else None (no index arithmetic needed)."""
        return self.kv_len if self.kv_pad != self.kv_len else None

    def kv_lists(self):
        """Per q tile, the non-empty kv tiles (index, kind, count), as numpy int32 (see masks.compact_tiles)."""
        return _lists(self.mask, self.q_len, self.kv_len, self.block_q, self.block_k, False)

    def q_lists(self):
        """Per kv tile, the q tiles that see it (for the dk/dv pass)."""
        return _lists(self.mask, self.q_len, self.kv_len, self.block_q, self.block_k, True)


@functools.lru_cache(maxsize=256)
def _lists(mask, q_len, kv_len, block_q, block_k, transpose):
    tmap = tile_map(mask, q_len, kv_len, block_q, block_k)
    return compact_tiles(tmap.T if transpose else tmap)
