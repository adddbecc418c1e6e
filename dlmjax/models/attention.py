"""Attention dispatch: one function, a small hashable mask description, several implementations.

Masks are described, not materialised: each `MaskSpec` is a pure function of (query index, key index) that
works on numpy and jnp index arrays alike, so the dense XLA path here and the Pallas kernels
(`kernels_pallas`) evaluate the same rule. Key padding (`key_mask`) and an arbitrary dense mask are extra
arguments because they are data, not structure.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dlmjax.diffusion.masks import bd3_allowed, check_block_size


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Base class: `allowed(q_idx, kv_idx) -> bool` (True = may attend), broadcasting over index arrays."""

    def allowed(self, q_idx, kv_idx):  # pragma: no cover - abstract
        raise NotImplementedError

    def dense(self, q_len: int, kv_len: int, xp: Any = jnp):
        """bool[q_len, kv_len]; only for small lengths (tests, the XLA fallback)."""
        q = xp.arange(q_len)[:, None]
        kv = xp.arange(kv_len)[None, :]
        return xp.broadcast_to(self.allowed(q, kv), (q_len, kv_len))


@dataclasses.dataclass(frozen=True)
class FullMask(MaskSpec):
    """Bidirectional attention over every key (LLaDA, MDLM, Dream)."""

    def allowed(self, q_idx, kv_idx):
        return (q_idx >= 0) & (kv_idx >= 0)


@dataclasses.dataclass(frozen=True)
class CausalMask(MaskSpec):
    """Token i sees keys <= i (with an offset for queries that continue a cache)."""

    offset: int = 0

    def allowed(self, q_idx, kv_idx):
        return kv_idx <= q_idx + self.offset


@dataclasses.dataclass(frozen=True)
class BlockCausalMask(MaskSpec):
    """Bidirectional inside a block of `block_size`, causal across blocks: q // B >= kv // B."""

    block_size: int

    def __post_init__(self):
        if self.block_size <= 0:
            raise ValueError(f"BlockCausalMask.block_size={self.block_size} must be > 0")

    def allowed(self, q_idx, kv_idx):
        return (q_idx // self.block_size) >= (kv_idx // self.block_size)


@dataclasses.dataclass(frozen=True)
class Bd3TrainingMask(MaskSpec):
    """BD3-LM's training mask over `[x_t ; x_0]` (2 * length slots): M_BD | M_OBC | M_BC.

    The rule lives in `dlmjax.diffusion.masks.bd3_allowed` (see there); this hashable spec lets the attention
    dispatch (and a Pallas kernel) evaluate it from indices. Queries and keys index the 2L-slot input.
    """

    length: int
    block_size: int

    def __post_init__(self):
        check_block_size(self.length, self.block_size, owner="Bd3TrainingMask")

    def allowed(self, q_idx, kv_idx):
        return bd3_allowed(q_idx, kv_idx, self.length, self.block_size)


ATTENTION_IMPLS = ("xla",)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: MaskSpec = FullMask(),
    key_mask: jax.Array | None = None,
    dense_mask: jax.Array | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads.

    Args:
      q: [B, Lq, H, Dh]; k, v: [B, Lk, Hkv, Dh] with H a multiple of Hkv.
      mask: structural mask, evaluated from indices.
      key_mask: bool [B, Lk], False marks padding keys that no query may see.
      dense_mask: bool [B or 1, Lq, Lk], an arbitrary extra mask (ANDed with the others).
      impl: "xla" (einsum + softmax in float32). Pallas kernels plug in here.
    Returns:
      [B, Lq, H, Dh] in q's dtype.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl={impl!r} is not available; choose one of {ATTENTION_IMPLS}")
    b, lq, h, dh = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"query heads {h} must be a multiple of key/value heads {hkv}")
    groups = h // hkv
    qg = q.reshape(b, lq, hkv, groups, dh)
    # float32 scores and softmax whatever the activation dtype: bf16 softmax loses the ranking of confidences.
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / np.sqrt(dh))
    allowed = mask.dense(lq, lk)[None, None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, None, :]
    if dense_mask is not None:
        allowed = allowed & dense_mask[:, None, None]
    # A large finite negative keeps fully-masked rows (padding queries) finite instead of NaN.
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, lq, h, dh).astype(q.dtype)


def attend_with_cache(q, k, v, *, mask, key_mask, dense_mask, impl, cache_k=None, cache_v=None):
    """Attention of a chunk, optionally after a KV-cache prefix; shared by every block that supports a cache.

    Without `cache_k/v` it is `attention(q, k, v, ...)` and returns `(out, None)`. With them ([B, S, Hkv, Dh])
    the keys and values are `[all S cache slots ; this chunk]` (which cache slots are valid is in
    `dense_mask` [B, n, S + n]) and it returns `(out, (k, v))`, the chunk's K/V for the caller to write back.
    """
    if cache_k is None:
        return attention(q, k, v, mask=mask, key_mask=key_mask, dense_mask=dense_mask, impl=impl), None
    keys = jnp.concatenate([cache_k, k.astype(cache_k.dtype)], axis=1)
    values = jnp.concatenate([cache_v, v.astype(cache_v.dtype)], axis=1)
    out = attention(q, keys, values, mask=mask, key_mask=key_mask, dense_mask=dense_mask, impl=impl)
    return out, (k, v)
