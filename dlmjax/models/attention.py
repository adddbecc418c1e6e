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

from kernels_pallas.masks import Full, Mask
from kernels_pallas.ranges import slot_mask


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


def attend_with_cache(q, k, v, *, mask, key_mask, dense_mask, impl, cache_k=None, cache_v=None, cache_mask=None,
                      cache_ranges=None, segment_ids=None):
    """Attention of a chunk, optionally after a KV cache; shared by every block that supports a cache.

    Without `cache_k/v` it is `attention(q, k, v, ...)` and returns `(out, None)`. With them ([B, S, Hkv, Dh]) the
    keys are `[the visible cache slots ; this chunk]` and it returns `(out, (k, v))`, the chunk's K/V for the caller
    to write back. Then:
      key_mask: bool[B, n], the chunk's padding keys (None: all real); dense_mask: bool[B or 1, n, n], the
        structure inside the chunk (None: bidirectional).
      cache_mask: bool[B, S], slots holding a real key (the cache's `key_mask`).
      cache_ranges: int32[B, R, 2] or None, the half-open slot ranges each row sees (`kernels_pallas.ranges`).
    A cache slot is visible iff `cache_mask` and (if given) a range say so.

    With `impl` a kernel, `cache_ranges` given and no `dense_mask`, the ranges alone describe the cache (they must
    cover real keys only) and `kernels_pallas.cached_attention` reads only the tiles they touch; R = 0 reads no
    cache at all (the chunk's own attention, `attention`). Any other call takes the dense path below: the cache is
    never copied, scores against the cache and against the chunk are computed separately and share one softmax
    (concatenating K/V would copy the whole cache in every layer of every sampling step).
    """
    if cache_k is None:
        return attention(q, k, v, mask=mask, key_mask=key_mask, dense_mask=dense_mask, segment_ids=segment_ids,
                         impl=impl), None
    if segment_ids is not None:
        raise ValueError("segment_ids (packed training rows) cannot be combined with a KV cache")
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl={impl!r} is not available; choose one of {ATTENTION_IMPLS}")
    if not isinstance(mask, Full):
        raise ValueError(f"a cached attention call takes its structure from dense_mask; mask={mask!r}")
    k, v = k.astype(cache_k.dtype), v.astype(cache_v.dtype)
    if impl != "xla" and cache_ranges is not None:
        if cache_ranges.shape[1] == 0:  # no cache slot is seen: the chunk's own attention (a first, writing pass)
            return attention(q, k, v, key_mask=key_mask, dense_mask=dense_mask, impl=impl), (k, v)
        if dense_mask is None:
            import kernels_pallas  # noqa: PLC0415

            interpret = impl == "pallas_interpret"
            out = kernels_pallas.cached_attention(q, cache_k, cache_v, k, v, cache_ranges, block_key_mask=key_mask,
                                                  impl="triton" if interpret else "auto", interpret=interpret or None)
            return out, (k, v)
    b, lq, h, dh = q.shape
    slots, hkv = cache_k.shape[1], cache_k.shape[2]
    qg = (q * (1.0 / np.sqrt(dh)).astype(q.dtype)).reshape(b, lq, hkv, h // hkv, dh)
    scores_cache = jnp.einsum("bqhgd,bkhd->bhgqk", qg, cache_k, preferred_element_type=jnp.float32)
    scores_chunk = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    seen = jnp.ones((b, slots), bool) if cache_mask is None else cache_mask.astype(bool)
    if cache_ranges is not None:
        seen = seen & slot_mask(cache_ranges, slots)
    allowed = jnp.ones((1, lq, lq), bool) if dense_mask is None else dense_mask
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :]
    # where(), never a -inf bias: a hidden slot may hold anything, NaN included.
    low = jnp.finfo(jnp.float32).min
    scores = jnp.concatenate([jnp.where(seen[:, None, None, None, :], scores_cache, low),
                              jnp.where(allowed[:, None, None], scores_chunk, low)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # A hidden slot's probability is 0, but 0 * NaN = NaN: its value is zeroed too.
    cache_v = jnp.where(seen[:, :, None, None], cache_v, 0)
    out = (jnp.einsum("bhgqk,bkhd->bqhgd", probs[..., :slots], cache_v, preferred_element_type=jnp.float32)
           + jnp.einsum("bhgqk,bkhd->bqhgd", probs[..., slots:], v, preferred_element_type=jnp.float32))
    return out.reshape(b, lq, h, dh).astype(q.dtype), (k, v)
