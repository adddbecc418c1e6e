"""Block-diffusion sampling (BD3-LM, ALGORITHMS.md §4.4) with an exact KV cache, as nested while loops (§4.10).

Slot layout per row, shared by both samplers here:

    [left padding | prompt | block 0 | block 1 | ... | block n-1]
    `-------- Lpad --------'`------------- G = n * L' ---------'

The prompt is left-padded to `Lpad`, a multiple of the block length `L'`, so that the prompt ends on a block
boundary and its blocks are the ones BD3 training sees (block-causal), whatever the row's prompt length.
Rotary positions count real slots only (`cumsum(key_mask) - 1`), so a row's positions do not depend on how
much padding its batch needs.

`generate_blocks` (cached):
  prefill: one forward of the padded prompt, block-causal over its blocks, writes its K/V into the cache;
  outer `lax.while_loop` over blocks, while some row is not done:
    inner `lax.while_loop` over the block's `S` steps: one DENOISE forward of the `[B, L']` block against the
      cache (bidirectional inside the block: BD3's M_OBC | M_BD), then the masked sampler's update;
    COMMIT: one forward of the finished clean block that writes its K/V (bidirectional inside the block and
      the cache before it: M_BC). Skipped after the last block and once every row is done.
`generate_blocks_uncached` (the slow twin): every step runs the whole canvas `[B, Lpad + G]` under the
block-causal mask, which is BD3's mask restricted to what exists: the noisy block sees the clean prefix and
itself, clean blocks see clean blocks up to their own, and no query that is read sees a later block. The
canvas is the full length (not the growing prefix) because a while loop needs static shapes; the extra
slots are hidden by the mask.

Per step (shared by both, so they differ only in where the logits come from):
    [MASK] logit -> -inf -> filter_logits (top-k, top-p) -> propose -> confidence -> restrict_to_block
    -> select_commits -> commit -> where(done, old, new)

NFE counts forward passes actually run: cached = 1 prefill (if the prompt is not empty) + denoising steps
+ commit passes; uncached = denoising steps. Both run `S` steps on every block they visit.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dlmjax.config import ModelConfig
from dlmjax.models.attention import BlockCausalMask
from dlmjax.models.transformer import Transformer, init_cache
from dlmjax.sampling.generate import commit, confidence, propose, restrict_to_block, select_commits, step_keys
from dlmjax.sampling.schedule import transfer_counts
from dlmjax.sampling.settings import BlockSamplerSettings


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


def block_step(
    logits: jax.Array,
    canvas: jax.Array,
    *,
    settings: BlockSamplerSettings,
    k: jax.Array,
    gumbel_key: jax.Array,
    confidence_key: jax.Array,
) -> jax.Array:
    """One update of the current block from its logits; returns the new block int32[B, L'].

    Args:
      logits: float32[B, L', V], the denoiser's logits for the block's slots.
      canvas: int32[B, L'], the block (clean tokens and `mask_id`).
      k: int32[B], commits for this step (a column of the block's transfer table).
    """
    if settings.mask_id < logits.shape[-1]:
        # SUBS: [MASK] is a state, not a prediction; a proposed mask would leave the slot unfinished.
        logits = logits.at[..., settings.mask_id].set(-jnp.inf)
    logits = filter_logits(logits, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    proposal = propose(logits, settings.temperature, gumbel_key)
    scores = confidence(logits, proposal, settings.remasking, confidence_key)
    scores = restrict_to_block(scores, canvas, mask_id=settings.mask_id, block_start=jnp.int32(0),
                               block_length=canvas.shape[1])
    return commit(canvas, proposal, select_commits(scores, k))


def _sample_blocks(settings: BlockSamplerSettings, batch: int, rng, model_state, block_logits, commit_block):
    """The outer loop over blocks and the inner loop over steps, shared by the cached and uncached samplers.

    Args:
      model_state: what the sampler carries for its model (the KV cache, or the full canvas).
      block_logits: `(model_state, block int32[B, L'], b) -> float32[B, L', V]`, one forward pass.
      commit_block: `(model_state, block, b, skip bool scalar) -> (model_state, nfe int32)`.

    Returns:
      (gen int32[B, G], nfe int32 scalar of the forward passes run here).
    """
    s = settings
    stops = s.eos_id is not None
    fill = s.pad_id if stops else s.mask_id  # blocks never reached only exist once every row is done

    def block_cond(carry):
        b, _, _, done, _, _ = carry
        return (b < s.num_blocks) & ~jnp.all(done)

    def block_body(carry):
        b, gen, model_state, done, rng, nfe = carry
        block = jnp.where(done[:, None], jnp.int32(fill), jnp.full((batch, s.block_length), s.mask_id, jnp.int32))
        n_masked = jnp.sum(block == s.mask_id, axis=1, dtype=jnp.int32)
        table = transfer_counts(n_masked, s.steps_per_block)  # [B, S], fixed for the whole block

        def step_body(carry):
            step, block, rng = carry
            rng, gumbel_key, confidence_key = step_keys(rng)
            logits = block_logits(model_state, block, b)
            new = block_step(logits, block, settings=s, k=table[:, step], gumbel_key=gumbel_key,
                             confidence_key=confidence_key)
            return step + 1, jnp.where(done[:, None], block, new), rng  # done rows stay frozen

        _, block, rng = jax.lax.while_loop(
            lambda carry: carry[0] < s.steps_per_block, step_body, (jnp.int32(0), block, rng))
        gen = jax.lax.dynamic_update_slice(gen, block, (jnp.int32(0), b * s.block_length))
        if stops:
            done = done | jnp.any(block == s.eos_id, axis=1)
        # The last block, and any block after which every row is done, is never read again.
        skip = (b == s.num_blocks - 1) | jnp.all(done)
        model_state, commit_nfe = commit_block(model_state, block, b, skip)
        return b + 1, gen, model_state, done, rng, nfe + s.steps_per_block + commit_nfe

    gen = jnp.full((batch, s.gen_length), fill, jnp.int32)
    done = jnp.zeros((batch,), bool)
    carry = (jnp.int32(0), gen, model_state, done, rng, jnp.int32(0))
    _, gen, _, _, _, nfe = jax.lax.while_loop(block_cond, block_body, carry)
    return gen, nfe


def _layout(config: ModelConfig, prompt, prompt_mask, settings: BlockSamplerSettings):
    """Validates the request and builds the padded slot layout.

    Returns:
      prompt int32[B, Lp], padded prompt int32[B, Lpad], key_mask bool[B, Lpad + G] (False on padding),
      positions int32[B, Lpad + G] (rotary positions: real slots counted from 0).
    """
    if not isinstance(settings, BlockSamplerSettings):
        raise TypeError(f"settings must be a BlockSamplerSettings, got {type(settings).__name__}")
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be int[batch, prompt_length], got {prompt.dtype}{list(prompt.shape)}")
    batch, prompt_length = prompt.shape
    s = settings
    for name in ("mask_id", "eos_id", "pad_id"):
        value = getattr(s, name)
        if value is not None and value >= config.vocab_size:
            raise ValueError(f"BlockSamplerSettings.{name}={value} is not a token of the model "
                             f"(vocab_size={config.vocab_size}); use an id in [0, {config.vocab_size})")
    if prompt_length + s.gen_length > config.max_seq_len:
        raise ValueError(
            f"prompt length {prompt_length} + gen_length {s.gen_length} = {prompt_length + s.gen_length} exceeds "
            f"the model context model.max_seq_len={config.max_seq_len}; shorten the prompt or gen_length")
    if prompt_mask is None:
        prompt_mask = jnp.ones((batch, prompt_length), bool)
    elif jnp.shape(prompt_mask) != prompt.shape:
        raise ValueError(f"prompt_mask must have the prompt's shape {list(prompt.shape)}, "
                         f"got {list(jnp.shape(prompt_mask))}")
    pad = -prompt_length % s.block_length
    padded = jnp.pad(prompt.astype(jnp.int32), ((0, 0), (pad, 0)))  # any valid id: padding keys are masked
    key_mask = jnp.concatenate([jnp.zeros((batch, pad), bool), jnp.asarray(prompt_mask, bool),
                                jnp.ones((batch, s.gen_length), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(key_mask, axis=1, dtype=jnp.int32) - 1, 0)
    return prompt.astype(jnp.int32), padded, key_mask, positions


def _cache_length(settings: BlockSamplerSettings, padded_length: int) -> int:
    """Cache slots the run needs (the last block is never committed); raises if `cache_length` is smaller."""
    needed = padded_length + settings.gen_length - settings.block_length
    if settings.cache_length is None:
        return max(needed, 1)
    if settings.cache_length < needed:
        raise ValueError(
            f"the KV cache would overflow: BlockSamplerSettings.cache_length={settings.cache_length} < {needed} "
            f"slots needed (prompt padded to a multiple of block_length {settings.block_length} = {padded_length}, "
            f"+ gen_length {settings.gen_length} - the last block {settings.block_length}); raise cache_length "
            f"or set it to None")
    return settings.cache_length


@functools.partial(jax.jit, static_argnames=("config", "settings"))
def generate_blocks(
    config: ModelConfig,
    params: Any,
    prompt: jax.Array,
    settings: BlockSamplerSettings,
    rng: jax.Array,
    *,
    prompt_mask: jax.Array | None = None,
):
    """Block-diffusion sampling with a KV cache of the prompt and the committed blocks.

    Compiled once per (config, settings, prompt shape, prompt_mask given or not); params, prompt values and
    rng are traced.

    Args:
      config: static model config (a `Transformer` with these weights).
      params: the Transformer's parameter pytree.
      prompt: int[B, Lp]; rows shorter than `Lp` are left-padded, with `prompt_mask` False on the padding.
      settings: static `BlockSamplerSettings`.
      rng: PRNG key; consumed when `temperature > 0` or `remasking == "random"`.
      prompt_mask: bool[B, Lp], True on real prompt tokens; default all True.

    Returns:
      tokens: int32[B, Lp + G], the prompt then the generated slots (`pad_id` after a row is done).
      nfe: int32 scalar, forward passes run: 1 prefill (if Lp > 0) + S per block run + commit passes.
    """
    prompt, padded, key_mask, positions = _layout(config, prompt, prompt_mask, settings)
    batch, padded_length = padded.shape
    length = settings.block_length
    model = Transformer(config)
    cache = init_cache(config, batch, _cache_length(settings, padded_length))
    nfe = jnp.int32(0)
    if padded_length:
        # Block-causal inside the prompt: exactly what BD3 training's clean half sees (M_BC).
        prompt_blocks = BlockCausalMask(length).dense(padded_length, padded_length)[None]
        _, cache = model.apply({"params": params}, padded, positions=positions[:, :padded_length],
                               key_mask=key_mask[:, :padded_length], dense_mask=prompt_blocks,
                               cache=cache, update_cache=True)
        nfe += 1

    def block_positions(b):
        return jax.lax.dynamic_slice_in_dim(positions, padded_length + b * length, length, axis=1)

    def block_logits(cache, block, b):
        logits, _ = model.apply({"params": params}, block, positions=block_positions(b), cache=cache)
        return logits

    def commit_block(cache, block, b, skip):
        if settings.num_blocks == 1:
            return cache, jnp.int32(0)  # nothing is ever committed; the cache may be smaller than the block

        def write(cache):
            _, cache = model.apply({"params": params}, block, positions=block_positions(b), cache=cache,
                                   update_cache=True)
            return cache

        cache = jax.lax.cond(skip, lambda cache: cache, write, cache)
        return cache, jnp.where(skip, 0, 1).astype(jnp.int32)

    gen, steps_nfe = _sample_blocks(settings, batch, rng, cache, block_logits, commit_block)
    return jnp.concatenate([prompt, gen], axis=1), nfe + steps_nfe


@functools.partial(jax.jit, static_argnames=("config", "settings"))
def generate_blocks_uncached(
    config: ModelConfig,
    params: Any,
    prompt: jax.Array,
    settings: BlockSamplerSettings,
    rng: jax.Array,
    *,
    prompt_mask: jax.Array | None = None,
):
    """The slow twin of `generate_blocks`: no cache, the whole canvas recomputed at every step.

    Same arguments and the same tokens for the same rng. Returns (tokens int32[B, Lp + G], nfe int32) with
    nfe = S per block run (no prefill or commit passes).
    """
    prompt, padded, key_mask, positions = _layout(config, prompt, prompt_mask, settings)
    batch, padded_length = padded.shape
    length = settings.block_length
    model = Transformer(config, BlockCausalMask(length))
    canvas = jnp.concatenate([padded, jnp.full((batch, settings.gen_length), settings.mask_id, jnp.int32)], 1)

    def place(canvas, block, b):
        return jax.lax.dynamic_update_slice(canvas, block, (jnp.int32(0), padded_length + b * length))

    def block_logits(canvas, block, b):
        logits = model.apply({"params": params}, place(canvas, block, b), positions=positions, key_mask=key_mask)
        return jax.lax.dynamic_slice_in_dim(logits, padded_length + b * length, length, axis=1)

    def commit_block(canvas, block, b, skip):
        return place(canvas, block, b), jnp.int32(0)

    gen, nfe = _sample_blocks(settings, batch, rng, canvas, block_logits, commit_block)
    return jnp.concatenate([prompt, gen], axis=1), nfe
