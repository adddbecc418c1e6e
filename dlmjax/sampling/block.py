"""Block-diffusion sampling (BD3-LM, ALGORITHMS.md §4.4) with an exact KV cache, as nested while loops (§4.10).

Slot layout per row, shared by both samplers here (T = `max_length`, L' = `block_length`):

    [prompt | generated slots ... ]        T slots, rotary positions 0..T-1
    [block 0 | block 1 | ... | block T/L' - 1]

Blocks are counted from each row's first token, the grid BD3 training uses: a prompt that ends inside a
block shares it with the first generated slots, which are denoised with the prompt's tail as clean
context, exactly as that block was trained. Rows of a batch may have prompts of different lengths: the
caller passes them left-padded with a `prompt_mask`, and each row is moved to the left of its canvas, so the
blocks of all rows sit on the same slots and no key is padding. A row with a shorter prompt simply has more
slots to generate; blocks that the prompt fills take no denoising steps.

`generate_blocks` (cached):
  PREFILL: one forward of the prompt's full blocks (of the longest prompt), block-causal, writes their K/V.
    The cache is then rewound to the first block that some row still has to generate (shorter rows hold
    [MASK] in the prefilled slots beyond their prompt; those entries are rewritten before anything reads them).
  outer `lax.while_loop` over blocks from there, while some row is not done:
    inner `lax.while_loop`, at most `S` steps while a masked slot remains: one DENOISE forward of the
      `[B, L']` block against the cache (bidirectional inside the block: BD3's M_OBC | M_BD), then the masked
      sampler's update;
    COMMIT: one forward of the finished clean block that writes its K/V (bidirectional inside the block and
      the cache before it: M_BC). Skipped after the last block and once every row is done.
  With a single block (`block_length == max_length`, MDLM) there is nothing to cache and it runs the twin.
`generate_blocks_uncached` (the slow twin): every step runs the whole canvas `[B, T]` under the
block-causal mask, which is BD3's mask restricted to what exists: the noisy block sees the clean prefix and
itself, and no query that is read sees a later block. The canvas is the full length (not the growing
prefix) because a while loop needs static shapes; the later slots are hidden by the mask.

Per step (shared by both, so they differ only in where the logits come from):
    [MASK] logit -> -inf -> filter_logits (top-k, top-p) -> propose -> confidence -> restrict_to_block
    -> select_commits -> commit -> where(done, old, new)

NFE counts forward passes actually run: cached = 1 prefill (if the prompt has a full block) + denoising
steps + commit passes; uncached = denoising steps. The steps are the same on both sides.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dlmjax.config import ModelConfig
from dlmjax.models.attention import BlockCausalMask
from dlmjax.models.transformer import build_model, init_cache
from dlmjax.sampling.filters import filter_logits
from dlmjax.sampling.generate import check_request, commit, confidence, propose, restrict_to_block, select_commits, step_keys
from dlmjax.sampling.schedule import transfer_counts
from dlmjax.sampling.settings import BlockSamplerSettings


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


def _sample_blocks(settings: BlockSamplerSettings, canvas, first_block, rng, model_state, block_logits,
                   commit_block):
    """The outer loop over blocks and the inner loop over steps, shared by the cached and uncached samplers.

    Args:
      canvas: int32[B, T], prompts left-aligned, `mask_id` in every slot to generate.
      first_block: int32 scalar, the first block holding a masked slot in some row.
      model_state: what the sampler carries for its model besides the canvas (the KV cache; () if nothing).
      block_logits: `(model_state, canvas, block int32[B, L'], b) -> float32[B, L', V]`, one forward pass.
      commit_block: `(model_state, block, b, skip bool scalar) -> (model_state, nfe int32)`.

    Returns:
      (canvas int32[B, T] with every slot filled, nfe int32 scalar of the forward passes run here).
    """
    s = settings
    batch = canvas.shape[0]
    stops = s.eos_id is not None

    def block_cond(carry):
        b, _, _, done, _, _ = carry
        return (b < s.num_blocks) & ~jnp.all(done)

    def block_body(carry):
        b, canvas, model_state, done, rng, nfe = carry
        block = jax.lax.dynamic_slice_in_dim(canvas, b * s.block_length, s.block_length, axis=1)
        generated = block == s.mask_id  # the slots this block generates (prompt slots are clean)
        n_masked = jnp.sum(generated & ~done[:, None], axis=1, dtype=jnp.int32)
        table = transfer_counts(n_masked, s.steps_per_block)  # [B, S], fixed for the whole block

        def step_cond(carry):
            step, block, _ = carry
            return (step < s.steps_per_block) & jnp.any((block == s.mask_id) & ~done[:, None])

        def step_body(carry):
            step, block, rng = carry
            rng, gumbel_key, confidence_key = step_keys(rng)
            logits = block_logits(model_state, canvas, block, b)
            new = block_step(logits, block, settings=s, k=table[:, step], gumbel_key=gumbel_key,
                             confidence_key=confidence_key)
            return step + 1, jnp.where(done[:, None], block, new), rng  # done rows stay frozen

        steps, block, rng = jax.lax.while_loop(step_cond, step_body, (jnp.int32(0), block, rng))
        if stops:
            block = jnp.where(done[:, None] & generated, jnp.int32(s.pad_id), block)
            done = done | jnp.any(generated & (block == s.eos_id), axis=1)
        canvas = jax.lax.dynamic_update_slice(canvas, block, (jnp.int32(0), b * s.block_length))
        # The last block, and any block after which every row is done, is never read again.
        skip = (b == s.num_blocks - 1) | jnp.all(done)
        model_state, commit_nfe = commit_block(model_state, block, b, skip)
        return b + 1, canvas, model_state, done, rng, nfe + steps + commit_nfe

    done = jnp.zeros((batch,), bool)
    carry = (first_block, canvas, model_state, done, rng, jnp.int32(0))
    _, canvas, _, done, _, nfe = jax.lax.while_loop(block_cond, block_body, carry)
    if stops:  # blocks after every row stopped were never visited
        canvas = jnp.where(canvas == s.mask_id, jnp.int32(s.pad_id), canvas)
    return canvas, nfe


def _layout(config: ModelConfig, prompt, prompt_mask, settings: BlockSamplerSettings):
    """Validates the request and builds the canvas.

    Returns:
      canvas int32[B, T]: each row's prompt moved to its left end (order kept), `mask_id` after it;
      first_block int32 scalar: the block holding the shortest prompt's end.
    """
    prompt = check_request(prompt, settings, BlockSamplerSettings)
    batch, width = prompt.shape
    s = settings
    for name in ("mask_id", "eos_id", "pad_id"):
        value = getattr(s, name)
        if value is not None and value >= config.vocab_size:
            raise ValueError(f"BlockSamplerSettings.{name}={value} is not a token of the model "
                             f"(vocab_size={config.vocab_size}); use an id in [0, {config.vocab_size})")
    if s.max_length > config.max_seq_len:
        raise ValueError(f"BlockSamplerSettings.max_length={s.max_length} exceeds the model context "
                         f"model.max_seq_len={config.max_seq_len}; use a max_length <= {config.max_seq_len}")
    if width >= s.max_length:
        raise ValueError(f"the prompt ({width} tokens) leaves nothing to generate within "
                         f"BlockSamplerSettings.max_length={s.max_length}; shorten the prompt or raise max_length")
    if prompt_mask is None:
        prompt_mask = jnp.ones((batch, width), bool)
    elif jnp.shape(prompt_mask) != prompt.shape:
        raise ValueError(f"prompt_mask must have the prompt's shape {list(prompt.shape)}, "
                         f"got {list(jnp.shape(prompt_mask))}")
    prompt_mask = jnp.asarray(prompt_mask, bool)
    # Real tokens first, in order (a stable sort of the padding flag): left or right padding alike.
    order = jnp.argsort(~prompt_mask, axis=1, stable=True)
    lengths = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)
    moved = jnp.take_along_axis(prompt.astype(jnp.int32), order, axis=1)
    moved = jnp.where(jnp.arange(width) < lengths[:, None], moved, jnp.int32(s.mask_id))
    canvas = jnp.concatenate([moved, jnp.full((batch, s.max_length - width), s.mask_id, jnp.int32)], axis=1)
    first_block = (jnp.min(lengths) // s.block_length).astype(jnp.int32)
    return canvas, first_block


def _cache_length(settings: BlockSamplerSettings) -> int:
    """Cache slots the run needs (the last block is never committed); raises if `cache_length` is smaller."""
    needed = settings.max_length - settings.block_length
    if settings.cache_length is None:
        return needed
    if settings.cache_length < needed:
        raise ValueError(
            f"the KV cache would overflow: BlockSamplerSettings.cache_length={settings.cache_length} < {needed} "
            f"slots needed (max_length {settings.max_length} - the last block {settings.block_length}, which is "
            f"never committed); raise cache_length or set it to None")
    return settings.cache_length


def _positions(batch: int, start, length: int):
    return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))


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

    Compiled once per (config, settings, prompt shape, prompt_mask given or not); params, prompt values, the
    prompt mask and rng are traced.

    Args:
      config: static model config (the network `build_model(config)` with these weights).
      params: its parameter pytree.
      prompt: int[B, W]; rows shorter than `W` are padded (left or right), with `prompt_mask` False there.
      settings: static `BlockSamplerSettings`.
      rng: PRNG key; consumed when `temperature > 0` or `remasking == "random"`.
      prompt_mask: bool[B, W], True on real prompt tokens; default all True.

    Returns:
      tokens: int32[B, T]: row i is its prompt (`n_i` tokens, padding removed) followed by its `T - n_i`
        generated slots (`pad_id` after the block in which the row emitted `eos_id`).
      nfe: int32 scalar, forward passes run: 1 prefill (if W >= L') + denoising steps + commit passes.
    """
    if settings.num_blocks == 1:
        # One block (MDLM): nothing is ever cached, so the plain forward over the row is the same program
        # with less work (no empty cache segment in every attention call).
        return generate_blocks_uncached(config, params, prompt, settings, rng, prompt_mask=prompt_mask)
    canvas, first_block = _layout(config, prompt, prompt_mask, settings)
    batch = canvas.shape[0]
    length = settings.block_length
    model = build_model(config)
    cache = init_cache(config, batch, _cache_length(settings))
    nfe = jnp.int32(0)
    prefill = prompt.shape[1] // length * length  # the longest prompt's full blocks
    if prefill:
        # Block-causal inside the prompt: exactly what BD3 training's clean half sees (M_BC).
        prompt_blocks = BlockCausalMask(length).dense(prefill, prefill)[None]
        _, cache = model.apply({"params": params}, canvas[:, :prefill], positions=_positions(batch, 0, prefill),
                               dense_mask=prompt_blocks, cache=cache, update_cache=True)
        nfe += 1
        # Rewind to the first block some row generates: later entries are rewritten by its commits.
        index = first_block * length
        cache = dict(cache, index=index,
                     key_mask=jnp.broadcast_to(jnp.arange(cache["key_mask"].shape[1]) < index, cache["key_mask"].shape))

    def block_logits(cache, canvas, block, b):
        del canvas  # the cache holds everything before the block
        logits, _ = model.apply({"params": params}, block, positions=_positions(batch, b * length, length),
                                cache=cache)
        return logits

    def commit_block(cache, block, b, skip):
        def write(cache):
            _, cache = model.apply({"params": params}, block, positions=_positions(batch, b * length, length),
                                   cache=cache, update_cache=True)
            return cache

        cache = jax.lax.cond(skip, lambda cache: cache, write, cache)
        return cache, jnp.where(skip, 0, 1).astype(jnp.int32)

    tokens, steps_nfe = _sample_blocks(settings, canvas, first_block, rng, cache, block_logits, commit_block)
    return tokens, nfe + steps_nfe


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

    Same arguments and the same tokens for the same rng. Returns (tokens int32[B, T], nfe int32) with
    nfe = the denoising steps (no prefill or commit passes).
    """
    canvas, first_block = _layout(config, prompt, prompt_mask, settings)
    length = settings.block_length
    model = build_model(config, BlockCausalMask(length))

    def place(canvas, block, b):
        return jax.lax.dynamic_update_slice(canvas, block, (jnp.int32(0), b * length))

    def block_logits(state, canvas, block, b):
        logits = model.apply({"params": params}, place(canvas, block, b))
        return jax.lax.dynamic_slice_in_dim(logits, b * length, length, axis=1)

    def commit_block(state, block, b, skip):
        return state, jnp.int32(0)  # the finished block is in the canvas, which every step reads whole

    return _sample_blocks(settings, canvas, first_block, rng, (), block_logits, commit_block)

