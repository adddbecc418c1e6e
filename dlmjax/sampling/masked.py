"""The masked-diffusion sampler: LLaDA, Fast-dLLM and Dream decoding as one jitted program, `generate_masked`.

Canvas per row, `int32[B, N]`:

    [prompt (left-padded to width W) | G generated slots, the mask id at first | optional suffix (infilling)]
                                      [block 0 | block 1 | ... ]

The outer `lax.while_loop` walks the blocks of the generated region left to right while some row is not done;
the inner one runs the block's denoising steps. A step is one forward pass and one update of the block, each
piece a strategy of the settings:

    settings.cache (block logits) -> settings.proposal (proposal + confidence) -> eligible = the block's masked slots
      -> settings.rule (which slots commit) -> commit

Cached steps (Fast-dLLM's prefix and dual caches, `dlmjax.sampling.cache`) tell the model which cache slots a row
sees as per-row slot ranges (`ModelCalls.chunk`), never a dense [B, n, S] mask: with `model.attention_impl=pallas`
the cache kernel (`kernels_pallas.cached_attention`) then reads only the cache tiles inside them.

Rows are independent: prompts of different lengths are left-padded with a key mask that reaches attention, and
rotary positions count real tokens only (a padded row computes exactly what the unpadded row computes); each row
has its own transfer counts (Dream floors a batch average instead, the same number whenever rows have equal mask
counts, as in Dream's own use); with `stop_at_eos` a row that has generated EOS is frozen. Nothing in the loops
syncs with the host.

Where dlmjax departs from the references on purpose (each is a no-op in the references' normal use):
  - Only masked slots inside the current block are eligible (LLaDA would also take masks before the block).
  - A block stops denoising once it has no masked slot (LLaDA runs all `S` steps even when later ones commit
    nothing; Fast-dLLM stops, as here).
  - Classifier-free guidance works with or without a `prompt_mask`, and with the caches.
  - Ties in confidence go to the lower slot index (stable sort); `torch.topk` leaves them unspecified.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dlmjax.errors import SettingsError
from dlmjax.models.transformer import padded_positions
from dlmjax.sampling import stream
from dlmjax.sampling.layout import check_request, mask_like
from dlmjax.sampling.proposals import step_keys
from dlmjax.sampling.settings import SamplerSettings


@flax.struct.dataclass
class BlockCarry:
    """The outer loop's state."""

    block: jax.Array  # int32: index of the block being denoised
    canvas: jax.Array  # int32[B, N]
    rng: jax.Array
    nfe: jax.Array  # int32: forward passes run so far
    done: jax.Array  # bool[B]: rows that generated EOS in a finished block (stop_at_eos), frozen since
    history: Any  # int32[max_nfe, B, N] canvases after each forward (return_history), else None
    committed: Any  # int32[B, N]: the forward pass that committed each slot, -1 if none (trace), else None


@flax.struct.dataclass
class StepCarry:
    """The inner loop's state: one block's denoising steps."""

    step: jax.Array  # int32: forward passes of this block so far
    canvas: jax.Array
    rng: jax.Array
    nfe: jax.Array
    rule: Any  # the commit rule's state
    history: Any
    committed: Any


class ModelCalls:
    """The model calls of one request: guidance doubling, padded positions, and the cached forwards.

    `denoiser(params, tokens, key_mask) -> logits` is any hashable callable (position-aligned logits); the caches
    need a `dlmjax.sampling.Denoiser` (a model with a KV cache), whose `lead` and `align` carry Dream's shift.
    """

    def __init__(self, denoiser, params, canvas0, key_mask, settings: SamplerSettings):
        self.denoiser, self.params = denoiser, params
        self.guidance, self.mask_id = settings.guidance, settings.tokens.mask_id
        self.key_mask = key_mask
        self.positions = padded_positions(key_mask)
        self.given = canvas0 != self.mask_id  # what the unconditional copy masks: prompt and suffix
        self.lead = getattr(denoiser, "lead", 0)
        self.span = _real_span(key_mask)

    def _double(self, tokens, start=0):
        given = jax.lax.dynamic_slice_in_dim(self.given, start, tokens.shape[1], axis=1)
        return self.guidance.double(tokens, given, self.mask_id)

    def full(self, canvas):
        """Uncached forward of the whole canvas -> position-aligned logits [B, N, V]."""
        logits = self.denoiser(self.params, self._double(canvas), self.guidance.twice(self.key_mask))
        _check_logits(logits, self.guidance.rows(canvas.shape[0]), canvas.shape[1])
        return self.guidance.mix(logits)

    def full_with_cache(self, canvas):
        """A block's first pass: the whole canvas with every slot's K/V kept -> (aligned logits [B, N, V], kv)."""
        batch, length = canvas.shape
        rows = self.guidance.rows(batch)
        kv = self.denoiser.init_cache(rows, length)
        twice = self.guidance.twice
        # The cache is empty: no range (R = 0), so no attention implementation reads it.
        raw, kv = self.denoiser.forward_cached(self.params, self._double(canvas), positions=twice(self.positions),
                                               key_mask=twice(self.key_mask), cache=kv, update_cache=True,
                                               cache_ranges=jnp.zeros((rows, 0, 2), jnp.int32))
        return self.denoiser.align(self.guidance.mix(raw)), kv

    def chunk(self, canvas, kv, start, length: int, *, hidden_from, hidden_to):
        """Forwards `canvas[:, start:start + length]` against `kv` with the cached slots `[hidden_from, hidden_to)`
        hidden -> raw logits [B, length, V] (for Dream, row j predicts slot start + j + 1).

        What a row sees is two slot ranges around the hidden window, inside its real span:
        `[span_lo, hidden_from) U [hidden_to, span_hi)` (the second is dropped when it is statically empty, as
        for the prefix cache); the cache's `key_mask` stays as written."""
        tokens = jax.lax.dynamic_slice_in_dim(canvas, start, length, axis=1)
        lo, hi = self.span[:, 0], self.span[:, 1]
        ranges = [jnp.stack([lo, jnp.broadcast_to(hidden_from, lo.shape)], axis=-1)]
        if not (isinstance(hidden_to, int) and hidden_to >= kv["key_mask"].shape[1]):
            ranges.append(jnp.stack([jnp.broadcast_to(hidden_to, hi.shape), hi], axis=-1))
        ranges = jnp.stack(ranges, axis=1).astype(jnp.int32)  # [B, R, 2]
        sliced = lambda x: self.guidance.twice(jax.lax.dynamic_slice_in_dim(x, start, length, axis=1))  # noqa: E731
        raw, _ = self.denoiser.forward_cached(
            self.params, self._double(tokens, start), positions=sliced(self.positions),
            key_mask=sliced(self.key_mask), cache=kv, update_cache=False, cache_ranges=self.guidance.twice(ranges))
        return self.guidance.mix(raw)


def _canvas(prompt, prompt_mask, suffix, suffix_mask, settings: SamplerSettings):
    """(canvas int32[B, N], key_mask bool[B, N]): prompt | G mask ids | suffix."""
    batch = prompt.shape[0]
    mask_id, gen = settings.tokens.mask_id, settings.gen_length
    pieces = [prompt.astype(jnp.int32), jnp.full((batch, gen), mask_id, jnp.int32)]
    masks = [mask_like("prompt_mask", prompt_mask, prompt), jnp.ones((batch, gen), bool)]
    if suffix is not None:
        suffix = jnp.asarray(suffix)
        if suffix.ndim != 2 or suffix.shape[0] != batch or not jnp.issubdtype(suffix.dtype, jnp.integer):
            raise SettingsError(f"suffix must be int[batch={batch}, suffix_length], got {suffix.dtype}"
                                f"{list(suffix.shape)}", field="suffix")
        pieces.append(suffix.astype(jnp.int32))
        masks.append(mask_like("suffix_mask", suffix_mask, suffix))
    return jnp.concatenate(pieces, axis=1), jnp.concatenate(masks, axis=1)


@functools.partial(jax.jit, static_argnames=("denoiser", "settings", "return_history", "observe", "trace"))
def generate_masked(denoiser, params: Any, prompt: jax.Array, settings: SamplerSettings, rng: jax.Array, *,
                    prompt_mask: jax.Array | None = None, suffix: jax.Array | None = None,
                    suffix_mask: jax.Array | None = None, return_history: bool = False, observe: bool = False,
                    trace: bool = False):
    """Generates `settings.gen_length` tokens after each prompt row (and before its `suffix`, if given).

    Compiled once per (denoiser, settings, shapes, return_history, which masks are given); params, token values,
    mask values and rng are traced, so new values never recompile.

    Args:
      denoiser: static, hashable `denoiser(params, tokens, key_mask) -> logits`; the caches need a
        `dlmjax.sampling.Denoiser`.
      params: the denoiser's parameter pytree.
      prompt: int[B, W]; rows shorter than `W` are left-padded (pad id != mask id) with `prompt_mask`.
      settings: static `SamplerSettings`.
      rng: PRNG key; consumed by temperature > 0, random confidences, Dream's origin and `alg_temp`.
      prompt_mask: bool[B, W], True on real prompt tokens; default all True.
      suffix: int[B, Ls], clean tokens after the generated region (infilling: the generation fills the middle).
        Rows shorter than `Ls` are right-padded with `suffix_mask` False.
      return_history: static debugging switch; also return the canvas after every forward pass.
      observe: static; hand the canvas to the host after every finished block (`dlmjax.sampling.stream`).
      trace: static; also return, per slot, the forward pass (0-based) after which it was committed: one int32
        per slot carried through the loops, no cost when off.

    Returns:
      tokens: int32[B, W + G (+ Ls)], the prompt, the generated tokens (and the suffix).
      nfe: int32 scalar, forward passes run (a guidance pass over the doubled batch counts once).
      history (only if `return_history`): int32[max_nfe, B, N], the canvas after each forward (zeros after the last).
      commit_step (only if `trace`, after `history`): int32[B, N], the forward pass that committed each slot, -1 for
        slots the sampler never committed (prompt, suffix, the fill of a row stopped at EOS).
    """
    prompt = check_request(prompt, settings, SamplerSettings)
    s = settings
    mask_id, bl, steps = s.tokens.mask_id, s.block_length, s.steps_per_block
    batch, width = prompt.shape
    canvas, key_mask = _canvas(prompt, prompt_mask, suffix, suffix_mask, s)
    length = canvas.shape[1]
    calls = ModelCalls(denoiser, params, canvas, key_mask, s)
    cache_mode, rule = s.cache, s.rule
    if cache_mode.keeps_kv:
        for method in ("init_cache", "forward_cached", "align"):
            if not hasattr(denoiser, method):
                raise SettingsError(f"SamplerSettings.cache={cache_mode!r} needs a model denoiser with a KV cache "
                                    f"(dlmjax.sampling.Denoiser); {type(denoiser).__name__} has no {method}()",
                                    field="cache")
        if calls.lead and width < 1:
            raise SettingsError("a Dream model with a cache needs a prompt of at least one token: the first "
                                "generated slot is predicted from the slot before it", field="prompt")
    max_steps = rule.max_steps(steps, bl) + cache_mode.extra_passes
    history = jnp.zeros((s.num_blocks * max_steps,) + canvas.shape, jnp.int32) if return_history else None
    committed = jnp.full(canvas.shape, -1, jnp.int32) if trace else None

    def advance(d: StepCarry, block_logits, block_start) -> StepCarry:
        """One update of the block from its logits [B, L', V]."""
        rng, gumbel_key, confidence_key = step_keys(d.rng)
        block = jax.lax.dynamic_slice_in_dim(d.canvas, block_start, bl, axis=1)
        proposal, scores = s.proposal(block_logits, s.tokens, gumbel_key, confidence_key)
        scores = jnp.where(block == mask_id, scores, -jnp.inf)
        commits, rule_state = rule.commits(scores, d.rule, d.step, confidence_key, steps)
        canvas = jax.lax.dynamic_update_slice_in_dim(d.canvas, jnp.where(commits, proposal, block), block_start,
                                                     axis=1)
        nfe = d.nfe + 1
        history = None if d.history is None else d.history.at[nfe - 1].set(canvas)
        committed = d.committed
        if committed is not None:
            block_steps = jax.lax.dynamic_slice_in_dim(committed, block_start, bl, axis=1)
            committed = jax.lax.dynamic_update_slice_in_dim(committed, jnp.where(commits, d.nfe, block_steps),
                                                            block_start, axis=1)
        return StepCarry(step=d.step + 1, canvas=canvas, rng=rng, nfe=nfe, rule=rule_state, history=history,
                         committed=committed)

    def run_block(c: BlockCarry, block_start, chunk_length: int) -> BlockCarry:
        block = jax.lax.dynamic_slice_in_dim(c.canvas, block_start, bl, axis=1)
        n_masked = (block == mask_id).sum(axis=1).astype(jnp.int32)
        d = StepCarry(step=jnp.int32(0), canvas=c.canvas, rng=c.rng, nfe=c.nfe, rule=rule.init(n_masked, steps),
                      history=c.history, committed=c.committed)
        kv = None
        if cache_mode.keeps_kv:  # the block's first pass keeps every slot's K/V for the later steps
            logits, kv = calls.full_with_cache(c.canvas)
            d = advance(d, jax.lax.dynamic_slice_in_dim(logits, block_start, bl, axis=1), block_start)

        def more(d: StepCarry):
            block_masked = (jax.lax.dynamic_slice_in_dim(d.canvas, block_start, bl, axis=1) == mask_id).any(axis=1)
            want = rule.more(d.rule, d.step, block_masked, steps) | (d.step < cache_mode.min_passes)
            return want & (d.step < max_steps)

        def step(d: StepCarry):
            logits = cache_mode.step_logits(calls, d.canvas, kv, block_start, bl, chunk_length)
            return advance(d, logits, block_start)

        d = jax.lax.while_loop(more, step, d)
        return c.replace(canvas=d.canvas, rng=d.rng, nfe=d.nfe, history=d.history, committed=d.committed)

    # Static chunk lengths: a prefix-cache step forwards everything from its block on, so each block has its own
    # length (one branch of a `lax.switch` per distinct length); the other modes have one.
    starts = [width + b * bl for b in range(s.num_blocks)]
    chunk_lengths = [cache_mode.chunk_length(start, length, bl, calls.lead) for start in starts]
    distinct = sorted(set(chunk_lengths), reverse=True)
    branches = [functools.partial(run_block, chunk_length=n) for n in distinct]
    branch_of_block = jnp.asarray(np.asarray([distinct.index(n) for n in chunk_lengths], np.int32))

    slot = jnp.arange(length, dtype=jnp.int32)
    generated = (slot >= width) & (slot < width + s.gen_length)

    def more_blocks(c: BlockCarry):
        return (c.block < s.num_blocks) & ~c.done.all()

    def next_block(c: BlockCarry):
        block_start = width + c.block * bl
        if len(branches) == 1:
            c = branches[0](c, block_start)
        else:
            c = jax.lax.switch(branch_of_block[c.block],
                               [functools.partial(b, block_start=block_start) for b in branches], c)
        canvas, done = c.canvas, c.done
        if s.stop_at_eos:
            block_end = block_start + bl
            has_eos = ((canvas == s.tokens.eos_id) & generated[None, :] & (slot < block_end)[None, :]).any(axis=1)
            done = done | has_eos
            # A done row is frozen: its later slots hold pad_id, so no later block has anything to denoise.
            fill = done[:, None] & (generated & (slot >= block_end))[None, :]
            canvas = jnp.where(fill, jnp.int32(s.tokens.pad_id), canvas)
        if observe:
            stream.block_done(c.block, canvas)
        return c.replace(block=c.block + 1, canvas=canvas, done=done)

    init = BlockCarry(block=jnp.int32(0), canvas=canvas, rng=rng, nfe=jnp.int32(0),
                      done=jnp.zeros((batch,), bool), history=history, committed=committed)
    out = jax.lax.while_loop(more_blocks, next_block, init)
    extras = ((out.history,) if return_history else ()) + ((out.committed,) if trace else ())
    return (out.canvas, out.nfe) + extras


def _real_span(key_mask: jax.Array) -> jax.Array:
    """int32[B, 2]: per row, [first real slot, last real slot + 1) of the canvas ([0, 0) for a row with none).

    A left-padded prompt and a right-padded suffix leave a row's real slots one run, so this span and a hidden
    window give a cached step's visible slots as two ranges (a prompt mask with holes inside the span would be
    seen by the cache kernel; the dense path also applies the key mask itself).
    """
    length = key_mask.shape[1]
    real = key_mask.any(axis=1)
    first = jnp.argmax(key_mask, axis=1)
    end = length - jnp.argmax(key_mask[:, ::-1], axis=1)
    return jnp.stack([jnp.where(real, first, 0), jnp.where(real, end, 0)], axis=-1).astype(jnp.int32)


def _check_logits(logits: jax.Array, batch: int, length: int) -> None:
    if logits.ndim != 3 or logits.shape[:2] != (batch, length):
        raise TypeError(f"the denoiser must return logits [batch={batch}, length={length}, vocab], "
                        f"got shape {list(logits.shape)}")


__all__ = ["BlockCarry", "ModelCalls", "StepCarry", "generate_masked"]
