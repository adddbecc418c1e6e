"""Attention dispatch: one function, a small hashable mask description, several implementations.

Masks are described, not materialised: each is a `kernels_pallas.masks.Mask` (`Full`, `Causal`, `BlockCausal`,
`Bd3Training`), a pure function of (query index, key index) that works on numpy and jnp index arrays alike, so the
dense XLA path here and the Pallas kernels evaluate the one rule, defined once there. Key padding (`key_mask`) and
an arbitrary dense mask are extra arguments because they are data, not structure.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.masks import Bd3Training, BlockCausal, Causal, Full, Mask


# "xla": dense einsum + softmax. "pallas": `kernels_pallas.block_attention` with impl "auto" (the Mosaic kernel on
# TPU, the Triton kernel on GPU, its blockwise XLA path on CPU). "pallas_interpret": the Pallas (Triton) kernel in
# interpret mode, which runs anywhere; it is how the CPU test suite exercises the kernels inside the model.
ATTENTION_IMPLS = ("xla", "pallas", "pallas_interpret")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: Mask = Full(),
    key_mask: jax.Array | None = None,
    dense_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads.

    Args:
      q: [B, Lq, H, Dh]; k, v: [B, Lk, Hkv, Dh] with H a multiple of Hkv.
      mask: structural mask, evaluated from indices.
      key_mask: bool [B, Lk], False marks padding keys that no query may see.
      dense_mask: bool [B or 1, Lq, Lk], an arbitrary extra mask (ANDed with the others).
      segment_ids: int [B, L] (needs Lq == Lk), packed documents: a query sees only keys of its own segment.
      impl: one of ATTENTION_IMPLS (see there); "xla" is einsum + softmax in float32.
    Returns:
      [B, Lq, H, Dh] in q's dtype.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl={impl!r} is not available; choose one of {ATTENTION_IMPLS}")
    if impl != "xla" and dense_mask is None:
        import kernels_pallas  # noqa: PLC0415 (its masks are imported above; the kernels only when asked for)

        interpret = impl == "pallas_interpret"
        if segment_ids is not None:
            return kernels_pallas.block_attention(
                q, k, v, mask=mask, segment_ids=segment_ids,
                key_mask=None if key_mask is None else key_mask.astype(bool),
                impl="triton" if interpret else "auto", interpret=interpret or None)
        return kernels_pallas.attention_for_model(q, k, v, mask=mask, key_mask=key_mask,
                                                  impl="triton" if interpret else "auto", interpret=interpret or None)
    # With an arbitrary dense mask (the cached samplers' chunk masks) the kernels have no mask description to
    # evaluate, so those calls take the dense path below whatever `impl` says.
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
    if segment_ids is not None:
        if lq != lk or segment_ids.shape != (b, lq):
            raise ValueError(f"segment_ids {segment_ids.shape} must be [B, L] = {(b, lq)} with Lq == Lk (got Lk={lk})")
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, None]
    # A large finite negative keeps fully-masked rows (padding queries) finite instead of NaN.
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, lq, h, dh).astype(q.dtype)


def attend_with_cache(q, k, v, *, mask, key_mask, dense_mask, impl, cache_k=None, cache_v=None, segment_ids=None):
    """Attention of a chunk, optionally after a KV-cache prefix; shared by every block that supports a cache.

    Without `cache_k/v` it is `attention(q, k, v, ...)` and returns `(out, None)`. With them ([B, S, Hkv, Dh])
    the keys and values are `[all S cache slots ; this chunk]` (which cache slots are valid is in
    `dense_mask` [B, n, S + n]) and it returns `(out, (k, v))`, the chunk's K/V for the caller to write back.
    The cache is never copied: scores against the cache and against the chunk are computed separately and share
    one softmax (concatenating K/V would copy the whole cache in every layer of every sampling step).
    """
    if cache_k is None:
        return attention(q, k, v, mask=mask, key_mask=key_mask, dense_mask=dense_mask, segment_ids=segment_ids,
                         impl=impl), None
    if segment_ids is not None:
        raise ValueError("segment_ids (packed training rows) cannot be combined with a KV cache")
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl={impl!r} is not available; choose one of {ATTENTION_IMPLS}")
    b, lq, h, dh = q.shape
    slots, hkv = cache_k.shape[1], cache_k.shape[2]
    qg = (q * (1.0 / np.sqrt(dh)).astype(q.dtype)).reshape(b, lq, hkv, h // hkv, dh)
    k, v = k.astype(cache_k.dtype), v.astype(cache_v.dtype)
    scores = jnp.concatenate([
        jnp.einsum("bqhgd,bkhd->bhgqk", qg, cache_k, preferred_element_type=jnp.float32),
        jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)], axis=-1)
    allowed = jnp.ones((1, 1, 1, lq, slots + lq), bool)
    if key_mask is not None:
        allowed = allowed & jnp.concatenate([jnp.ones((b, slots), bool), key_mask], axis=1)[:, None, None, None, :]
    if dense_mask is not None:
        allowed = allowed & dense_mask[:, None, None]
    if not isinstance(mask, Full):
        raise ValueError(f"a cached attention call takes its structure from dense_mask; mask={mask!r}")
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = (jnp.einsum("bhgqk,bkhd->bqhgd", probs[..., :slots], cache_v, preferred_element_type=jnp.float32)
           + jnp.einsum("bhgqk,bkhd->bqhgd", probs[..., slots:], v, preferred_element_type=jnp.float32))
    return out.reshape(b, lq, h, dh).astype(q.dtype), (k, v)
