"""Training losses of masked diffusion LMs: MDLM's SUBS NELBO and LLaDA's pre-training / SFT losses.

All take raw logits `[B, L, V]` (any float dtype; the math runs in float32, as the references run it
in an fp32 autocast region) and clean tokens `x0 int[B, L]`. Log-probabilities are computed as
`logit[target] - logsumexp(logits)`, i.e. log-softmax read at the target, so nothing larger than
`[B, L, V]` is built. Each loss states its formula and normaliser in its docstring.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dlmjax.diffusion.schedules import Schedule

# MDLM's finite "-inf" (`neg_infinity`). Golden SUBS log-probs hold exactly this value, and anything
# that exponentiates them (KL, sampling) must see the same constant, not a true -inf.
NEG_INF = -1000000.0


def _check_mask_id(fn: str, mask_id: int, vocab: int) -> None:
    if not 0 <= mask_id < vocab:
        raise ValueError(
            f"{fn}: mask_id={mask_id} is not a logit index; SUBS needs the mask in the vocabulary "
            f"[0, {vocab}) (MDLM appends it as the last id, {vocab - 1} here)"
        )


def _log_prob_at(logits: jax.Array, tokens: jax.Array, suppress: int | None = None) -> jax.Array:
    """f32[B, L]: log-softmax of `logits` over the vocabulary, read at `tokens`.

    `suppress` adds NEG_INF to that logit first (SUBS: the model never predicts the mask).
    """
    logits, tokens = jnp.asarray(logits, jnp.float32), jnp.asarray(tokens)
    if suppress is not None:
        logits = logits.at[..., suppress].add(NEG_INF)
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _per_row(p: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """Broadcast a mask probability given as [B], [B, 1] or [B, L] to f32[B, L]."""
    p = jnp.asarray(p, jnp.float32)
    if p.ndim == 1:
        p = p[:, None]
    return jnp.broadcast_to(p, shape)


def subs_log_probs(logits: jax.Array, xt: jax.Array, mask_id: int) -> jax.Array:
    """MDLM's SUBS parameterisation (kuleshov-group/mdlm: diffusion.py, `_subs_parameterization`).

    (1) add NEG_INF to the mask logit, (2) normalise with logsumexp over the vocabulary, (3) at every
    slot with `xt != mask_id`, carry the observed token over: its entry 0, all others NEG_INF.

    Args:
      logits: float[B, L, V] raw denoiser logits.
      xt: int[B, L] noisy tokens.
      mask_id: the mask's logit index, in [0, V).

    Returns:
      f32[B, L, V] log-probabilities (finite; NEG_INF stands for -inf).
    """
    logits, xt = jnp.asarray(logits, jnp.float32), jnp.asarray(xt)
    vocab = logits.shape[-1]
    _check_mask_id("subs_log_probs", mask_id, vocab)
    logits = logits.at[..., mask_id].add(NEG_INF)
    log_probs = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    carry_over = jnp.where(jnp.arange(vocab) == xt[..., None], 0.0, NEG_INF)
    return jnp.where((xt != mask_id)[..., None], carry_over, log_probs)


def subs_target_log_probs(logits: jax.Array, x0: jax.Array, xt: jax.Array, mask_id: int) -> jax.Array:
    """`subs_log_probs` read at the clean tokens, without building the [B, L, V] log-probabilities.

    Args:
      logits: float[B, L, V] raw denoiser logits; x0, xt: int[B, L] clean and noisy tokens.
      mask_id: the mask's logit index, in [0, V).

    Returns:
      f32[B, L] `log p(x0 | xt)`: the log-softmax (mask logit suppressed) at masked slots, exactly 0 elsewhere
      (SUBS carry-over: an unmasked slot already holds its clean token).
    """
    _check_mask_id("subs_target_log_probs", mask_id, logits.shape[-1])
    log_p = _log_prob_at(logits, x0, suppress=mask_id)
    return jnp.where(jnp.asarray(xt) == mask_id, log_p, 0.0)


def mdlm_loss(
    logits: jax.Array,
    x0: jax.Array,
    xt: jax.Array,
    t: jax.Array,
    valid_mask: jax.Array,
    schedule: Schedule,
    *,
    mask_id: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Continuous-time SUBS NELBO (kuleshov-group/mdlm: diffusion.py, `_forward_pass_diffusion`, `_loss`).

    Per token `nll = -log p(x0 | xt) * weight(t)` with SUBS, so unmasked slots contribute exactly
    zero; for `LogLinearSchedule` the weight is the reference's `dsigma / expm1(sigma)` (= 1/t).
    Reduction: `sum(nll * valid) / sum(valid)`, i.e. over all valid tokens, not the masked ones.

    Args:
      logits: float[B, L, V] raw denoiser logits for `xt`.
      x0: int[B, L] clean tokens.
      xt: int[B, L] noisy tokens (`x0` or `mask_id` at each slot).
      t: f32[B] times (or f32[B, L] per-slot times, e.g. BD3-LM's per-block t repeated).
      valid_mask: bool or 0/1 [B, L]; False on padding.
      schedule: gives `weight(t)`; pass it as a static argument under `jax.jit`.
      mask_id: the mask's logit index; None means the last one, `V - 1` (MDLM's convention).

    Returns:
      (loss f32[], nll f32[B, L]) with `nll` already multiplied by `valid_mask`, as the reference's `nlls`.
    """
    vocab = logits.shape[-1]
    mask_id = vocab - 1 if mask_id is None else mask_id
    _check_mask_id("mdlm_loss", mask_id, vocab)
    log_p = subs_target_log_probs(logits, x0, xt, mask_id)
    t = jnp.asarray(t, jnp.float32)
    weight = schedule.weight(t[:, None] if t.ndim == 1 else t)
    valid = jnp.asarray(valid_mask).astype(jnp.float32)
    nll = -log_p * weight * valid
    # An all-padding batch scores 0 rather than 0/0.
    return jnp.sum(nll) / jnp.maximum(jnp.sum(valid), 1.0), nll


def llada_pretrain_loss(
    logits: jax.Array, x0: jax.Array, is_masked: jax.Array, p_mask: jax.Array
) -> jax.Array:
    """LLaDA pre-training loss (ML-GSAI/LLaDA: GUIDELINES.md).

    `(1 / (B L)) * sum over masked (b, i) of CE(logits[b, i], x0[b, i]) / p_b`; the normaliser counts
    every position, masked or not.

    Args:
      logits: float[B, L, V].
      x0: int[B, L] clean tokens.
      is_masked: bool[B, L], the slots the forward process masked.
      p_mask: f32[B], [B, 1] or [B, L] mask probability `(1 - eps) t + eps`.

    Returns:
      f32[] loss.
    """
    ce = -_log_prob_at(logits, x0)
    p = _per_row(p_mask, ce.shape)
    return jnp.sum(jnp.where(jnp.asarray(is_masked), ce / p, 0.0)) / ce.size


def llada_sft_loss(
    logits: jax.Array, x0: jax.Array, is_masked: jax.Array, p_mask: jax.Array, prompt_mask: jax.Array
) -> jax.Array:
    """LLaDA SFT loss (ML-GSAI/LLaDA: GUIDELINES.md).

    `(1 / B) * sum over masked answer slots (b, i) of CE_{b,i} / (p_b * A_b)`, with `A_b` the number of
    non-prompt slots of row `b` (EOS padding of the answer included). Prompt slots never count, even if
    `is_masked` marks them.

    Args:
      logits: float[B, L, V].
      x0: int[B, L] clean tokens.
      is_masked: bool[B, L].
      p_mask: f32[B], [B, 1] or [B, L].
      prompt_mask: bool[B, L], True on prompt slots.

    Returns:
      f32[] loss.
    """
    ce = -_log_prob_at(logits, x0)
    p = _per_row(p_mask, ce.shape)
    answer = ~jnp.asarray(prompt_mask, bool)
    # A row that is all prompt has no targets; the floor keeps its 0 / 0 out of the sum and the gradient.
    answer_length = jnp.maximum(jnp.sum(answer, axis=1, keepdims=True), 1).astype(jnp.float32)
    token_loss = ce / p / answer_length
    return jnp.sum(jnp.where(jnp.asarray(is_masked) & answer, token_loss, 0.0)) / ce.shape[0]


def masked_ce_loss(logits: jax.Array, x0: jax.Array, is_masked: jax.Array) -> jax.Array:
    """Unweighted cross-entropy averaged over masked slots (MaskGIT; MaxText's block-diffusion objective).

    Not an ELBO (no 1/t weight), but every masked slot counts equally, so rows with few masks (small t)
    no longer dominate the gradient with weights up to 1/eps. Returns a scalar; 0 if nothing is masked.

    Args:
      logits: float[B, L, V]; x0: int[B, L]; is_masked: bool[B, L].
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, x0[..., None].astype(jnp.int32), axis=-1)[..., 0]
    n = jnp.sum(is_masked)
    return jnp.sum(jnp.where(is_masked, ce, 0.0)) / jnp.maximum(n, 1)
