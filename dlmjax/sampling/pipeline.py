"""D2F pipelined decoding (Discrete Diffusion Forcing): several blocks denoised at once, on an exact KV cache.

Slot layout: the block sampler's (`dlmjax.sampling.block`). Each row is moved to the left of a canvas of
T = `max_length` slots and cut into N = T / L' blocks of L' = `block_length` slots counted from its first token,
the grid block-causal training uses; a prompt that ends inside a block shares it with the first generated slots.
A block's "generated slots" are its slots after the row's prompt, and its decoded fraction is the share of them
that hold a committed token (1 for a block the prompt fills).

State machine, per row (every pass, in this order):
  ADD       the row's blocks [0, added) exist; the others hold [MASK] and no pass writes them. Block `added` is
            appended when the last existing block's decoded fraction is >= `block_add_threshold`, it lies inside
            this pass's window, and no existing block holds a committed `eos_id` (the row ends there or earlier).
            At most one block per pass. At the start, `added` = the blocks the prompt fills.
  ACTIVATE  an existing, unfinished block is fully activated when it is block 0 or its predecessor's decoded
            fraction is >= `decoded_token_threshold` (a finished or prompt-filled predecessor always is).
  FORWARD   one forward pass of the window (below); block-causal: a block sees the blocks before it as they are
            now (partly masked), never a later one. This is the attention D2F trains with.
  COMMIT    every existing, unfinished block in the window commits each masked slot whose proposal's confidence
            is >= `skip_threshold`; a fully activated block where none is commits its single most confident
            masked slot (ties: the lower slot). So the row's first unfinished block, which is always fully
            activated, gains >= 1 token whenever it lies in the window.
  STOP      a row is done when all its blocks are finished, or when a finished block whose predecessors are all
            finished holds a generated `eos_id`: its slots after that block become `pad_id`. Done rows are frozen.
The loop ends when every row is done.

The window (static shape): a pass forwards W = `window_blocks` blocks, `[B, W * L']`, starting at block
ws = min(start, N - W), against the cache slots [0, ws * L'); `start` is the first block whose K/V the cache does
not hold clean. The pass writes the K/V of all its W blocks (`update_cache=True`); afterwards `start` moves over
the leading blocks that were finished in every row (or whose row is done) BEFORE the pass: their K/V came from
clean tokens that saw only clean tokens, so they are exactly what the uncached forward computes. That is the
fused commit of `block.commit_and_denoise` generalised: finished blocks enter the cache in the same forward that
denoises the blocks after them, never in a forward of their own. The entries past `start * L'` are scratch
(their `key_mask` is cleared; the next pass rewrites them). Clamping ws at N - W keeps every slice inside the
canvas and every rotary position < T; the blocks [ws, start) it re-forwards are finished, so their rewritten
K/V are the same clean ones. The cache holds T slots (`cache_length` None) and the canvas needs no padding.

A row can add a block only inside the window, so a row ahead of the others waits until `start` moves; and when
every block of the window finished in one pass, the next pass only moves them into the cache (it commits
nothing). A wider window makes both rarer.

PREFILL is folded into the first pass: it forwards the slots [0, F) from the empty cache, block-causal, with
F = min(the prompt width's full blocks + W L', T), and reads the first window's logits out of it (the first window
starts at or before the shortest prompt's last full block, so it lies inside). Its K/V of the blocks every prompt
fills are the clean prompt's; the rest are scratch like any window's. Without a full prompt block it is an
ordinary window pass at block 0.

NFE (forward passes) = the loop's passes, the same for the cached sampler and its twin. Each pass either commits
>= 1 slot (in the row whose first unfinished block is leftmost) or moves >= 1 block into the cache, so
passes <= generated slots + N.

With `block_add_threshold=1` and `window_blocks=2` a row has one unfinished block at a time, fully activated, and
commits the best masked slot plus every slot at or above `skip_threshold`: the block sampler's `Threshold` rule
with fused commits, token for token (rows no longer wait for each other, so a batch may take fewer passes).

`generate_pipelined_uncached` is the slow twin: every pass forwards the whole canvas `[B, T]` under the
block-causal mask (no cache) and reads the window's logits, with the same state machine and random keys.
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
from dlmjax.sampling import stream
from dlmjax.sampling import validation as check
from dlmjax.sampling.block import _positions, _prefix
from dlmjax.sampling.choices import Confidence, parse_choice
from dlmjax.sampling.denoiser import Denoiser
from dlmjax.sampling.layout import left_aligned_canvas
from dlmjax.sampling.proposals import LladaProposal, step_keys
from dlmjax.sampling.rules import select_threshold
from dlmjax.sampling.settings import special_tokens
from dlmjax.sampling.tokens import SpecialTokens
from kernels_pallas.masks import BlockCausal

# Confidences that are probabilities, so that a threshold in (0, 1] means what it says.
PIPELINE_CONFIDENCES = (Confidence.LOW_CONFIDENCE, Confidence.MARGIN)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineSettings:
    """How the D2F pipelined sampler (`generate_pipelined`) fills rows up to `max_length`.

    Attributes:
      max_length: Slots per row T, prompt included; a multiple of `block_length`.
      block_length: Slots per block L'.
      window_blocks: Blocks one forward pass covers W (static), 2 <= W <= max_length // block_length. A row's
        unfinished blocks must lie in the window, so W bounds how many blocks are in flight.
      block_add_threshold: Decoded fraction of a row's last block at which the next block is appended, in (0, 1].
      decoded_token_threshold: Decoded fraction of a block's predecessor at which the block is fully activated
        (commits at least one slot per pass), in (0, 1].
      skip_threshold: Confidence at or above which a masked slot of an active block is committed, in (0, 1].
      tokens: The model's special token ids; with `eos_id` a row stops at its first finished EOS block.
      proposal: `LladaProposal` (temperature, top-k / top-p; confidence "low_confidence" or "margin").
      cache_length: KV-cache slots per row; None sizes it exactly (`max_length`).
    """

    max_length: int
    block_length: int
    window_blocks: int = 2
    block_add_threshold: float = 0.1
    decoded_token_threshold: float = 0.5
    skip_threshold: float = 0.9
    tokens: SpecialTokens
    proposal: LladaProposal = LladaProposal()
    cache_length: int | None = None

    def __post_init__(self):
        self.validate()

    @property
    def num_blocks(self) -> int:
        return self.max_length // self.block_length

    def validate(self) -> None:
        """Raises SettingsError naming the field, its value and what is allowed."""
        name = type(self).__name__
        for field in ("max_length", "block_length", "window_blocks"):
            check.positive_int(name, field, getattr(self, field))
        check.block_grid(name, self.max_length, self.block_length)
        if not 2 <= self.window_blocks <= self.num_blocks:
            allowed = (f"use 2 <= window_blocks <= max_length // block_length = {self.num_blocks}"
                       if self.num_blocks >= 2 else "the row has one block: use the block sampler")
            check.fail(name, "window_blocks", self.window_blocks, allowed)
        for field in ("block_add_threshold", "decoded_token_threshold", "skip_threshold"):
            check.unit_threshold(name, field, getattr(self, field))
        if not isinstance(self.tokens, SpecialTokens):
            check.fail(name, "tokens", self.tokens, "use a dlmjax.sampling.SpecialTokens")
        if not isinstance(self.proposal, LladaProposal):
            check.fail(name, "proposal", self.proposal, "use a LladaProposal")
        if self.proposal.confidence not in PIPELINE_CONFIDENCES:
            check.fail(name, "proposal", self.proposal, "skip_threshold compares probabilities: use confidence "
                       f"(remasking) in {[str(c) for c in PIPELINE_CONFIDENCES]}")
        self.proposal.check_tokens(self.tokens)
        if self.cache_length is not None:
            check.positive_int(name, "cache_length", self.cache_length)
            if self.cache_length < self.max_length:
                check.fail(name, "cache_length", self.cache_length, f"the window reaches slot max_length="
                           f"{self.max_length}; use cache_length >= {self.max_length} or None")

    @classmethod
    def d2f(cls, *, max_length: int, block_length: int, window_blocks: int = 2, block_add_threshold: float = 0.1,
            decoded_token_threshold: float = 0.5, skip_threshold: float = 0.9, temperature: float = 0.0,
            top_k: int = 0, top_p: float = 1.0, remasking: str = Confidence.LOW_CONFIDENCE,
            cache_length: int | None = None, tokens: SpecialTokens | None = None, mask_id: int | None = None,
            eos_id: int | None = None, pad_id: int | None = None) -> "PipelineSettings":
        """Settings in D2F's flat keywords (its demo's defaults: add at 0.1, fully activate at 0.5, commit at
        0.9); proposals at `temperature` with top-k / top-p, slots ranked by `remasking` (low_confidence or
        margin). Token ids come from `tokens` or the id keywords."""
        remasking = parse_choice(Confidence, remasking, owner=cls.__name__, field="remasking",
                                 allowed=PIPELINE_CONFIDENCES)
        proposal = LladaProposal(temperature=temperature, top_k=top_k, top_p=top_p, confidence=remasking)
        return cls(max_length=max_length, block_length=block_length, window_blocks=window_blocks,
                   block_add_threshold=block_add_threshold, decoded_token_threshold=decoded_token_threshold,
                   skip_threshold=skip_threshold, proposal=proposal, cache_length=cache_length,
                   tokens=special_tokens(tokens, mask_id=mask_id, eos_id=eos_id, pad_id=pad_id))


def fraction_table(threshold: float, block_length: int) -> np.ndarray:
    """int32[L' + 1]: entry t is the fewest decoded slots k of t generated ones with `k / t >= threshold` (0 for
    t = 0), the fraction test as integer counts, so the traced program and a Python loop agree exactly."""
    need = [0] + [next(k for k in range(t + 1) if k / t >= threshold) for t in range(1, block_length + 1)]
    return np.asarray(need, np.int32)


@flax.struct.dataclass
class PipelineCarry:
    """The loop's state."""

    canvas: jax.Array  # int32[B, T]
    model_state: Any  # the KV cache (None for the uncached twin)
    start: jax.Array  # int32: the first block whose K/V the cache does not hold clean
    added: jax.Array  # int32[B]: the row's existing blocks are [0, added)
    done: jax.Array  # bool[B]: rows that are finished (all blocks filled, or stopped at EOS)
    rng: jax.Array
    passes: jax.Array  # int32: forward passes run (the NFE)
    committed: Any  # int32[B, T]: the forward pass that committed each slot, -1 if none (trace), else None


@flax.struct.dataclass
class BlockView:
    """What the state machine reads off the canvas, per row and block ([B, N])."""

    finished: jax.Array  # bool: no masked slot
    add_ready: jax.Array  # bool: decoded fraction >= block_add_threshold
    full_ready: jax.Array  # bool: decoded fraction >= decoded_token_threshold
    eos: jax.Array  # bool: a generated slot holds eos_id


def _view(canvas, lengths, settings: PipelineSettings) -> BlockView:
    s, length = settings, settings.block_length
    batch = canvas.shape[0]
    blocks = canvas.reshape(batch, s.num_blocks, length)
    slot = jnp.arange(s.max_length).reshape(s.num_blocks, length)
    generated = slot[None] >= lengths[:, None, None]  # [B, N, L']
    total = generated.sum(-1, dtype=jnp.int32)
    decoded = total - (blocks == s.tokens.mask_id).sum(-1, dtype=jnp.int32)
    add_need = jnp.asarray(fraction_table(s.block_add_threshold, length))[total]
    full_need = jnp.asarray(fraction_table(s.decoded_token_threshold, length))[total]
    if s.tokens.eos_id is None:
        eos = jnp.zeros(total.shape, bool)
    else:
        eos = jnp.any(generated & (blocks == s.tokens.eos_id), axis=-1)
    return BlockView(finished=~jnp.any(blocks == s.tokens.mask_id, axis=-1), add_ready=decoded >= add_need,
                     full_ready=decoded >= full_need, eos=eos)


def _window_commits(settings: PipelineSettings, logits, window, active, fully, gumbel_key, confidence_key):
    """The COMMIT step over the window: the new window tokens int32[B, W * L'].

    Args:
      logits: float32[B, W * L', V], the window's position-aligned logits.
      window: int32[B, W * L'], its tokens.
      active, fully: bool[B, W], existing unfinished blocks of rows not done / fully activated ones.
    """
    s = settings
    batch, width = window.shape
    mask_id = s.tokens.mask_id
    if mask_id < logits.shape[-1]:
        logits = logits.at[..., mask_id].set(-jnp.inf)  # [MASK] is a state, not a prediction
    proposal, scores = s.proposal(logits, s.tokens, gumbel_key, confidence_key)
    shape = (batch, s.window_blocks, s.block_length)
    eligible = (window == mask_id).reshape(shape) & active[..., None]
    scores = jnp.where(eligible, scores.reshape(shape), -jnp.inf)
    # A fully activated block takes the threshold rule (its best slot at least); any other active block only the
    # slots at or above the threshold.
    commits = jnp.where(fully[..., None], select_threshold(scores, s.skip_threshold),
                        eligible & (scores >= s.skip_threshold))
    return jnp.where(commits.reshape(batch, width), proposal, window)


def _pipeline(settings: PipelineSettings, canvas, lengths, start, rng, model_state, forward: Callable,
              settle: Callable, observe: bool, trace: bool):
    """The loop shared by the cached sampler and its twin.

    Args:
      canvas: int32[B, T], prompts left-aligned, [MASK] after them.
      lengths: int32[B], prompt lengths.
      start: int32 scalar, the first block the cache does not hold.
      forward: `(model_state, canvas, ws, passes) -> (logits float32[B, W * L', V], model_state)`: one pass of
        the window starting at block `ws`; `passes` counts the passes before it.
      settle: `(model_state, start) -> model_state`, after a pass: the cache holds blocks [0, start).

    Returns:
      (canvas, passes int32) (+ committed int32[B, T] when `trace`).
    """
    s, length = settings, settings.block_length
    n_blocks, width = s.num_blocks, s.window_blocks
    batch = canvas.shape[0]
    block_ids = jnp.arange(n_blocks, dtype=jnp.int32)
    # Each pass commits a slot or moves a block into the cache; the bound only stops a bug from looping forever
    # (the tests check that no [MASK] is left).
    max_passes = s.max_length + n_blocks

    def more(c: PipelineCarry):
        return ~jnp.all(c.done) & (c.passes < max_passes)

    def body(c: PipelineCarry):
        ws = jnp.minimum(c.start, n_blocks - width)
        before = _view(c.canvas, lengths, s)
        # ADD: one block per pass, inside the window, not past a committed EOS.
        last_ready = jnp.where(c.added > 0, jnp.take_along_axis(
            before.add_ready, jnp.maximum(c.added - 1, 0)[:, None], axis=1)[:, 0], True)
        exists = block_ids[None] < c.added[:, None]
        eos_seen = jnp.any(exists & before.eos, axis=1)
        grow = ~c.done & (c.added < ws + width) & last_ready & ~eos_seen
        added = c.added + grow.astype(jnp.int32)
        exists = block_ids[None] < added[:, None]
        # ACTIVATE: the predecessor decoded enough (block 0 has none).
        fully = jnp.concatenate([jnp.ones((batch, 1), bool), before.full_ready[:, :-1]], axis=1)
        active = exists & ~before.finished & ~c.done[:, None]

        logits, model_state = forward(c.model_state, c.canvas, ws, c.passes)
        rng, gumbel_key, confidence_key = step_keys(c.rng)
        window = jax.lax.dynamic_slice_in_dim(c.canvas, ws * length, width * length, axis=1)
        active, fully = (jax.lax.dynamic_slice_in_dim(x, ws, width, axis=1) for x in (active, fully))  # [B, W]
        new = _window_commits(s, logits, window, active, fully, gumbel_key, confidence_key)
        canvas = jax.lax.dynamic_update_slice(c.canvas, new, (jnp.int32(0), ws * length))
        committed = c.committed
        if trace:
            newly = (window == s.tokens.mask_id) & (new != s.tokens.mask_id)
            old = jax.lax.dynamic_slice_in_dim(committed, ws * length, width * length, axis=1)
            committed = jax.lax.dynamic_update_slice(committed, jnp.where(newly, c.passes, old),
                                                     (jnp.int32(0), ws * length))

        # STOP: the first block that ends a row (finished, its predecessors finished, a generated EOS in it).
        after = _view(canvas, lengths, s)
        settled = jnp.cumprod(after.finished, axis=1).astype(bool)  # [B, N]: blocks 0..b all finished
        ending = settled & after.eos
        stop = jnp.min(jnp.where(ending, block_ids[None], n_blocks), axis=1)  # N: none
        if s.tokens.eos_id is not None:
            past = jnp.arange(s.max_length)[None] >= (stop[:, None] + 1) * length
            canvas = jnp.where(past, jnp.int32(s.tokens.pad_id), canvas)
        done = c.done | (stop < n_blocks) | settled[:, -1]

        # The leading blocks finished before this pass (or in rows now done) got clean K/V from it.
        clean = jnp.all(before.finished | done[:, None], axis=0) | (block_ids < c.start)
        new_start = jnp.min(jnp.where(~clean | (block_ids >= ws + width), block_ids, n_blocks)).astype(jnp.int32)
        model_state = settle(model_state, new_start)
        if observe:
            stream.block_done(new_start - 1, canvas)  # the last block in the cache, -1 if none
        return PipelineCarry(canvas=canvas, model_state=model_state, start=new_start, added=added, done=done,
                             rng=rng, passes=c.passes + 1, committed=committed)

    init = PipelineCarry(canvas=canvas, model_state=model_state, start=start,
                         added=(lengths // length).astype(jnp.int32), done=jnp.zeros((batch,), bool), rng=rng,
                         passes=jnp.int32(0), committed=jnp.full(canvas.shape, -1, jnp.int32) if trace else None)
    out = jax.lax.while_loop(more, body, init)
    return (out.canvas, out.passes) + ((out.committed,) if trace else ())


def _layout(denoiser: Denoiser, prompt, prompt_mask, settings: PipelineSettings):
    """Validates the request; returns (canvas int32[B, T] with each row's prompt moved left and [MASK] after it,
    lengths int32[B]) (`layout.left_aligned_canvas`)."""
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"the pipelined sampler takes a dlmjax.sampling.Denoiser, got {type(denoiser).__name__}")
    if denoiser.lead:
        raise SettingsError(f"model.arch={denoiser.config.arch!r} predicts each token from the slot before it; the "
                            "pipelined sampler samples block-diffusion models", field="model")
    return left_aligned_canvas(denoiser.config, prompt, prompt_mask, settings, PipelineSettings)


@functools.partial(jax.jit, static_argnames=("denoiser", "settings", "observe", "trace"))
def generate_pipelined(denoiser: Denoiser, params: Any, prompt: jax.Array, settings: PipelineSettings,
                       rng: jax.Array, *, prompt_mask: jax.Array | None = None, observe: bool = False,
                       trace: bool = False):
    """D2F pipelined decoding with an exact KV cache (see the module docstring), one jitted program.

    Compiled once per (denoiser, settings, prompt shape, prompt_mask given or not, observe, trace); params,
    prompt values, the prompt mask and rng are traced.

    Args:
      denoiser: static `Denoiser` of a block-diffusion model (not a shifted one).
      params: its parameter pytree.
      prompt: int[B, W]; rows shorter than `W` are padded (left or right), with `prompt_mask` False there.
      settings: static `PipelineSettings`.
      rng: PRNG key; consumed when `temperature > 0`.
      prompt_mask: bool[B, W], True on real prompt tokens; default all True.
      observe: static; hand the canvas to the host after every pass (`dlmjax.sampling.stream`, with the index of
        the last block in the cache).
      trace: static; also return the forward pass (0-based) that committed each slot.

    Returns:
      tokens: int32[B, T]: row i is its prompt (padding removed) followed by its generated slots (`pad_id` after
        the block in which the row stopped at `eos_id`).
      nfe: int32 scalar, forward passes (the first one also prefills the prompt).
      committed (only with `trace`): int32[B, T], -1 for slots no pass committed (prompt, padding).
    """
    canvas, lengths = _layout(denoiser, prompt, prompt_mask, settings)
    s, length = settings, settings.block_length
    batch, width = canvas.shape[0], s.window_blocks * length
    cache = denoiser.init_cache(batch, s.cache_length or s.max_length)
    slots = cache["key_mask"].shape[1]
    # Blocks before the shortest prompt's last full block are clean in every row: the cache starts there.
    start = (jnp.min(lengths) // length).astype(jnp.int32)
    window_mask = BlockCausal(length).dense(width, width)[None]

    def window_pass(cache, canvas, ws):
        index = ws * length
        cache = dict(cache, index=index)  # ws <= start: the slots [index, start * L') are re-forwarded
        return denoiser.forward_cached(
            params, jax.lax.dynamic_slice_in_dim(canvas, index, width, axis=1),
            positions=_positions(batch, index, width), cache=cache, update_cache=True, dense_mask=window_mask,
            cache_ranges=_prefix(cache, batch))

    # The first pass also does the PREFILL: one forward of the slots [0, F) from the empty cache, block-causal,
    # F = the prompt width's full blocks + the window (at most T), which holds every first window
    # (ws <= min(lengths) // L' <= those blocks). Its K/V of the blocks before `start` are the prompt's, clean.
    prefill = prompt.shape[1] // length * length  # static
    first_width = min(prefill + width, s.max_length)
    first_mask = BlockCausal(length).dense(first_width, first_width)[None]

    def first_pass(cache, canvas, ws):
        logits, cache = denoiser.forward_cached(
            params, canvas[:, :first_width], positions=_positions(batch, 0, first_width),
            cache=dict(cache, index=0), update_cache=True, dense_mask=first_mask,
            cache_ranges=jnp.zeros((batch, 0, 2), jnp.int32))  # nothing cached yet
        return jax.lax.dynamic_slice_in_dim(logits, ws * length, width, axis=1), cache

    def forward(cache, canvas, ws, passes):
        if first_width == width:  # no full prompt block: the first pass is a window pass at block 0
            return window_pass(cache, canvas, ws)
        return jax.lax.cond(passes == 0, first_pass, window_pass, cache, canvas, ws)

    def settle(cache, start):
        index = start * length
        return dict(cache, index=index, key_mask=jnp.broadcast_to(jnp.arange(slots) < index, (batch, slots)))

    cache = settle(cache, start)
    return _pipeline(s, canvas, lengths, start, rng, cache, forward, settle, observe, trace)


@functools.partial(jax.jit, static_argnames=("denoiser", "settings", "observe", "trace"))
def generate_pipelined_uncached(denoiser: Denoiser, params: Any, prompt: jax.Array, settings: PipelineSettings,
                                rng: jax.Array, *, prompt_mask: jax.Array | None = None, observe: bool = False,
                                trace: bool = False):
    """The slow twin of `generate_pipelined`: every pass forwards the whole canvas `[B, T]` under the
    block-causal mask, no cache. Same arguments; the same tokens, NFE and trace for the same rng."""
    canvas, lengths = _layout(denoiser, prompt, prompt_mask, settings)
    length, width = settings.block_length, settings.window_blocks * settings.block_length
    block_causal = dataclasses.replace(denoiser, mask=BlockCausal(length))

    def forward(state, canvas, ws, passes):
        logits = block_causal(params, canvas)
        return jax.lax.dynamic_slice_in_dim(logits, ws * length, width, axis=1), state

    def settle(state, start):
        return state  # every pass reads the canvas whole

    start = (jnp.min(lengths) // length).astype(jnp.int32)
    return _pipeline(settings, canvas, lengths, start, rng, None, forward, settle, observe, trace)


__all__ = ["PIPELINE_CONFIDENCES", "PipelineCarry", "PipelineSettings", "fraction_table", "generate_pipelined",
           "generate_pipelined_uncached"]
