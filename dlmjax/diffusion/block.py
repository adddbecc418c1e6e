"""Block diffusion (BD3-LM) pieces that do not touch the model.

The BD3-LM objective factorises `log p(x)` over blocks of `L'` tokens and trains all blocks in one pass:
the model reads `[x_t ; x_0]` (2L slots, both halves at positions 0..L-1) under
`kernels_pallas.masks.Bd3Training`, and only the `x_t` half is scored. Each (row, block) has its own
time `t`; BD3's log-linear schedule masks with probability `p = t` (no `1 - eps` factor) and weighs a
masked slot by `1/t`. Block size 1 with `t = 1` is autoregression, block size L is MDLM.

The composition with the model lives in `dlmjax.train.objective` (`bd3_loss_terms`, `bd3_loss`).
"""
from __future__ import annotations

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


def sample_block_times(key: jax.Array, batch: int, length: int, block_size: int, clip_min: float = 1e-3,
                       clip_max: float = 1.0, antithetic: bool = True) -> jax.Array:
    """f32[batch, length]: `block_times` on fresh f32[batch, length // block_size] uniforms from `key`."""
    u = jax.random.uniform(key, (batch, length // block_size), jnp.float32)
    return block_times(u, block_size, clip_min, clip_max, antithetic)


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
