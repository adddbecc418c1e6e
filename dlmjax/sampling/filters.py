"""Proposal filters shared by the samplers: top-k and nucleus (top-p)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits: jax.Array, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Top-k then nucleus filtering: logits float[..., V] with -inf outside the kept set.

    The kept set is computed on `softmax(logits / T)` (the distribution `propose` samples from; `T = 0`
    ranks by the raw logits) and always holds the most likely token, so greedy decoding is unchanged.
    Nucleus keeps token `j` of the descending order when the mass strictly before it is `< top_p`: the
    smallest prefix whose mass reaches `top_p` (HF/Dream convention; BD3's `_nucleus_sample` drops the
    crossing token). Ties are broken by the lower token id (stable sort), so exactly `top_k` survive.
    """
    if top_k == 0 and top_p >= 1.0:
        return logits
    vocab = logits.shape[-1]
    scaled = logits / temperature if temperature > 0 else logits
    order = jnp.argsort(-scaled, axis=-1, stable=True)
    keep_sorted = jnp.ones(logits.shape, bool)
    if top_k:
        keep_sorted = keep_sorted & (jnp.arange(vocab) < top_k)
    if top_p < 1.0:
        sorted_scaled = jnp.where(keep_sorted, jnp.take_along_axis(scaled, order, axis=-1), -jnp.inf)
        probs = jax.nn.softmax(sorted_scaled.astype(jnp.float32), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = keep_sorted & (mass_before < top_p)
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, -jnp.inf)
