"""Block-diffusion sampling (BD3-LM) with an exact KV cache, as nested while loops: `generate_blocks`.

Slot layout per row, shared by both samplers here (T = `max_length`, L' = `block_length`):

    [prompt | generated slots ... ]        T slots, rotary positions 0..T-1
    [block 0 | block 1 | ... | block T/L' - 1]

Blocks are counted from each row's first token, the grid BD3 training uses: a prompt that ends inside a block
shares it with the first generated slots, which are denoised with the prompt's tail as clean context, exactly as
that block was trained. The request is the masked sampler's (prompts left-padded, with a `prompt_mask`; right
padding works too): each row is moved to the left of its canvas, so the blocks of all rows sit on the same slots
and no key is padding. A row with a shorter prompt has more slots to generate; blocks that its prompt fills take
no denoising steps.

`generate_blocks` (cached):
  PREFILL: one forward of the prompt width's full blocks, block-causal, writes their K/V (skipped when no row
    has a full block). The cache is then rewound to the first block that some row still has to generate
    (shorter rows hold [MASK] in the prefilled slots beyond their prompt; those entries are rewritten before
    anything reads them).
  outer `lax.while_loop` over blocks from there, while some row is not done:
    inner `lax.while_loop`, while the commit rule says so: one DENOISE forward of the `[B, L']` block against the
      cache (bidirectional inside the block: what BD3 training's noisy block sees), then the step's update;
    COMMIT: one forward of the finished clean block that writes its K/V (bidirectional inside the block, and the
      cache before it). Skipped after the last block and once every row is done.
  `fuse_commits=True` runs the same loop without the COMMIT forward: the first pass of every later block is one
    FUSED forward of `[finished block, clean ; this block as it starts]` (`[B, 2L']`) against the cache before
    the finished block, under the block-causal mask over the two blocks (`BlockCausal(L')`): the finished block's
    queries see the cache and themselves (exactly the COMMIT pass; never the masked block after them), this
    block's queries see the cache, the finished block and themselves (exactly its first DENOISE step after
    COMMIT). Its K/V of the finished block go to the cache, its logits of this block feed the first step's
    update. The pass also writes this block's masked K/V into the slots after the finished block; the index is
    rewound over them (and their `key_mask` cleared), so the cache holds one scratch block more than the
    committed slots need. A later block whose rows need no step (their prompts fill it, or they are done) still
    runs the fused pass, for its commit, and ignores its logits.
  With a single block (`block_length == max_length`, MDLM) there is nothing to cache and it runs the twin.
  DENOISE and COMMIT see the cache as one slot range per row, [0, index): with `model.attention_impl=pallas` the
  cache kernel reads only those tiles (`kernels_pallas.cached_attention`). The FUSED pass carries a dense mask
  inside its chunk, so it takes the dense attention path whatever `attention_impl` says (one pass per block).
`generate_blocks_uncached` (the slow twin): every step runs the whole canvas `[B, T]` under the block-causal mask,
which is BD3's mask restricted to what exists: the noisy block sees the clean prefix and itself, and no query
that is read sees a later block. The canvas is the full length (not the growing prefix) because a while loop
needs static shapes; the later slots are hidden by the mask.

A step (shared by both, so they differ only in where the logits come from): [MASK] logit -> -inf ->
`settings.proposal` -> scores of slots that are not masked = -inf -> `settings.rule` -> commit -> done rows kept.

NFE counts forward passes actually run (the steps are the same in every variant):
  cached              P + steps + (V - 1)
  cached, fused       P + steps + Z          = cached - (V - 1 - Z)
  uncached            steps
with P = 1 if some prompt has a full block (the prefill) else 0, V the blocks visited (from the first block some
row generates, until the last block or every row is done) and Z the visited blocks after the first that took no
step. Without EOS every visited block takes a step (the row with the shortest prompt generates in all of them),
so Z = 0 and the fused sampler costs one forward per step: autoregressive decoding (`block_length=1`) then costs
exactly one forward per generated slot of that row, `P + max_length - min(prompt lengths)`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from dlmjax.errors import SettingsError
from kernels_pallas.masks import BlockCausal
from dlmjax.sampling import stream
from dlmjax.sampling.denoiser import Denoiser
from dlmjax.sampling.layout import check_request, mask_like
from dlmjax.sampling.proposals import step_keys
from dlmjax.sampling.settings import BlockSamplerSettings


@flax.struct.dataclass
class BlocksCarry:
    """The outer loop's state."""

    block: jax.Array  # int32: index of the block being generated
    canvas: jax.Array  # int32[B, T]
    model_state: Any  # what the model side carries besides the canvas: the KV cache (None: nothing)
    done: jax.Array  # bool[B]: rows that generated EOS in a finished block, frozen since
    rng: jax.Array
    nfe: jax.Array  # int32: forward passes run in the loops
    committed: Any  # int32[B, T]: the forward pass that committed each slot, -1 if none (trace), else None


@flax.struct.dataclass
class DenoiseCarry:
    """The inner loop's state: one block's denoising steps."""

    step: jax.Array  # int32
    block: jax.Array  # int32[B, L']: the block's tokens
    rng: jax.Array
    rule: Any  # the commit rule's state
    committed: Any  # int32[B, L']: the forward pass that committed each slot, -1 if none (trace), else None


def block_update(logits: jax.Array, block: jax.Array, settings: BlockSamplerSettings, rule_state, step,
                 gumbel_key, confidence_key):
    """One update of the current block from its logits: (new block int32[B, L'], new rule state).

    Args:
      logits: float32[B, L', V], the denoiser's logits for the block's slots.
      block: int32[B, L'], the block (clean tokens and the mask id).
    """
    mask_id = settings.tokens.mask_id
    if mask_id < logits.shape[-1]:
        # [MASK] is a state, not a prediction: a proposed mask would leave the slot unfinished.
        logits = logits.at[..., mask_id].set(-jnp.inf)
    proposal, scores = settings.proposal(logits, settings.tokens, gumbel_key, confidence_key)
    scores = jnp.where(block == mask_id, scores, -jnp.inf)
    commits, rule_state = settings.rule.commits(scores, rule_state, step, confidence_key, settings.steps_per_block)
    return jnp.where(commits, proposal, block), rule_state


def _sample_blocks(settings: BlockSamplerSettings, canvas, first_block, rng, model_state, nfe,
                   block_logits: Callable, commit_block: Callable, observe: bool = False, trace: bool = False,
                   fused_logits: Callable | None = None):
    """The outer loop over blocks and the inner loop over steps, shared by the cached and uncached samplers.

    Args:
      canvas: int32[B, T], prompts left-aligned, the mask id in every slot to generate.
      first_block: int32 scalar, the first block holding a masked slot in some row.
      model_state: what the sampler carries for its model besides the canvas (the KV cache; None if nothing).
      block_logits: `(model_state, canvas, block int32[B, L'], b) -> float32[B, L', V]`, one forward pass.
      commit_block: `(model_state, block, b, skip bool scalar) -> (model_state, nfe int32)`.
      fused_logits: None, or `(model_state, canvas, block int32[B, L'], b) -> (float32[B, L', V], model_state)`:
        one forward pass that commits block b - 1 (finished, in `canvas`) and gives block b's logits. When given,
        it is the first pass of every block after `first_block` (commit_block should then write nothing).

    Returns:
      (canvas int32[B, T] with every slot filled, nfe int32 scalar: `nfe` + the forward passes run here).
    """
    s, rule = settings, settings.rule
    mask_id, length = s.tokens.mask_id, s.block_length
    stops = s.tokens.eos_id is not None
    steps = s.steps_per_block
    max_steps = rule.max_steps(steps, length)

    def block_more(c: BlocksCarry):
        return (c.block < s.num_blocks) & ~jnp.all(c.done)

    def block_body(c: BlocksCarry):
        block = jax.lax.dynamic_slice_in_dim(c.canvas, c.block * length, length, axis=1)
        generated = block == mask_id  # the slots this block generates (prompt slots are clean)
        n_masked = jnp.sum(generated & ~c.done[:, None], axis=1, dtype=jnp.int32)

        def step_more(d: DenoiseCarry):
            block_masked = jnp.any((d.block == mask_id) & ~c.done[:, None], axis=1)
            return rule.more(d.rule, d.step, block_masked, steps) & (d.step < max_steps)

        def advance(d: DenoiseCarry, logits):
            """One step's update of the block from its logits; the keys depend on `d.rng` only, so every
            variant draws the same ones wherever its logits come from."""
            rng, gumbel_key, confidence_key = step_keys(d.rng)
            new, state = block_update(logits, d.block, s, d.rule, d.step, gumbel_key, confidence_key)
            new = jnp.where(c.done[:, None], d.block, new)  # done rows stay frozen
            committed = d.committed
            if committed is not None:
                newly = (d.block == mask_id) & (new != mask_id)
                committed = jnp.where(newly, c.nfe + d.step, committed)
            return DenoiseCarry(step=d.step + 1, block=new, rng=rng, rule=state, committed=committed)

        start = DenoiseCarry(step=jnp.int32(0), block=block, rng=c.rng, rule=rule.init(n_masked, steps),
                             committed=jnp.full(block.shape, -1, jnp.int32) if trace else None)
        model_state, fused_nfe = c.model_state, jnp.int32(0)
        if fused_logits is not None:
            def fused_first(operand):
                state, d = operand
                logits, state = fused_logits(state, c.canvas, d.block, c.block)
                return state, jax.lax.cond(step_more(d), lambda d: advance(d, logits), lambda d: d, d)

            # Every block after the first starts with the previous block's commit (visiting block b means block
            # b - 1 was neither the last nor the one after which every row was done).
            pending = c.block > first_block
            model_state, start = jax.lax.cond(pending, fused_first, lambda operand: operand, (model_state, start))
            # The pass is the first step when the block takes one, else a commit of its own.
            fused_nfe = (pending & (start.step == 0)).astype(jnp.int32)

        def step_body(d: DenoiseCarry):
            return advance(d, block_logits(model_state, c.canvas, d.block, c.block))

        d = jax.lax.while_loop(step_more, step_body, start)
        block, done = d.block, c.done
        committed = c.committed
        if trace:
            committed = jax.lax.dynamic_update_slice(committed, d.committed, (jnp.int32(0), c.block * length))
        if stops:
            block = jnp.where(done[:, None] & generated, jnp.int32(s.tokens.pad_id), block)
            done = done | jnp.any(generated & (block == s.tokens.eos_id), axis=1)
        canvas = jax.lax.dynamic_update_slice(c.canvas, block, (jnp.int32(0), c.block * length))
        # The last block, and any block after which every row is done, is never read again.
        skip = (c.block == s.num_blocks - 1) | jnp.all(done)
        model_state, commit_nfe = commit_block(model_state, block, c.block, skip)
        if observe:
            stream.block_done(c.block, canvas)
        return BlocksCarry(block=c.block + 1, canvas=canvas, model_state=model_state, done=done, rng=d.rng,
                           nfe=c.nfe + fused_nfe + d.step + commit_nfe, committed=committed)

    init = BlocksCarry(block=first_block, canvas=canvas, model_state=model_state,
                       done=jnp.zeros((canvas.shape[0],), bool), rng=rng, nfe=nfe,
                       committed=jnp.full(canvas.shape, -1, jnp.int32) if trace else None)
    out = jax.lax.while_loop(block_more, block_body, init)
    canvas = out.canvas
    if stops:  # blocks after every row stopped were never visited
        canvas = jnp.where(canvas == mask_id, jnp.int32(s.tokens.pad_id), canvas)
    return (canvas, out.nfe) + ((out.committed,) if trace else ())


def _layout(denoiser: Denoiser, prompt, prompt_mask, settings: BlockSamplerSettings):
    """Validates the request and builds the canvas.

    Returns:
      canvas int32[B, T]: each row's prompt moved to its left end (order kept), the mask id after it;
      lengths int32[B]: each row's prompt length.
    """
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"the block sampler takes a dlmjax.sampling.Denoiser (Denoiser(model_config)), got "
                        f"{type(denoiser).__name__}")
    prompt = check_request(prompt, settings, BlockSamplerSettings)
    config, s = denoiser.config, settings
    if denoiser.lead:
        raise SettingsError(f"model.arch={config.arch!r} predicts each token from the slot before it; the block "
                            "sampler samples block-diffusion models (sample it with the masked sampler)",
                            field="model")
    batch, width = prompt.shape
    for name in ("mask_id", "eos_id", "pad_id"):
        value = getattr(s.tokens, name)
        if value is not None and value >= config.vocab_size:
            raise SettingsError(f"BlockSamplerSettings.tokens.{name}={value} is not a token of the model "
                                f"(vocab_size={config.vocab_size}); use an id in [0, {config.vocab_size})",
                                field=name)
    if s.max_length > config.max_seq_len:
        raise SettingsError(f"BlockSamplerSettings.max_length={s.max_length} exceeds the model context "
                            f"model.max_seq_len={config.max_seq_len}; use a max_length <= {config.max_seq_len}",
                            field="max_length")
    if width >= s.max_length:
        raise SettingsError(f"the prompt ({width} tokens) leaves nothing to generate within "
                            f"BlockSamplerSettings.max_length={s.max_length}; shorten the prompt or raise max_length",
                            field="max_length")
    prompt_mask = mask_like("prompt_mask", prompt_mask, prompt)
    # Real tokens first, in order (a stable sort of the padding flag): left or right padding alike.
    order = jnp.argsort(~prompt_mask, axis=1, stable=True)
    lengths = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)
    moved = jnp.take_along_axis(prompt.astype(jnp.int32), order, axis=1)
    moved = jnp.where(jnp.arange(width) < lengths[:, None], moved, jnp.int32(s.tokens.mask_id))
    canvas = jnp.concatenate([moved, jnp.full((batch, s.max_length - width), s.tokens.mask_id, jnp.int32)], axis=1)
    return canvas, lengths


def _cache_length(settings: BlockSamplerSettings) -> int:
    """Cache slots the run commits (the last block never is); raises if `cache_length` is smaller."""
    needed = settings.max_length - settings.block_length
    if settings.cache_length is None:
        return needed
    if settings.cache_length < needed:
        raise SettingsError(
            f"the KV cache would overflow: BlockSamplerSettings.cache_length={settings.cache_length} < {needed} "
            f"slots needed (max_length {settings.max_length} - the last block {settings.block_length}, which is "
            f"never committed); raise cache_length or set it to None", field="cache_length")
    return settings.cache_length


def _positions(batch: int, start, length: int):
    return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))


def _prefix(cache, batch: int):
    """int32[B, 1, 2]: a chunk sees the cache slots [0, index) (rows are left-aligned: no padding)."""
    return jnp.broadcast_to(jnp.stack([jnp.int32(0), cache["index"]]), (batch, 1, 2))


def commit_and_denoise(denoiser: Denoiser, params: Any, cache, finished: jax.Array, block: jax.Array):
    """The FUSED pass: one forward that commits a finished block and denoises the block after it.

    The chunk `[finished ; block]` runs against the cache slots [0, index) under `BlockCausal(L')` over its two
    blocks: `finished` sees the cache and itself (what a separate COMMIT forward computes), `block` sees the cache,
    `finished` and itself (what its DENOISE forward computes after that COMMIT).

    Args:
      cache: the KV cache holding every slot before `finished`, whose first slot is `cache["index"]` (rows are
        left-aligned, so a slot's index is its rotary position); it needs 2 L' free slots from there (the second
        block is scratch).
      finished: int32[B, L'], the finished clean block.
      block: int32[B, L'], the block after it as the sampler holds it (clean and [MASK] slots).

    Returns:
      (logits float32[B, L', V] of `block`, the cache with `finished`'s K/V written and `index` advanced by L').
    """
    batch, length = block.shape
    index = cache["index"]
    logits, cache = denoiser.forward_cached(
        params, jnp.concatenate([finished, block], axis=1), positions=_positions(batch, index, 2 * length),
        cache=cache, update_cache=True, dense_mask=BlockCausal(length).dense(2 * length, 2 * length)[None],
        cache_ranges=_prefix(cache, batch))
    # The write covered both blocks; keep the finished one only. The scratch slots' K/V stay (hidden: no range or
    # key_mask shows them) until the next commit overwrites them.
    key_mask = jax.lax.dynamic_update_slice(cache["key_mask"], jnp.zeros((batch, length), bool),
                                            (jnp.int32(0), index + length))
    return logits[:, length:], dict(cache, index=index + length, key_mask=key_mask)


@functools.partial(jax.jit, static_argnames=("denoiser", "settings", "observe", "trace", "fuse_commits"))
def generate_blocks(denoiser: Denoiser, params: Any, prompt: jax.Array, settings: BlockSamplerSettings,
                    rng: jax.Array, *, prompt_mask: jax.Array | None = None, observe: bool = False,
                    trace: bool = False, fuse_commits: bool = False):
    """Block-diffusion sampling with a KV cache of the prompt and the committed blocks.

    Compiled once per (denoiser, settings, prompt shape, prompt_mask given or not, observe, trace, fuse_commits);
    params, prompt values, the prompt mask and rng are traced.

    Args:
      denoiser: static `Denoiser` of the model (not a shifted one).
      params: its parameter pytree.
      prompt: int[B, W]; rows shorter than `W` are padded (left or right), with `prompt_mask` False there.
      settings: static `BlockSamplerSettings`.
      rng: PRNG key; consumed when `temperature > 0` or `remasking == "random"`.
      prompt_mask: bool[B, W], True on real prompt tokens; default all True.
      observe: static; hand the canvas to the host after every finished block (`dlmjax.sampling.stream`).
      trace: static; also return the forward pass that committed each slot (see `generate_masked`).
      fuse_commits: static; commit each finished block in the first forward of the next one (the FUSED pass,
        see the module docstring) instead of a forward of its own. The same tokens; one forward per visited block
        fewer; the cache holds one block more (`cache_length` + L' slots).

    Returns:
      tokens: int32[B, T]: row i is its prompt (`n_i` tokens, padding removed) followed by its `T - n_i`
        generated slots (`pad_id` after the block in which the row emitted `eos_id`).
      nfe: int32 scalar, forward passes run: 1 prefill (if some prompt has a full block) + denoising steps +
        commit passes; fused, the commit passes are only those of visited blocks that took no step (so
        1 prefill + the steps without EOS; see the module docstring).
    """
    if settings.num_blocks == 1:
        # One block (MDLM): nothing is ever cached, so the plain forward over the row is the same program with
        # less work (no empty cache segment in every attention call).
        return generate_blocks_uncached(denoiser, params, prompt, settings, rng, prompt_mask=prompt_mask,
                                        observe=observe, trace=trace)
    canvas, lengths = _layout(denoiser, prompt, prompt_mask, settings)
    batch = canvas.shape[0]
    length = settings.block_length
    first_block = (jnp.min(lengths) // length).astype(jnp.int32)
    # Fused, a pass writes the block after the committed one too: one scratch block past the committed slots.
    cache = denoiser.init_cache(batch, _cache_length(settings) + (length if fuse_commits else 0))
    nfe = jnp.int32(0)
    prefill = prompt.shape[1] // length * length  # the prompt width's full blocks (static)
    if prefill:
        has_full_block = jnp.max(lengths) >= length

        def prefill_pass(cache):
            # Block-causal inside the prompt: exactly what BD3 training's clean half sees.
            _, cache = denoiser.forward_cached(
                params, canvas[:, :prefill], positions=_positions(batch, 0, prefill), cache=cache,
                dense_mask=BlockCausal(length).dense(prefill, prefill)[None], update_cache=True,
                cache_ranges=jnp.zeros((batch, 0, 2), jnp.int32))  # the cache is empty: nothing to read
            return cache

        # Padding past the longest prompt would otherwise cost a pass that no row reads.
        cache = jax.lax.cond(has_full_block, prefill_pass, lambda cache: cache, cache)
        nfe += has_full_block.astype(jnp.int32)
        # Rewind to the first block some row generates: later entries are rewritten by its commits.
        index = first_block * length
        slots = cache["key_mask"].shape[1]
        cache = dict(cache, index=index,
                     key_mask=jnp.broadcast_to(jnp.arange(slots) < index, cache["key_mask"].shape))

    def block_logits(cache, canvas, block, b):
        del canvas  # the cache holds everything before the block
        logits, _ = denoiser.forward_cached(params, block, positions=_positions(batch, b * length, length),
                                            cache=cache, cache_ranges=_prefix(cache, batch))
        return logits

    if fuse_commits:
        def fused_logits(cache, canvas, block, b):
            finished = jax.lax.dynamic_slice_in_dim(canvas, (b - 1) * length, length, axis=1)
            return commit_and_denoise(denoiser, params, cache, finished, block)

        def no_commit(cache, block, b, skip):
            return cache, jnp.int32(0)  # the next block's first pass commits this one

        return _sample_blocks(settings, canvas, first_block, rng, cache, nfe, block_logits, no_commit, observe,
                              trace, fused_logits=fused_logits)

    def commit_block(cache, block, b, skip):
        def write(cache):
            _, cache = denoiser.forward_cached(params, block, positions=_positions(batch, b * length, length),
                                               cache=cache, update_cache=True, cache_ranges=_prefix(cache, batch))
            return cache

        cache = jax.lax.cond(skip, lambda cache: cache, write, cache)
        return cache, jnp.where(skip, 0, 1).astype(jnp.int32)

    return _sample_blocks(settings, canvas, first_block, rng, cache, nfe, block_logits, commit_block, observe,
                          trace)


@functools.partial(jax.jit, static_argnames=("denoiser", "settings", "observe", "trace"))
def generate_blocks_uncached(denoiser: Denoiser, params: Any, prompt: jax.Array, settings: BlockSamplerSettings,
                             rng: jax.Array, *, prompt_mask: jax.Array | None = None, observe: bool = False,
                             trace: bool = False):
    """The slow twin of `generate_blocks`: no cache, the whole canvas recomputed at every step.

    Same arguments and the same tokens for the same rng. Returns (tokens int32[B, T], nfe int32) with
    nfe = the denoising steps (no prefill or commit passes).
    """
    canvas, lengths = _layout(denoiser, prompt, prompt_mask, settings)
    length = settings.block_length
    first_block = (jnp.min(lengths) // length).astype(jnp.int32)
    block_causal = dataclasses.replace(denoiser, mask=BlockCausal(length))

    def block_logits(state, canvas, block, b):
        logits = block_causal(params, jax.lax.dynamic_update_slice(canvas, block, (jnp.int32(0), b * length)))
        return jax.lax.dynamic_slice_in_dim(logits, b * length, length, axis=1)

    def commit_block(state, block, b, skip):
        return state, jnp.int32(0)  # the finished block is in the canvas, which every step reads whole

    return _sample_blocks(settings, canvas, first_block, rng, None, jnp.int32(0), block_logits, commit_block,
                          observe, trace)


__all__ = ["BlocksCarry", "DenoiseCarry", "block_update", "commit_and_denoise", "generate_blocks",
           "generate_blocks_uncached"]
