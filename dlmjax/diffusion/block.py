"""Block diffusion (BD3-LM) pieces that do not touch the model.

The BD3-LM objective factorises `log p(x)` over blocks of `L'` tokens and trains all blocks in one pass:
the model reads `[x_t ; x_0]` (2L slots, both halves at positions 0..L-1) under
`kernels_pallas.masks.Bd3Training`, and only the `x_t` half is scored. Each (row, block) has its own
time `t`; BD3's log-linear schedule masks with probability `p = t` (no `1 - eps` factor) and weighs a
masked slot by `1/t`. Block size 1 with `t = 1` is autoregression, block size L is MDLM.

Two ways to draw the per-block times (`BlockTimes`, named by `diffusion.block_times`): `IndependentTimes`
(BD3: one antithetic uniform per (row, block)) and `MonotonicTimes` (D2F, Discrete Diffusion Forcing: within a row
the noise level never decreases from one block to the next, so later blocks are noisier, as they are when several
blocks are decoded at once).

Shifted models (Dream, `Denoiser.lead == 1`: raw logit row i predicts slot i + 1) read their predictions one row
early; `align_block_logits` is the one place that knows which row of which stream predicts a block's slot, and
`has_predecessor` marks the slots that have such a row at all.

The composition with the model lives in `dlmjax.train.objective` (`bd3_loss_terms`, `bd3_loss`).
"""
from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp

from dlmjax.diffusion.losses import subs_target_log_probs
from dlmjax.diffusion.masks import check_block_size


def resolve_block_size(block_size: int, length: int) -> int:
    """The block length L' for rows of `length` (0 means one block, `length`); raises unless it divides it."""
    block_size = block_size or length
    check_block_size(length, block_size, owner="bd3 objective")
    return block_size


def block_times(u_blocks: jax.Array, block_size: int, clip_min: float = 1e-3, clip_max: float = 1.0,
                antithetic: bool = True) -> jax.Array:
    """Per-token times from per-(row, block) uniforms (kuleshov-group/bd3lms: diffusion.py, `_sample_t`).

    With `antithetic`, the `n = B * n_blocks` uniforms are stratified over all entries, row-major:
    `u_j <- (u_j / n + j / n) mod 1`. Each block's value is repeated over its `block_size` tokens and
    clipped to `t = clip_min + (clip_max - clip_min) u`; if `clip_min >= 1` and `clip_max >= 1`, `t = 1`
    everywhere (every noisy slot masked: the AR check).

    Args:
      u_blocks: f32[B, n_blocks] uniforms in [0, 1).
      block_size: L'; the result has `n_blocks * L'` columns.
      clip_min, clip_max: beta and omega of the clipped schedule (Python floats: they are static).
      antithetic: stratify over the batch and the blocks.

    Returns:
      f32[B, n_blocks * block_size] times, constant within each block.
    """
    u = jnp.asarray(u_blocks, jnp.float32)
    if u.ndim != 2:
        raise ValueError(f"block_times: u_blocks must be f32[batch, n_blocks], got shape {u.shape}")
    if antithetic:
        n = u.size
        offset = (jnp.arange(n, dtype=jnp.float32) / n).reshape(u.shape)
        u = jnp.mod(u / n + offset, 1.0)  # the reference's float order
    t = jnp.repeat(u, block_size, axis=1)
    if clip_min >= 1.0 and clip_max >= 1.0:
        return jnp.ones_like(t)
    return t * (clip_max - clip_min) + clip_min


def monotonic_block_times(u_blocks: jax.Array, block_size: int, clip_min: float = 0.2, clip_max: float = 0.7,
                          antithetic: bool = True) -> jax.Array:
    """Per-token times that never decrease along a row's blocks (D2F's monotonic mask ratios).

    With `n = n_blocks`, `lo = clip_min`, `hi = clip_max` and per row: the first block's time is
    `t_0 = lo + (hi - lo) u_0`; block k >= 1 adds an increment `(hi - t_0) / (n - 1) * u_k`, so every increment
    lies in `[0, (hi - t_0) / (n - 1)]` and the last block's time is at most `hi`. Each block's value is repeated
    over its `block_size` tokens and clipped to `[lo, hi]` (a no-op but for rounding). D2F draws `t_0` in
    `[0.2, 0.7]`; one block (`n = 1`) is just `t_0`; `clip_min = clip_max = 1` is `t = 1` everywhere.

    Args:
      u_blocks: f32[B, n_blocks] uniforms in [0, 1): column 0 draws `t_0`, column k >= 1 the k-th increment.
      block_size: L'; the result has `n_blocks * L'` columns.
      clip_min, clip_max: the interval the times lie in (Python floats: they are static).
      antithetic: stratify the B first-block uniforms over the batch, `u_0 <- (u_0 / B + j / B) mod 1` (the
        increments stay independent: a row's ramp is what D2F draws).

    Returns:
      f32[B, n_blocks * block_size] times, constant within each block and non-decreasing along each row.
    """
    u = jnp.asarray(u_blocks, jnp.float32)
    if u.ndim != 2:
        raise ValueError(f"monotonic_block_times: u_blocks must be f32[batch, n_blocks], got shape {u.shape}")
    rows, n_blocks = u.shape
    first = u[:, 0]
    if antithetic:
        first = jnp.mod(first / rows + jnp.arange(rows, dtype=jnp.float32) / rows, 1.0)
    t0 = clip_min + (clip_max - clip_min) * first
    step = (clip_max - t0) / max(n_blocks - 1, 1)  # the widest increment that keeps the last block <= clip_max
    rises = jnp.cumsum(u[:, 1:], axis=1) * step[:, None]
    t = jnp.concatenate([t0[:, None], t0[:, None] + rises], axis=1)
    # clip_min = clip_max = 1 gives t0 = 1 and no rise: t = 1 everywhere (the AR check) without a special case.
    return jnp.repeat(jnp.clip(t, clip_min, clip_max), block_size, axis=1)


@dataclasses.dataclass(frozen=True)
class BlockTimes(abc.ABC):
    """How per-block times come from per-(row, block) uniforms (`diffusion.block_times`); hashable, jit-static."""

    @abc.abstractmethod
    def from_uniforms(self, u_blocks: jax.Array, block_size: int, clip_min: float, clip_max: float,
                      antithetic: bool) -> jax.Array:
        """f32[B, n_blocks] uniforms -> f32[B, n_blocks * block_size] times in [clip_min, clip_max]."""


@dataclasses.dataclass(frozen=True)
class IndependentTimes(BlockTimes):
    """BD3-LM: each (row, block) draws its own time (`block_times`)."""

    def from_uniforms(self, u_blocks, block_size, clip_min, clip_max, antithetic):
        return block_times(u_blocks, block_size, clip_min, clip_max, antithetic)


@dataclasses.dataclass(frozen=True)
class MonotonicTimes(BlockTimes):
    """D2F: times non-decreasing along a row's blocks (`monotonic_block_times`)."""

    def from_uniforms(self, u_blocks, block_size, clip_min, clip_max, antithetic):
        return monotonic_block_times(u_blocks, block_size, clip_min, clip_max, antithetic)


# The values of `diffusion.block_times`.
BLOCK_TIMES: dict[str, BlockTimes] = {"independent": IndependentTimes(), "monotonic": MonotonicTimes()}


def sample_block_times(key: jax.Array, batch: int, length: int, block_size: int, clip_min: float = 1e-3,
                       clip_max: float = 1.0, antithetic: bool = True,
                       times: BlockTimes = IndependentTimes()) -> jax.Array:
    """f32[batch, length]: `times` on fresh f32[batch, length // block_size] uniforms from `key`."""
    u = jax.random.uniform(key, (batch, length // block_size), jnp.float32)
    return times.from_uniforms(u, block_size, clip_min, clip_max, antithetic)


def two_stream_inputs(xt: jax.Array, x0: jax.Array, valid_mask: jax.Array):
    """The vectorised BD3 input `[x_t ; x_0]`.

    Args:
      xt, x0: int[B, L] noisy and clean tokens.
      valid_mask: bool[B, L], False on padding.

    Returns:
      (tokens int[B, 2L], positions int32[B, 2L] = 0..L-1 twice, so slot i of each half shares rotary
      position i; key_mask bool[B, 2L], the padding mask on both halves).
    """
    b, length = x0.shape
    tokens = jnp.concatenate([xt, x0], axis=1)
    positions = jnp.broadcast_to(jnp.tile(jnp.arange(length, dtype=jnp.int32), 2), (b, 2 * length))
    valid = jnp.asarray(valid_mask, bool)
    return tokens, positions, jnp.concatenate([valid, valid], axis=1)


def bd3_weight(t: jax.Array, clip_min: float) -> jax.Array:
    """ELBO weight of a masked slot: `1/t` (log-linear, `p = t`).

    Reference quirk, reproduced: when `clip_min > 0.5` the weight is 1 instead
    (`LogLinearNoise` scale replaced by -1 in `_forward_pass_diffusion`). It exists for the `t = 1` AR
    check, where both agree, but it also turns any clipped schedule with `clip_min > 0.5` into an
    unweighted (biased) loss.
    """
    t = jnp.asarray(t, jnp.float32)
    return jnp.ones_like(t) if clip_min > 0.5 else 1.0 / t


def bd3_token_nll(logits: jax.Array, x0: jax.Array, xt: jax.Array, t: jax.Array, mask_id: int,
                  clip_min: float) -> jax.Array:
    """f32[B, L] per-token NELBO terms `-log p(x0 | xt) * weight(t)`, SUBS style (0 at unmasked slots).

    Args:
      logits: float[B, L, V], the `x_t` half of the model output (full vocabulary; the mask logit is
        suppressed here, as SUBS does).
      x0, xt: int[B, L]; t: f32[B, L] per-token times; mask_id: the mask's logit index.
      clip_min: selects the weight (`bd3_weight`).
    """
    log_p = subs_target_log_probs(logits, x0, xt, mask_id)
    return -log_p * bd3_weight(t, clip_min)


def has_predecessor(valid_mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """bool[B, L]: slots a shifted model can predict, i.e. whose previous slot is a real token of the same document.

    Slot 0, a slot after padding and the first slot of a packed document (`segment_ids` changes) have no row before
    them to read a prediction from: a shifted objective never scores them (slot 0 is BOS or prompt anyway).
    """
    valid = jnp.asarray(valid_mask, bool)
    previous = jnp.concatenate([jnp.zeros_like(valid[:, :1]), valid[:, :-1]], axis=1)
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids)
        previous = previous & jnp.concatenate([jnp.zeros_like(valid[:, :1]), seg[:, 1:] == seg[:, :-1]], axis=1)
    return previous


def align_block_logits(noisy: jax.Array, clean: jax.Array, block_size: int, lead: int) -> jax.Array:
    """Position-aligned logits f32[B, L, V] (row i predicts slot i) from the raw logits of the streams a model read.

    Unshifted models (`lead == 0`) predict slot i at row i of the noisy stream: `noisy` is returned as is. A shifted
    model (`lead == 1`) predicts slot i from row i - 1: of the noisy stream when slot i is not the first of its block
    (row i - 1 then lies in the same block and sees the block's x_t), and of `clean` when it is (row i - 1 is the
    last slot of the previous block; in BD3's clean stream it sees exactly the clean prefix x_0 of the earlier
    blocks, which is what block b is conditioned on). A noisy-context objective has no clean stream and passes
    `clean = noisy`: a block's first slot is then predicted from the previous, partly masked block. Slot 0 has no
    row before it and keeps `noisy[:, 0]`, a placeholder that is never scored (`has_predecessor`).

    Args:
      noisy: float[B, L, V] raw logits of the x_t stream; clean: float[B, L, V] raw logits of the x_0 stream.
      block_size: L', a divisor of L.
      lead: `Denoiser.lead`, 0 or 1.
    """
    if lead == 0:
        return noisy
    if lead != 1:
        raise ValueError(f"align_block_logits: lead={lead} is not supported; models predict slot i from row i or i - 1")
    length = noisy.shape[1]
    first_of_block = (jnp.arange(length) % block_size == 0)[None, :, None]
    previous = jnp.where(first_of_block[:, 1:], clean[:, :-1], noisy[:, :-1])
    return jnp.concatenate([noisy[:, :1], previous], axis=1)
