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
    The prefill is fused the same way: `[the prompt width's full blocks ; the block after them]` from an empty
    cache. When every row's first masked slot lies in that block (equal prompt lengths, e.g. batch 1), its logits
    are the block's first step (the SEED), so that step costs no forward of its own.
  With a single block (`block_length == max_length`, MDLM) there is nothing to cache and it runs the twin.
  DENOISE and COMMIT see the cache as one slot range per row, [0, index): with `model.attention_impl=pallas` the
  cache kernel reads only those tiles (`kernels_pallas.cached_attention`). The FUSED pass carries a dense mask
  inside its chunk, so it takes the dense attention path whatever `attention_impl` says (one pass per block).
`generate_blocks_uncached` (the slow twin): every step runs the whole canvas `[B, T]` under the block-causal mask,
which is BD3's mask restricted to what exists: the noisy block sees the clean prefix and itself, and no query
that is read sees a later block. The canvas is the full length (not the growing prefix) because a while loop
needs static shapes; the later slots are hidden by the mask.

Shifted ("lead") models (`Denoiser.lead == 1`, `model.arch=dream`: Dream, Fast-dLLM v2, any AR-adapted causal LM):
raw logit row i predicts slot i + 1, so a block's slot j is predicted by raw row j - 1, and its first slot by the
last slot of the previous, clean block: the training contract of the shifted bd3 objective. Block length 1 is then
exactly greedy autoregressive decoding with the causal LM. The uncached twin aligns the rows of its block-causal
forward. A cached DENOISE forwards `[lead ; block]` (L' + 1 queries, `lead_and_denoise`): the lead is the previous
block's last slot, recomputed against the cache slots [0, start - 1) under `lead_chunk_mask` (it sees the cache
and itself, the block's slots see the lead and the whole block: the block-causal mask restricted to the chunk),
so its row is the one its COMMIT computed; the block's raw rows 0..L'-1 are kept. The FUSED pass needs nothing
extra: its finished block's last row is that very row (Fast-dLLM v2's "the finished block enters the cache with
one forward whose last logit seeds the next block"), and the fused prefill's last prompt row predicts the first
generated slot, as an AR prefill does. Slot 0 never gets a prediction: a row needs a prompt token (an empty
prompt is refused). Lead passes carry a dense mask, so they take the dense attention path.

A step (shared by both, so they differ only in where the logits come from): [MASK] logit -> -inf ->
`settings.proposal` -> scores of slots that are not masked = -inf -> `settings.rule` -> commit -> done rows kept.
A block's steps end when the rule says so or, for every rule, as soon as none of its slots is masked in a row
that is not done (early stop: fixed schedules such as Dream's never run a pass that would commit nothing here).

NFE counts forward passes actually run (the steps are the same in every variant; a block's steps stop early
once it is filled):
  cached              P + steps + (V - 1)
  cached, fused       P + steps + Z - E      = cached - (V - 1 - Z) - E
  uncached            steps
with P = 1 if some prompt has a full block (the prefill) else 0, V the blocks visited (from the first block some
row generates, until the last block or every row is done), Z the visited blocks after the first that took no
step and E = P (the fused prefill runs the first block's first step: that block, `first_block`, lies inside the
prefill's chunk whatever the width bucket, and under the block-causal mask it sees only the clean prompt blocks
before it). Without EOS every visited block takes a step (the row with the shortest prompt generates in all of
them), so Z = 0 and the fused sampler costs one forward per step: autoregressive decoding (`block_length=1`)
costs exactly one forward per slot the shortest prompt's row generates, `max_length - min(prompt lengths)`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dlmjax.errors import SettingsError
from kernels_pallas.masks import BlockCausal
from dlmjax.sampling import stream
from dlmjax.sampling.denoiser import Denoiser
from dlmjax.sampling.layout import left_aligned_canvas
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
                   fused_logits: Callable | None = None, seed: tuple | None = None):
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
      seed: None, or (logits float32[B, L', V], seeded bool scalar): when `seeded`, the logits of `first_block` as
        it starts, from a pass already counted in `nfe` (the fused prefill): they drive its first step.

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
            # Early stop, whatever the rule: a pass over a block with nothing masked (in rows not done) would
            # commit nothing. The rule's own `more` is left as the masked sampler uses it (Dream's schedules run
            # their S steps there, as the reference does).
            return rule.more(d.rule, d.step, block_masked, steps) & (d.step < max_steps) & block_masked.any()

        start = DenoiseCarry(step=jnp.int32(0), block=block, rng=c.rng, rule=rule.init(n_masked, steps),
                             committed=jnp.full(block.shape, -1, jnp.int32) if trace else None)
        # The seeded first step ran in a pass before the loop (already in `c.nfe`): the block's passes start one
        # earlier.
        seeded = jnp.bool_(False)
        if seed is not None:
            seeded = seed[1] & (c.block == first_block) & step_more(start)
        base = c.nfe - seeded.astype(jnp.int32)  # the pass that runs the block's step `d.step` is `base + d.step`

        def advance(d: DenoiseCarry, logits):
            """One step's update of the block from its logits; the keys depend on `d.rng` only, so every
            variant draws the same ones wherever its logits come from."""
            rng, gumbel_key, confidence_key = step_keys(d.rng)
            new, state = block_update(logits, d.block, s, d.rule, d.step, gumbel_key, confidence_key)
            new = jnp.where(c.done[:, None], d.block, new)  # done rows stay frozen
            committed = d.committed
            if committed is not None:
                newly = (d.block == mask_id) & (new != mask_id)
                committed = jnp.where(newly, base + d.step, committed)
            return DenoiseCarry(step=d.step + 1, block=new, rng=rng, rule=state, committed=committed)

        model_state, fused_nfe = c.model_state, jnp.int32(0)
        if seed is not None:
            start = jax.lax.cond(seeded, lambda d: advance(d, seed[0]), lambda d: d, start)
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
                           nfe=base + fused_nfe + d.step + commit_nfe, committed=committed)

    init = BlocksCarry(block=first_block, canvas=canvas, model_state=model_state,
                       done=jnp.zeros((canvas.shape[0],), bool), rng=rng, nfe=nfe,
                       committed=jnp.full(canvas.shape, -1, jnp.int32) if trace else None)
    out = jax.lax.while_loop(block_more, block_body, init)
    canvas = out.canvas
    if stops:  # blocks after every row stopped were never visited
        canvas = jnp.where(canvas == mask_id, jnp.int32(s.tokens.pad_id), canvas)
    return (canvas, out.nfe) + ((out.committed,) if trace else ())


def _layout(denoiser: Denoiser, prompt, prompt_mask, settings: BlockSamplerSettings):
    """Validates the request and builds the canvas (`layout.left_aligned_canvas`): (canvas int32[B, T], prompt
    lengths int32[B])."""
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"the block sampler takes a dlmjax.sampling.Denoiser (Denoiser(model_config)), got "
                        f"{type(denoiser).__name__}")
    if denoiser.lead and jnp.shape(prompt)[-1] == 0:
        # Slot 0 of a row is never predicted by a shifted model (no slot before it): it must be a prompt token.
        raise SettingsError(f"model.arch={denoiser.config.arch!r} predicts each slot from the slot before it, so "
                            "slot 0 needs a prompt token; give every row at least one (e.g. a BOS)", field="prompt")
    return left_aligned_canvas(denoiser.config, prompt, prompt_mask, settings, BlockSamplerSettings)


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
    """The FUSED pass: one forward that commits finished blocks and denoises the block after them.

    The chunk `[finished ; block]` runs against the cache slots [0, index) under `BlockCausal(L')` over its
    blocks: `finished` sees the cache and its own blocks up to itself (what a separate COMMIT forward computes, or
    the block-causal PREFILL when the cache is empty), `block` sees the cache, `finished` and itself (what its
    DENOISE forward computes after that COMMIT).

    Args:
      cache: the KV cache holding every slot before `finished`, whose first slot is `cache["index"]` (a multiple
        of L'; rows are left-aligned, so a slot's index is its rotary position); it needs F + L' free slots from
        there (the last block is scratch).
      finished: int32[B, F], F a multiple of L': the finished clean blocks (one block when committing).
      block: int32[B, L'], the block after them as the sampler holds it (clean and [MASK] slots).

    Returns:
      (logits float32[B, L', V] of `block`, position-aligned: row j predicts slot j of `block`; the cache with
      `finished`'s K/V written and `index` advanced by F). For a shifted model (`denoiser.lead == 1`) the
      prediction of the block's first slot is the row of the finished block's last slot, computed exactly as its
      COMMIT computes it.
    """
    batch, length = block.shape
    width = finished.shape[1]
    if width % length:
        raise ValueError(f"commit_and_denoise: finished has {width} slots, not a multiple of the block's {length}")
    index = cache["index"]
    logits, cache = denoiser.forward_cached(
        params, jnp.concatenate([finished, block], axis=1), positions=_positions(batch, index, width + length),
        cache=cache, update_cache=True, dense_mask=BlockCausal(length).dense(width + length, width + length)[None],
        cache_ranges=_prefix(cache, batch))
    # The write covered the block too; keep the finished ones only. The scratch slots' K/V stay (hidden: no range
    # or key_mask shows them) until the next commit overwrites them.
    key_mask = jax.lax.dynamic_update_slice(cache["key_mask"], jnp.zeros((batch, length), bool),
                                            (jnp.int32(0), index + width))
    lead = denoiser.lead
    return logits[:, width - lead:width + length - lead], dict(cache, index=index + width, key_mask=key_mask)


def lead_chunk_mask(length: int) -> np.ndarray:
    """bool[L' + 1, L' + 1]: `BlockCausal(L')` restricted to the slots [start - 1, start + L') of a block starting
    at `start`: the lead slot (the previous block's last) sees only itself, the block's slots see the lead slot and
    the whole block."""
    return BlockCausal(length).dense(2 * length, 2 * length)[length - 1:, length - 1:]


def lead_and_denoise(denoiser: Denoiser, params: Any, cache, lead_token: jax.Array, block: jax.Array, start):
    """A shifted model's DENOISE pass: the chunk `[lead ; block]` (L' + 1 queries) against the cache.

    The block's slot j is predicted by raw row j - 1, so the chunk starts one slot early with the lead slot (the
    last slot of the previous, clean block). The cache holds that slot too; the chunk reads [0, start - 1) of it
    and recomputes the lead under `lead_chunk_mask`, which is what the block-causal mask lets it see (the cache
    and itself, never the block after it), so its row equals the one its COMMIT computed. Nothing is written.

    Args:
      cache: the KV cache holding every slot before the block.
      lead_token: int32[B, 1], the canvas slot `start - 1` (any token when `start == 0`).
      block: int32[B, L'], the block as the sampler holds it.
      start: int32 scalar, the block's first slot (a multiple of L').

    Returns:
      logits float32[B, L', V], position-aligned (row j predicts slot `start + j`). At `start == 0` there is no
      slot before the block: the lead is then a placeholder hidden from the block, and row 0 (a prediction of slot
      0, which is always a prompt token) means nothing.
    """
    batch, length = block.shape
    has_lead = start > 0
    mask = jnp.asarray(lead_chunk_mask(length)).at[1:, 0].set(has_lead)
    lead = jnp.maximum(start - 1, 0)
    positions = jnp.concatenate([jnp.broadcast_to(lead, (batch, 1)), _positions(batch, start, length)], axis=1)
    seen = jnp.broadcast_to(jnp.stack([jnp.int32(0), lead]), (batch, 1, 2))
    logits, _ = denoiser.forward_cached(params, jnp.concatenate([lead_token, block], axis=1), positions=positions,
                                        cache=cache, dense_mask=mask[None], cache_ranges=seen)
    return logits[:, :length]


@functools.partial(jax.jit, static_argnames=("denoiser", "settings", "observe", "trace", "fuse_commits"))
def generate_blocks(denoiser: Denoiser, params: Any, prompt: jax.Array, settings: BlockSamplerSettings,
                    rng: jax.Array, *, prompt_mask: jax.Array | None = None, observe: bool = False,
                    trace: bool = False, fuse_commits: bool | None = None):
    """Block-diffusion sampling with a KV cache of the prompt and the committed blocks.

    Compiled once per (denoiser, settings, prompt shape, prompt_mask given or not, observe, trace, fuse_commits);
    params, prompt values, the prompt mask and rng are traced.

    Args:
      denoiser: static `Denoiser` of the model; a shifted one (`model.arch=dream`) too (see the module docstring).
      params: its parameter pytree.
      prompt: int[B, W]; rows shorter than `W` are padded (left or right), with `prompt_mask` False there. A
        shifted model needs W >= 1 and, per row, at least one real token (slot 0 is never predicted; an empty row
        under `prompt_mask` cannot be refused inside the compiled program and samples its slot 0 from nothing).
      settings: static `BlockSamplerSettings`.
      rng: PRNG key; consumed when `temperature > 0` or `remasking == "random"`.
      prompt_mask: bool[B, W], True on real prompt tokens; default all True.
      observe: static; hand the canvas to the host after every finished block (`dlmjax.sampling.stream`).
      trace: static; also return the forward pass that committed each slot (see `generate_masked`).
      fuse_commits: static; None takes `settings.fuse_commits`. True commits each finished block in the first
        forward of the next one, and the prompt's prefill denoises the block after it (the FUSED passes, see the
        module docstring), instead of a forward of its own. The same tokens; fewer forwards; the cache holds one
        block more (`cache_length` + L' slots).

    Returns:
      tokens: int32[B, T]: row i is its prompt (`n_i` tokens, padding removed) followed by its `T - n_i`
        generated slots (`pad_id` after the block in which the row emitted `eos_id`).
      nfe: int32 scalar, forward passes run (see the module docstring).
    """
    if fuse_commits is None:
        fuse_commits = settings.fuse_commits
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
    seed = None
    prefill = prompt.shape[1] // length * length  # the prompt width's full blocks (static)
    if prefill:
        has_full_block = jnp.max(lengths) >= length
        if fuse_commits:
            # The prefill is a FUSED pass from an empty cache over [the prompt width's full blocks ; the block after
            # them], block-causal. Block `first_block` (<= the prompt width's full blocks, since the shortest
            # prompt fits the width) sees the clean prompt blocks before it and itself: its logits there are
            # exactly its first DENOISE step, whatever the width bucket. Blocks after it hold [MASK] in some rows;
            # their K/V are rewound below and rewritten before anything reads them.
            def prefill_pass(cache):
                chunk = prefill + length
                raw, cache = denoiser.forward_cached(
                    params, canvas[:, :chunk], positions=_positions(batch, 0, chunk), cache=cache, update_cache=True,
                    dense_mask=BlockCausal(length).dense(chunk, chunk)[None],
                    cache_ranges=jnp.zeros((batch, 0, 2), jnp.int32))  # the cache is empty: nothing to read
                # Position-aligned rows (a shifted model's row j - 1 predicts slot j; slot 0 has no prediction and is
                # always a prompt slot, so its row is never read).
                aligned = jnp.pad(raw, ((0, 0), (denoiser.lead, 0), (0, 0)))[:, :chunk]
                return jax.lax.dynamic_slice_in_dim(aligned, first_block * length, length, axis=1), cache

            shapes = jax.eval_shape(prefill_pass, cache)[0]
            seed_logits, cache = jax.lax.cond(
                has_full_block, prefill_pass, lambda cache: (jnp.zeros(shapes.shape, shapes.dtype), cache), cache)
            seed = (seed_logits, has_full_block)
        else:
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
        start = b * length
        if denoiser.lead:
            lead_token = jax.lax.dynamic_slice_in_dim(canvas, jnp.maximum(start - 1, 0), 1, axis=1)
            return lead_and_denoise(denoiser, params, cache, lead_token, block, start)
        # The cache holds everything before the block.
        logits, _ = denoiser.forward_cached(params, block, positions=_positions(batch, start, length),
                                            cache=cache, cache_ranges=_prefix(cache, batch))
        return logits

    if fuse_commits:
        def fused_logits(cache, canvas, block, b):
            finished = jax.lax.dynamic_slice_in_dim(canvas, (b - 1) * length, length, axis=1)
            return commit_and_denoise(denoiser, params, cache, finished, block)

        def no_commit(cache, block, b, skip):
            return cache, jnp.int32(0)  # the next block's first pass commits this one

        return _sample_blocks(settings, canvas, first_block, rng, cache, nfe, block_logits, no_commit, observe,
                              trace, fused_logits=fused_logits, seed=seed)

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
        # Position-aligned logits: for a shifted model the Denoiser takes slot j's from raw row j - 1, which for
        # the block's first slot is the previous block's last, seeing only the (clean) blocks before this one.
        logits = block_causal(params, jax.lax.dynamic_update_slice(canvas, block, (jnp.int32(0), b * length)))
        return jax.lax.dynamic_slice_in_dim(logits, b * length, length, axis=1)

    def commit_block(state, block, b, skip):
        return state, jnp.int32(0)  # the finished block is in the canvas, which every step reads whole

    return _sample_blocks(settings, canvas, first_block, rng, None, jnp.int32(0), block_logits, commit_block,
                          observe, trace)


__all__ = ["BlocksCarry", "DenoiseCarry", "block_update", "commit_and_denoise", "generate_blocks",
           "generate_blocks_uncached", "lead_and_denoise", "lead_chunk_mask"]
