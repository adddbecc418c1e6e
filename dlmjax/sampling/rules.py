"""Commit rules: which of a block's proposals a denoising step commits.

A rule is a small frozen strategy object (hashable, so settings that hold it stay static `jax.jit` arguments) with
a typed state that the block's inner `while_loop` carries (`None` for rules without one). `steps` is the block's
step budget `S` (static), which the settings own and pass in:

    init(n_masked int32[B], steps)                      -> state      at the block's first step
    commits(scores float[B, W], state, step, key, steps) -> (bool[B, W], state)
    more(state, step, block_masked bool[B], steps)      -> bool scalar: take another step?
    max_steps(steps, block_length)                      -> int: a static bound on the block's steps

`scores` are -inf at slots that may not be committed (clean, or outside the block). A new rule is one class here.

Fixed-count rules commit a number of slots per step that does not depend on the scores (`TransferTable`,
`DreamTransfer`, `DreamOrigin`); the parallel rules commit every slot that is confident enough, at least one
per step (`Threshold`, `Factor`, `DreamThreshold`, `EntropyBound`); `SubBlocks` restricts one of those to the first
unfinished sub-block of the block (Fast-dLLM v2). Ties in confidence go to the lower slot index
(a stable sort; `torch.topk` leaves them unspecified).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dlmjax.sampling import validation as check


# ---------------------------------------------------------------------------------------------------------------
# Selections (pure functions of the scores)


def ranks(scores: jax.Array) -> jax.Array:
    """Rank of each slot in a stable descending sort of its row, int32[B, W] (equal scores: lower index first)."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


def select_commits(scores: jax.Array, k: jax.Array) -> jax.Array:
    """Per row, the `k_j` highest-scoring slots among those with a finite score, bool[B, W].

    `lax.top_k` needs a static `k`, so each slot gets its rank in a stable descending sort and the slots with
    `rank < k_j` are chosen. Slots scored -inf are never chosen, even if `k_j` exceeds their row's eligible count.
    """
    return (ranks(scores) < k[:, None]) & (scores > -jnp.inf)


def select_threshold(scores: jax.Array, threshold: float) -> jax.Array:
    """Fast-dLLM's threshold rule over the last axis (a block's slots): the best eligible slot, plus every eligible
    slot with score >= threshold."""
    # argmax takes the first of equal maxima: the slot `ranks` puts first, without its two sorts per step.
    best = jnp.arange(scores.shape[-1]) == jnp.argmax(scores, axis=-1)[..., None]
    return (scores > -jnp.inf) & (best | (scores >= threshold))


def select_factor(scores: jax.Array, factor: float) -> jax.Array:
    """Fast-dLLM's factor rule (`get_transfer_index_dynamic`).

    With the eligible scores sorted `c_1 >= c_2 >= ... >= c_M` and thresholds `theta_1 = -1`,
    `theta_n = 1 - factor / (n + 1)`, commit the top `n*`, the number of leading ranks with `c_n >= theta_n`
    (the scan stops at the first miss); as in the reference, a first miss at the last rank `M` commits all `M`.
    """
    eligible = scores > -jnp.inf
    count = eligible.sum(axis=-1)
    rank = ranks(scores)
    ordered = jnp.take_along_axis(scores, jnp.argsort(rank, axis=-1), axis=-1)
    n = jnp.arange(1, scores.shape[-1] + 1, dtype=scores.dtype)
    theta = jnp.where(n == 1, -1.0, 1.0 - factor / (n + 1)).astype(scores.dtype)
    hit = (ordered >= theta) & (n <= count[:, None])
    leading = jnp.cumprod(hit.astype(jnp.int32), axis=-1).sum(axis=-1)
    take = jnp.where(leading == count - 1, count, leading)
    return eligible & (rank < take[:, None])


def select_entropy_bound(scores: jax.Array, bound: float) -> jax.Array:
    """The entropy-bounded rule's choice, bool[B, W], from `scores` = negative entropies (nats) of the slots.

    Per row the eligible slots are ranked by entropy, lowest first (ties: lower slot first), and the longest
    prefix whose summed entropy is <= `bound` is taken, but always at least the first slot. Entropies are clamped
    at 0: the `1e-10` inside the confidence's log can put a certain slot's score a hair above 0, and a negative
    entropy would let later slots ride on it (the clamp also keeps the prefix sums non-decreasing).
    """
    eligible = scores > -jnp.inf
    rank = ranks(scores)
    ordered = jnp.take_along_axis(scores, jnp.argsort(rank, axis=-1), axis=-1)  # highest score = lowest entropy
    # Ineligible slots sort last; an infinite entropy keeps every prefix that reaches them above any bound.
    entropy = jnp.where(ordered > -jnp.inf, jnp.maximum(-ordered, 0), jnp.inf)
    take = jnp.maximum((jnp.cumsum(entropy, axis=-1) <= bound).sum(axis=-1), 1)
    return eligible & (rank < take[:, None])


def select_sampled(scores: jax.Array, k: jax.Array, alg_temp: float, key: jax.Array) -> jax.Array:
    """Dream's `alg_temp > 0`: `k_j` slots drawn without replacement from `softmax(scores / alg_temp)`
    (the Gumbel-top-k trick: the top `k` of `scores / alg_temp + g`)."""
    eligible = scores > -jnp.inf
    noisy = scores.astype(jnp.float32) / alg_temp + jax.random.gumbel(key, scores.shape, jnp.float32)
    return select_commits(jnp.where(eligible, noisy, -jnp.inf), k)


# ---------------------------------------------------------------------------------------------------------------
# Step tables


def transfer_counts(n_masked: jax.Array, steps: int) -> jax.Array:
    """LLaDA's front-loaded transfer table (`get_num_transfer_tokens`), int32[B, steps].

    Row `j` spreads its `n_j` masked slots over `S = steps` steps as evenly as integers allow, the remainder going
    to the earliest steps: `k[j, i] = n_j // S + (i < n_j % S)`. For `n = 30, S = 8` this is
    `[4, 4, 4, 4, 4, 4, 3, 3]`; every row sums to `n_j`. (Rounding a linear schedule instead, as some ports do,
    agrees only when `S` divides `n`.)
    """
    if not check.is_int(steps) or steps < 1:
        check.fail("transfer_counts", "steps", steps, "use a static int >= 1")
    n = jnp.asarray(n_masked).astype(jnp.int32)
    if n.ndim != 1:
        raise ValueError(f"transfer_counts: n_masked must be int[batch], got shape {n.shape}")
    step = jnp.arange(steps, dtype=jnp.int32)
    return n[:, None] // steps + (step[None, :] < (n % steps)[:, None]).astype(jnp.int32)


def dream_transfer_fractions(steps: int, eps: float) -> np.ndarray:
    """Dream's per-step unmasking fraction `1 - s/t`, float32[steps] (the last step is 1: fill everything).

    `t = linspace(1, eps, steps + 1)` is built the way `torch.linspace` builds it in float32 (start + i * step for
    the first half, end - (n - 1 - i) * step for the second), then `1 - s/t` in float32, so that `int(n * fraction)`
    floors exactly where Dream's does (at 32 steps the first step commits nothing). Dream commits
    `int(n * (1 - s/t))` slots at step `i < steps - 1` and all of them at the last.
    """
    if not check.is_int(steps) or steps < 1:
        check.fail("dream_transfer_fractions", "steps", steps, "use an int >= 1")
    n = steps + 1
    start, end = np.float32(1.0), np.float32(eps)
    step = (end - start) / np.float32(n - 1)
    t = np.empty(n, np.float32)
    for i in range(n):
        t[i] = start + step * np.float32(i) if i < n // 2 else end - step * np.float32(n - 1 - i)
    fractions = (np.float32(1) - t[1:] / t[:-1]).astype(np.float32)
    fractions[-1] = 1.0
    return fractions


# ---------------------------------------------------------------------------------------------------------------
# The rules


class CommitRule(Protocol):
    """How many, and which, of a block's eligible slots a step commits (see the module docstring)."""

    def init(self, n_masked: jax.Array, steps: int) -> Any: ...

    def commits(self, scores: jax.Array, state: Any, step: jax.Array, key: jax.Array,
                steps: int) -> tuple[jax.Array, Any]: ...

    def more(self, state: Any, step: jax.Array, block_masked: jax.Array, steps: int) -> jax.Array: ...

    def max_steps(self, steps: int, block_length: int) -> int: ...


class UntilFilled:
    """Mixin of the parallel rules: no state, and the block runs until none of its slots is masked. Each step
    commits at least the best eligible slot, so a block of `L'` slots takes at most `L'` steps."""

    def init(self, n_masked, steps):
        return None

    def more(self, state, step, block_masked, steps):
        return block_masked.any()

    def max_steps(self, steps: int, block_length: int) -> int:
        return block_length


@flax.struct.dataclass
class TableState:
    table: jax.Array  # int32[B, S]: commits per row and step, fixed at the block's first step


@dataclasses.dataclass(frozen=True)
class TransferTable:
    """LLaDA's fixed schedule: step `i` commits the `table[j, i]` best slots of row `j` (`transfer_counts`), for at
    most `S` steps while a slot is masked."""

    def init(self, n_masked, steps):
        return TableState(table=transfer_counts(n_masked, steps))

    def commits(self, scores, state: TableState, step, key, steps):
        k = jnp.where(step < steps, state.table[:, jnp.minimum(step, steps - 1)], 0)
        return select_commits(scores, k), state

    def more(self, state, step, block_masked, steps):
        return block_masked.any() & (step < steps)

    def max_steps(self, steps: int, block_length: int) -> int:
        return steps


@dataclasses.dataclass(frozen=True)
class Threshold(UntilFilled):
    """Fast-dLLM's threshold rule: the best slot, plus every slot whose confidence is >= `threshold`."""

    threshold: float = 0.9

    def __post_init__(self):
        check.unit_threshold("Threshold", "threshold", self.threshold)

    def commits(self, scores, state, step, key, steps):
        return select_threshold(scores, self.threshold), state


@dataclasses.dataclass(frozen=True)
class Factor(UntilFilled):
    """Fast-dLLM's factor rule (`select_factor`): the longest confidence-ranked prefix with
    `(n + 1) * (1 - c_n) < factor`."""

    factor: float = 1.0

    def __post_init__(self):
        check.positive_real("Factor", "factor", self.factor)

    def commits(self, scores, state, step, key, steps):
        return select_factor(scores, self.factor), state


@dataclasses.dataclass(frozen=True)
class EntropyBound(UntilFilled):
    """EB-sampler's entropy-bounded unmasking (`select_entropy_bound`): the lowest-entropy slots whose entropies sum
    to at most `bound` nats, at least one per step. Needs scores that are negative entropies (a proposal with
    `confidence="entropy"`; the settings refuse any other). `bound=0` commits one slot per step (more only where
    entropies are exactly 0)."""

    bound: float = 0.1

    def __post_init__(self):
        check.nonnegative_real("EntropyBound", "bound", self.bound, off="0 commits one slot per step")

    def commits(self, scores, state, step, key, steps):
        return select_entropy_bound(scores, self.bound), state


class FixedSteps:
    """Mixin of Dream's time-based rules: no state, and the block runs exactly its `S` steps (the last one commits
    every slot still masked)."""

    def init(self, n_masked, steps):
        return None

    def more(self, state, step, block_masked, steps):
        return step < steps

    def max_steps(self, steps: int, block_length: int) -> int:
        return steps


@dataclasses.dataclass(frozen=True)
class DreamTransfer(FixedSteps):
    """Dream's `maskgit_plus` / `topk_margin` / `entropy` schedule: step `i` of `S` commits `int(n * (1 - s/t))`
    of the `n` masked slots (`dream_transfer_fractions`), all of them at the last step; `alg_temp > 0` draws
    which ones from `softmax(confidence / alg_temp)` instead of taking the best."""

    eps: float = 1e-3
    alg_temp: float = 0.0

    def __post_init__(self):
        check.open_unit("DreamTransfer", "eps", self.eps)
        check.nonnegative_real("DreamTransfer", "alg_temp", self.alg_temp, off="0 takes the top k")

    def commits(self, scores, state, step, key, steps):
        fraction = jnp.asarray(dream_transfer_fractions(steps, self.eps))[jnp.minimum(step, steps - 1)]
        n_masked = (scores > -jnp.inf).sum(axis=-1)
        k = (n_masked.astype(jnp.float32) * fraction).astype(jnp.int32)
        if self.alg_temp > 0:
            return select_sampled(scores, k, self.alg_temp, key), state
        return select_commits(scores, k), state


@dataclasses.dataclass(frozen=True)
class DreamOrigin(FixedSteps):
    """Dream's `origin`: at step `i` every masked slot is unmasked independently with probability `1 - s/t`."""

    eps: float = 1e-3

    def __post_init__(self):
        check.open_unit("DreamOrigin", "eps", self.eps)

    def commits(self, scores, state, step, key, steps):
        fraction = jnp.asarray(dream_transfer_fractions(steps, self.eps))[jnp.minimum(step, steps - 1)]
        return (scores > -jnp.inf) & (jax.random.uniform(key, scores.shape, jnp.float32) < fraction), state


@flax.struct.dataclass
class DreamThresholdState:
    number: jax.Array  # int32[B]: the fixed budget per step, n // S
    left: jax.Array  # int32[B]: rejected slots carried into the next step's budget
    limit: jax.Array  # int32[B]: the row's step count (extended while the last step rejects)


@dataclasses.dataclass(frozen=True)
class DreamThreshold:
    """Dream's `confidence_threshold` (Fast-dLLM's addition), per row: a budget of `n // S + carried` slots per
    step; the best slot always commits, the others in the budget only at confidence >= `threshold`; rejected ones
    are carried to the next step; a rejection at the last step drops the fixed budget and extends the row by one
    step. (Dream requires `S` to divide `n`; a remainder, only with pre-filled slots, starts as carried.)"""

    threshold: float = 0.9

    def __post_init__(self):
        check.unit_threshold("DreamThreshold", "threshold", self.threshold)

    def init(self, n_masked, steps):
        return DreamThresholdState(number=n_masked // steps, left=n_masked % steps,
                                   limit=jnp.full_like(n_masked, steps))

    def commits(self, scores, state: DreamThresholdState, step, key, steps):
        active = step < state.limit
        current = state.number + state.left
        rank = ranks(scores)
        in_budget = rank < current[:, None]
        accept_rest = in_budget & (rank >= 1) & (scores >= self.threshold)  # -inf never passes
        commits = ((in_budget & (rank == 0)) | accept_rest) & (scores > -jnp.inf) & active[:, None]
        rejected = jnp.maximum(current - 1, 0) - accept_rest.sum(axis=-1)
        extend = (step >= state.limit - 1) & (rejected > 0)
        new = DreamThresholdState(number=jnp.where(extend, 0, state.number), left=rejected,
                                  limit=jnp.where(extend, state.limit + 1, state.limit))
        return commits, jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state)

    def more(self, state: DreamThresholdState, step, block_masked, steps):
        return (step < state.limit).any()

    def max_steps(self, steps: int, block_length: int) -> int:
        return steps + block_length


# The rules `SubBlocks` can restrict: stateless, at least one commit per step wherever a slot is eligible.
SUB_BLOCK_RULES = (Threshold, Factor, EntropyBound)


def current_sub_block(scores: jax.Array, length: int) -> jax.Array:
    """bool[B, W]: per row, the slots of the first sub-block (slots `[k * length, (k + 1) * length)`) holding an
    eligible slot (finite score); all False in a row with none."""
    sub = jnp.arange(scores.shape[-1], dtype=jnp.int32) // length
    first = jnp.min(jnp.where(scores > -jnp.inf, sub, jnp.iinfo(jnp.int32).max), axis=-1)
    return sub == first[:, None]


@dataclasses.dataclass(frozen=True)
class SubBlocks:
    """Fast-dLLM v2's sub-block decoding: a block is finished sub-block by sub-block, left to right. Every step
    still reads the whole block's logits, but only the first sub-block of `length` slots that holds a masked slot
    may commit, by the `inner` rule (default `Threshold(0.9)`: its best masked slot plus every masked slot there
    with confidence >= 0.9). Sub-blocks are counted from the block's first slot; `length` must divide the block
    length (the settings check it). At least one commit per step, so at most `L'` steps per block."""

    length: int
    inner: CommitRule = Threshold(0.9)

    def __post_init__(self):
        check.positive_int("SubBlocks", "length", self.length)
        if not isinstance(self.inner, SUB_BLOCK_RULES):
            check.fail("SubBlocks", "inner", self.inner, "use Threshold, Factor or EntropyBound (a rule that commits "
                       "at least one slot per step and keeps no state)")

    def init(self, n_masked, steps):
        return self.inner.init(n_masked, steps)

    def commits(self, scores, state, step, key, steps):
        scores = jnp.where(current_sub_block(scores, self.length), scores, -jnp.inf)
        return self.inner.commits(scores, state, step, key, steps)

    def more(self, state, step, block_masked, steps):
        return self.inner.more(state, step, block_masked, steps)

    def max_steps(self, steps: int, block_length: int) -> int:
        return block_length


__all__ = ["CommitRule", "DreamOrigin", "DreamTransfer", "DreamThreshold", "DreamThresholdState", "EntropyBound",
           "Factor", "SUB_BLOCK_RULES", "SubBlocks", "TableState", "Threshold", "TransferTable", "current_sub_block",
           "dream_transfer_fractions", "ranks", "select_commits",
           "select_entropy_bound", "select_factor", "select_sampled", "select_threshold", "transfer_counts"]
