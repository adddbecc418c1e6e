"""Where a masked-sampler step gets its block's logits: the cache modes (Fast-dLLM's prefix and dual caches).

A cache mode is a small frozen strategy the sampler asks three things:

    keeps_kv        whether the block's first pass runs over the whole canvas keeping every slot's K/V
    chunk_length    the static number of slots a later step forwards for a block starting at `start`
    step_logits     a later step's block logits, float32[B, L', V]

`NoCache`: every step forwards the whole canvas. `PrefixCache`: the block's first step forwards the whole canvas
and keeps its K/V; later steps forward `canvas[s:]` (the block and everything after it) against the K/V of the
slots before the block. `DualCache`: the first step as for the prefix cache; later steps forward only the block,
against the K/V of every other slot from that first step (the block's own cached entries are hidden: it brings
fresh ones). Both caches are approximations by design: the cached K/V were computed while the block was still
masked. As in Fast-dLLM, a cached block takes at least one cached step after its first (`min_passes`), which
is what the reference's NFE counts.
"""
from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class NoCache:
    """Every step forwards the whole canvas (exact)."""

    keeps_kv = False
    min_passes = 0  # the commit rule alone decides
    extra_passes = 0

    def chunk_length(self, start: int, length: int, block_length: int, lead: int) -> int:
        return length

    def step_logits(self, calls, canvas, kv, block_start, block_length: int, chunk_length: int):
        return jax.lax.dynamic_slice_in_dim(calls.full(canvas), block_start, block_length, axis=1)


class _KeptCache:
    """The two Fast-dLLM caches: a later step forwards a chunk that starts at the block (minus the denoiser's
    `lead` slots, whose raw logits predict the block's first slots) against the K/V of the block's first pass,
    with the chunk's own cached slots hidden (`hidden_to`: each mode says where they end)."""

    keeps_kv = True
    min_passes = 2  # Fast-dLLM's cached loop runs at least once after the block's first pass, ...
    extra_passes = 1  # ... which may commit nothing: one pass more than the commit rule's bound

    def step_logits(self, calls, canvas, kv, block_start, block_length: int, chunk_length: int):
        start = block_start - calls.lead
        hidden_to = self.hidden_to(block_start, block_length, canvas.shape[1])
        raw = calls.chunk(canvas, kv, start, chunk_length, hidden_from=start, hidden_to=hidden_to)
        return raw[:, :block_length]


@dataclasses.dataclass(frozen=True)
class PrefixCache(_KeptCache):
    """Later steps forward the block and everything after it against the cached prefix."""

    def chunk_length(self, start: int, length: int, block_length: int, lead: int) -> int:
        return length - start + lead

    def hidden_to(self, block_start, block_length: int, length: int):
        return length  # every cached slot from the chunk on: the chunk brings fresh K/V for all of them


@dataclasses.dataclass(frozen=True)
class DualCache(_KeptCache):
    """Later steps forward only the block against the cached slots on both sides of it."""

    def chunk_length(self, start: int, length: int, block_length: int, lead: int) -> int:
        return block_length + lead

    def hidden_to(self, block_start, block_length: int, length: int):
        return block_start + block_length  # only the chunk's own slots


CacheMode = NoCache | PrefixCache | DualCache

__all__ = ["CacheMode", "DualCache", "NoCache", "PrefixCache"]
