"""LLaDA `generate` as one jitted program of two nested `lax.while_loop`s (ALGORITHMS.md §4.2, §4.10).

The canvas `int32[B, Lp + G]` holds the prompt followed by `G` slots that start as `mask_id`. The
outer loop walks the blocks left to right; at a block's start it counts the block's masks per row and
builds the `[B, S]` transfer table (`S = steps // num_blocks`). The inner loop runs the block's `S`
steps. Each step is one forward over the whole canvas (no KV cache yet) followed by the update, built
from small pure functions that later samplers extend:

    guided_logits -> (EOS logit -> -inf) -> propose -> confidence -> restrict_to_block
                  -> select_commits -> commit

Committed tokens are never re-masked. Mask counts and commit counts stay on device: nothing inside
the loops syncs with the host.

Random numbers: the carried key is split once per step (`step_keys`) into the next carried key, the
key of the Gumbel noise (`temperature > 0`) and the key of the uniform confidences (`"random"`).

Where dlmjax departs from the reference (ML-GSAI/LLaDA `generate.py`) on purpose:
  - Only masked slots inside the current block are eligible. LLaDA also lets masks before the block
    compete (none exist in normal use); here a mask in the prompt is left as it is.
  - A row commits at most its eligible slots. LLaDA's `topk` would, if `k` exceeded them, write
    proposals after the block; the transfer table never asks for that unless the denoiser proposes
    `mask_id` itself.
  - Classifier-free guidance works with or without a `prompt_mask` (the reference needs one).
  - Ties in confidence go to the lower slot index (stable sort); `torch.topk` leaves them unspecified.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dlmjax.sampling.schedule import transfer_counts
from dlmjax.sampling.settings import SamplerSettings

# denoiser(params, tokens int32[B, N], key_mask bool[B, N]) -> logits float[B, N, V]. It is a static
# argument of the jitted sampler, so it must be hashable (e.g. a frozen dataclass); its parameters
# are always passed in, never closed over, so they are not baked into the compiled program.
Denoiser = Callable[[Any, jax.Array, jax.Array], jax.Array]


def step_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Splits the carried key into (next carried key, Gumbel-noise key, confidence key)."""
    rng, step_rng = jax.random.split(rng)
    gumbel_key, confidence_key = jax.random.split(step_rng)
    return rng, gumbel_key, confidence_key


def guided_logits(
    denoiser: Denoiser,
    params: Any,
    canvas: jax.Array,
    key_mask: jax.Array,
    *,
    prompt_length: int,
    cfg_scale: float,
    mask_id: int,
) -> jax.Array:
    """Logits for every canvas slot, with classifier-free guidance when `cfg_scale > 0`.

    Guidance runs ONE forward over the batch doubled with an unconditional copy in which every
    prompt slot (padding included, as in LLaDA) holds `mask_id`, and mixes the halves as
    `u + (w + 1) * (c - u)`. Both halves use the same key mask.

    Args:
      canvas: int32[B, N], prompt then generation slots.
      key_mask: bool[B, N], True where a slot may be attended to (False on left padding).
      prompt_length: static `Lp`; slots `[0, Lp)` are the prompt.

    Returns:
      float[B, N, V] logits in the denoiser's dtype.
    """
    batch, length = canvas.shape
    if cfg_scale == 0:
        logits = denoiser(params, canvas, key_mask)
    else:
        is_prompt = jnp.arange(length) < prompt_length
        unconditional = jnp.where(is_prompt[None, :], jnp.int32(mask_id), canvas)
        both = denoiser(
            params,
            jnp.concatenate([canvas, unconditional], axis=0),
            jnp.concatenate([key_mask, key_mask], axis=0),
        )
        _check_logits(both, 2 * batch, length)
        cond, uncond = both[:batch], both[batch:]
        logits = uncond + (cfg_scale + 1.0) * (cond - uncond)
    _check_logits(logits, batch, length)
    return logits


def propose(logits: jax.Array, temperature: float, key: jax.Array) -> jax.Array:
    """Proposed token per slot, int32[B, N], from logits float[B, N, V].

    `temperature == 0` is the argmax of the raw logits (no dtype change, ties to the lower id).
    Otherwise it is the Gumbel-max draw `argmax(logits + T * g)`, which equals LLaDA's
    `argmax(exp(logits) / (-log u)^T)`, i.e. a sample from `softmax(logits / T)`. Logits and noise
    are float64 when `jax_enable_x64` is on, as in LLaDA (low-precision Gumbel lowers entropy,
    arXiv 2409.02908); without x64 JAX has no float64 and both are float32.
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 unless x64 is enabled
    gumbel = jax.random.gumbel(key, logits.shape, dtype)
    return jnp.argmax(logits.astype(dtype) + temperature * gumbel, axis=-1).astype(jnp.int32)


def confidence(logits: jax.Array, proposal: jax.Array, remasking: str, key: jax.Array) -> jax.Array:
    """Score that ranks slots for commitment, float32[B, N] (higher commits first).

    "low_confidence": `softmax(logits)[proposal]`, with the softmax in the logits' dtype as in the
    LLaDA reference (float32 logits give float32 confidences; bfloat16 ones tie more often).
    "random": a uniform draw per slot.
    """
    if remasking == "low_confidence":
        probs = jax.nn.softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(probs, proposal[..., None], axis=-1)[..., 0]
        return chosen.astype(jnp.float32)
    if remasking == "random":
        return jax.random.uniform(key, proposal.shape, jnp.float32)
    raise ValueError(f"remasking={remasking!r} is not allowed; choose one of ['low_confidence', 'random']")


def restrict_to_block(
    scores: jax.Array, canvas: jax.Array, *, mask_id: int, block_start: jax.Array, block_length: int
) -> jax.Array:
    """Sets scores to -inf except at masked slots in `[block_start, block_start + block_length)`.

    Args:
      scores: float32[B, N] confidences.
      canvas: int32[B, N] current tokens.
      block_start: int32 scalar (traced), first canvas slot of the current block.
    """
    position = jnp.arange(canvas.shape[1], dtype=jnp.int32)
    in_block = (position >= block_start) & (position < block_start + block_length)
    eligible = (canvas == mask_id) & in_block[None, :]
    return jnp.where(eligible, scores, -jnp.inf)


def select_commits(scores: jax.Array, k: jax.Array) -> jax.Array:
    """Per row, the `k_j` highest-scoring slots among those with a finite score.

    `lax.top_k` needs a static `k`, so each slot gets its rank in a stable descending sort
    (equal scores: lower index first) and the slots with `rank < k_j` are chosen. Slots scored -inf
    are never chosen, even if `k_j` exceeds their row's eligible count.

    Args:
      scores: float32[B, N], -inf where a slot may not be committed.
      k: int[B], commits wanted per row.

    Returns:
      bool[B, N], True where a proposal is committed.
    """
    order = jnp.argsort(-scores, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    return (rank < k[:, None]) & (scores > -jnp.inf)


def commit(canvas: jax.Array, proposal: jax.Array, commits: jax.Array) -> jax.Array:
    """Writes `proposal` into the canvas where `commits` is True; int32[B, N]."""
    return jnp.where(commits, proposal, canvas)


def denoise_step(
    denoiser: Denoiser,
    params: Any,
    canvas: jax.Array,
    key_mask: jax.Array,
    *,
    settings: SamplerSettings,
    prompt_length: int,
    block_start: jax.Array,
    k: jax.Array,
    gumbel_key: jax.Array,
    confidence_key: jax.Array,
) -> jax.Array:
    """One forward pass and one canvas update; returns the new canvas int32[B, N].

    Args:
      canvas: int32[B, N]; key_mask: bool[B, N].
      block_start: int32 scalar, first canvas slot of the current block.
      k: int32[B], commits for this step (a column of the block's transfer table).
    """
    logits = guided_logits(
        denoiser, params, canvas, key_mask,
        prompt_length=prompt_length, cfg_scale=settings.cfg_scale, mask_id=settings.mask_id,
    )
    if settings.logits_eos_inf:
        vocab = logits.shape[-1]
        if settings.eos_id >= vocab:
            # An out-of-range `.at[].set` would be dropped silently and EOS left in play.
            raise ValueError(
                f"SamplerSettings.eos_id={settings.eos_id} is not a logit index of a denoiser with "
                f"vocabulary size {vocab}; use an id in [0, {vocab})")
        logits = logits.at[..., settings.eos_id].set(-jnp.inf)
    proposal = propose(logits, settings.temperature, gumbel_key)
    scores = confidence(logits, proposal, settings.remasking, confidence_key)
    scores = restrict_to_block(
        scores, canvas, mask_id=settings.mask_id, block_start=block_start,
        block_length=settings.block_length,
    )
    return commit(canvas, proposal, select_commits(scores, k))


def check_request(prompt, settings, settings_type) -> jax.Array:
    """The static checks every sampler makes before tracing: the settings' type and an int[B, Lp] prompt."""
    if not isinstance(settings, settings_type):
        raise TypeError(f"settings must be a {settings_type.__name__}, got {type(settings).__name__}")
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be int[batch, prompt_length], got {prompt.dtype}{list(prompt.shape)}")
    return prompt


@functools.partial(jax.jit, static_argnames=("denoiser", "settings", "return_history"))
def generate(
    denoiser: Denoiser,
    params: Any,
    prompt: jax.Array,
    settings: SamplerSettings,
    rng: jax.Array,
    *,
    prompt_mask: jax.Array | None = None,
    return_history: bool = False,
):
    """Generates `settings.gen_length` tokens after each prompt row (LLaDA `generate`).

    Compiled once per (denoiser, settings, shapes, return_history, prompt_mask given or not);
    params, prompt values, prompt_mask values and rng are traced, so new values never recompile.

    Args:
      denoiser: static, hashable `denoiser(params, tokens, key_mask) -> logits`, see `Denoiser`.
      params: the denoiser's parameter pytree.
      prompt: int[B, Lp]; rows shorter than `Lp` are left-padded (pad id != mask_id).
      settings: static `SamplerSettings`.
      rng: PRNG key; only consumed when `temperature > 0` or `remasking == "random"`.
      prompt_mask: bool[B, Lp], True on real prompt tokens; default all True. Extended with True
        over the generation slots, it is the key mask handed to the denoiser.
      return_history: static debugging switch; also return the canvas after every step.

    Returns:
      tokens: int32[B, Lp + G], the prompt followed by the generated tokens.
      nfe: int32 scalar, denoiser forward passes run (a CFG doubled-batch pass counts once);
        equals `settings.steps`.
      history (only if `return_history`): int32[steps, B, Lp + G], the canvas after each step.
    """
    prompt = check_request(prompt, settings, SamplerSettings)
    batch, prompt_length = prompt.shape
    gen_length = settings.gen_length
    if prompt_mask is None:
        prompt_mask = jnp.ones((batch, prompt_length), dtype=bool)
    elif prompt_mask.shape != prompt.shape:
        raise ValueError(
            f"prompt_mask must have the prompt's shape {list(prompt.shape)}, got {list(prompt_mask.shape)}")
    key_mask = jnp.concatenate(
        [prompt_mask.astype(bool), jnp.ones((batch, gen_length), dtype=bool)], axis=1)
    canvas = jnp.concatenate(
        [prompt.astype(jnp.int32), jnp.full((batch, gen_length), settings.mask_id, dtype=jnp.int32)],
        axis=1)
    steps_per_block = settings.steps_per_block
    history = (jnp.zeros((settings.steps,) + canvas.shape, jnp.int32) if return_history else None)

    def block_cond(carry):
        block = carry[0]
        return block < settings.num_blocks

    def block_body(carry):
        block, canvas, rng, nfe, history = carry
        block_start = prompt_length + block * settings.block_length
        position = jnp.arange(canvas.shape[1], dtype=jnp.int32)
        in_block = (position >= block_start) & (position < block_start + settings.block_length)
        n_masked = jnp.sum((canvas == settings.mask_id) & in_block[None, :], axis=1, dtype=jnp.int32)
        table = transfer_counts(n_masked, steps_per_block)  # [B, S], fixed for the whole block

        def step_cond(carry):
            step = carry[0]
            return step < steps_per_block

        def step_body(carry):
            step, canvas, rng, nfe, history = carry
            rng, gumbel_key, confidence_key = step_keys(rng)
            canvas = denoise_step(
                denoiser, params, canvas, key_mask,
                settings=settings, prompt_length=prompt_length, block_start=block_start,
                k=table[:, step], gumbel_key=gumbel_key, confidence_key=confidence_key,
            )
            if history is not None:
                history = history.at[block * steps_per_block + step].set(canvas)
            return step + 1, canvas, rng, nfe + 1, history

        _, canvas, rng, nfe, history = jax.lax.while_loop(
            step_cond, step_body, (jnp.int32(0), canvas, rng, nfe, history))
        return block + 1, canvas, rng, nfe, history

    _, canvas, _, nfe, history = jax.lax.while_loop(
        block_cond, block_body, (jnp.int32(0), canvas, rng, jnp.int32(0), history))
    if return_history:
        return canvas, nfe, history
    return canvas, nfe


def _check_logits(logits: jax.Array, batch: int, length: int) -> None:
    if logits.ndim != 3 or logits.shape[:2] != (batch, length):
        raise ValueError(
            f"the denoiser must return logits [batch={batch}, length={length}, vocab], "
            f"got shape {list(logits.shape)}")
