"""Training objectives and the held-out NELBO, as pure functions of (params, batch, rng).

A batch is a dict of arrays `[B, L]`: `tokens` int32 (x_0), `prompt_mask` bool (slots that are never noised),
`valid_mask` bool (False on padding: never noised, never attended to, never scored). Packed rows
(`dlmjax.data.packing`) also carry `segment_ids` int32 and `positions` int32 `[B, L]`: attention stays inside a
document and rotary positions restart at 0 per document.

The bd3 objective has two settings that D2F (Discrete Diffusion Forcing) training changes, on one code path: how
the per-block times are drawn (`dlmjax.diffusion.block.BlockTimes`) and what a block is conditioned on
(`BlockContext`: `CleanContext` is BD3's [x_t ; x_0], `NoisyContext` is D2F's x_t alone under the block-causal
mask). Shifted models (Dream) are scored one row early (`dlmjax.diffusion.block.align_block_logits`).
"""
from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp

from dlmjax.config import DiffusionConfig, ModelConfig
from dlmjax.diffusion import block, forward, losses, schedules
from dlmjax.sampling.denoiser import Denoiser
from kernels_pallas.masks import Bd3Training, BlockCausal
from dlmjax.models.transformer import build_model

# BD3-LM's unbiased clipped schedule: the NELBO it reports.
BD3_NELBO_CLIP = (1e-3, 1.0)


def _schedule(cfg: DiffusionConfig):
    return schedules.get_schedule(cfg.schedule, **({"eps": cfg.eps} if cfg.schedule in ("loglinear", "llada") else {}))


def _protected(batch, cfg: DiffusionConfig):
    protect = ~batch["valid_mask"]
    if cfg.objective in ("llada_sft", "masked_ce", "bd3"):  # a prompt is clean context, never a target
        protect = protect | batch["prompt_mask"]
    return protect


def _packing_kwargs(batch) -> dict:
    """`segment_ids` / `positions` model arguments of a packed batch ({} for unpacked batches)."""
    return {key: batch[key] for key in ("segment_ids", "positions") if key in batch}


def _metrics(loss, logits, x0, is_masked):
    masked_acc = jnp.sum((jnp.argmax(logits, -1) == x0) & is_masked) / jnp.maximum(jnp.sum(is_masked), 1)
    return {"loss": loss, "masked_accuracy": masked_acc, "masked_fraction": jnp.mean(is_masked)}


@dataclasses.dataclass(frozen=True)
class BlockContext(abc.ABC):
    """What the bd3 model reads, and so what each block is conditioned on (`diffusion.context`); jit-static."""

    @abc.abstractmethod
    def raw_logits(self, model_cfg: ModelConfig, params, xt, x0, valid_mask, block_size: int, packing: dict):
        """Raw logits (noisy stream f32[B, L, V], clean stream f32[B, L, V]) of one forward pass.

        Args: xt, x0 int[B, L]; valid_mask bool[B, L]; block_size L'; packing: the batch's `positions` /
        `segment_ids` ([B, L]) if it has them.
        """


@dataclasses.dataclass(frozen=True)
class CleanContext(BlockContext):
    """BD3-LM: `[x_t ; x_0]` (2L slots) under `Bd3Training(L, L')`, both halves at the same positions; block b's
    noisy slots see their own block and the clean blocks before it."""

    def raw_logits(self, model_cfg, params, xt, x0, valid_mask, block_size, packing):
        length = x0.shape[1]
        tokens, positions, key_mask = block.two_stream_inputs(xt, x0, valid_mask)
        extra = {}
        if "positions" in packing:  # packed rows: per-document positions, the same on both halves
            positions = jnp.tile(packing["positions"].astype(jnp.int32), (1, 2))
        if "segment_ids" in packing:  # blocks never straddle documents, so BD3's block rule composes with segments
            extra["segment_ids"] = jnp.tile(packing["segment_ids"], (1, 2))
        model = build_model(model_cfg, Bd3Training(length, block_size))
        logits = model.apply({"params": params}, tokens, positions=positions, key_mask=key_mask, **extra)
        return logits[:, :length], logits[:, length:]


@dataclasses.dataclass(frozen=True)
class NoisyContext(BlockContext):
    """D2F: `x_t` alone (L slots) under `BlockCausal(L')`; block b sees itself and the earlier blocks as they are in
    x_t, partly masked. There is no clean stream: both returned streams are the one forward."""

    def raw_logits(self, model_cfg, params, xt, x0, valid_mask, block_size, packing):
        model = build_model(model_cfg, BlockCausal(block_size))
        logits = model.apply({"params": params}, xt, key_mask=valid_mask, **packing)
        return logits, logits


# The values of `diffusion.context`.
CONTEXTS: dict[str, BlockContext] = {"clean": CleanContext(), "noisy": NoisyContext()}


def bd3_loss_terms(params, batch, t, u, *, model_cfg: ModelConfig, diff_cfg: DiffusionConfig):
    """The BD3-LM objective with its randomness given: AR, block diffusion, MDLM and D2F.

    Masks `x_t = mask_id` where `u <= t` (inclusive, as BD3) outside protected slots (padding, prompts), runs
    the model once as `diffusion.context` says (`clean`: `[x_t ; x_0]` under `Bd3Training(L, L')` with positions
    0..L-1 on both halves and the padding key mask on both; `noisy`: `x_t` under `BlockCausal(L')`), and scores
    the `x_t` stream: per token `-log p(x_0 | x_t) / t` at masked slots (SUBS: mask logit suppressed, carry-over 0
    elsewhere; weight 1 when clip_min > 0.5). Shifted models read slot i's prediction from row i - 1
    (`block.align_block_logits`) and never score a slot without a real token before it (`block.has_predecessor`).

    Args:
      params: model parameters.
      batch: `tokens`, `prompt_mask`, `valid_mask`, each [B, L] (packed rows: also `segment_ids`, `positions`).
      t: f32[B, L] per-token times, constant within each block (`block.block_times`).
      u: f32[B, L] masking uniforms.

    Returns:
      (loss f32[] = sum of nll / number of scored tokens, aux) with aux `nll` f32[B, L] (0 off scored
      slots), `scored` bool[B, L] (valid, not prompt, and for shifted models with a predecessor), `is_masked`
      bool[B, L], `logits` f32[B, L, V] position-aligned (row i predicts slot i).
    """
    x0 = batch["tokens"]
    length = x0.shape[1]
    if t.shape != x0.shape or u.shape != x0.shape:
        raise ValueError(f"bd3_loss_terms: t {t.shape} and u {u.shape} must both have the tokens' shape {x0.shape}")
    block_size = block.resolve_block_size(diff_cfg.block_size, length)
    lead = Denoiser(model_cfg).lead
    protect = _protected(batch, diff_cfg)
    if lead:
        protect = protect | ~block.has_predecessor(batch["valid_mask"], batch.get("segment_ids"))
    xt, is_masked = forward.forward_sample(x0, t, u, diff_cfg.mask_id, protect=protect, inclusive=True)
    noisy, clean = CONTEXTS[diff_cfg.context].raw_logits(model_cfg, params, xt, x0, batch["valid_mask"],
                                                         block_size, _packing_kwargs(batch))
    logits = block.align_block_logits(noisy, clean, block_size, lead)
    scored = ~protect
    nll = jnp.where(scored, block.bd3_token_nll(logits, x0, xt, t, diff_cfg.mask_id, diff_cfg.clip_min), 0.0)
    loss = jnp.sum(nll) / jnp.maximum(jnp.sum(scored), 1)
    return loss, {"nll": nll, "scored": scored, "is_masked": is_masked, "logits": logits}


def bd3_loss(params, batch, rng, *, model_cfg: ModelConfig, diff_cfg: DiffusionConfig):
    """`bd3_loss_terms` with t (one per row and block, drawn as `diffusion.block_times` says, clipped) and u
    drawn from `rng`."""
    x0 = batch["tokens"]
    b, length = x0.shape
    t_rng, u_rng = jax.random.split(rng)
    block_size = block.resolve_block_size(diff_cfg.block_size, length)
    t = block.sample_block_times(t_rng, b, length, block_size, diff_cfg.clip_min, diff_cfg.clip_max,
                                 diff_cfg.antithetic, times=block.BLOCK_TIMES[diff_cfg.block_times])
    u = jax.random.uniform(u_rng, x0.shape, jnp.float32)
    return bd3_loss_terms(params, batch, t, u, model_cfg=model_cfg, diff_cfg=diff_cfg)


def diffusion_loss(params, batch, rng, *, model_cfg: ModelConfig, diff_cfg: DiffusionConfig):
    """Scalar training loss and a dict of scalar metrics for the configured objective."""
    x0 = batch["tokens"]
    if diff_cfg.objective == "bd3":
        loss, aux = bd3_loss(params, batch, rng, model_cfg=model_cfg, diff_cfg=diff_cfg)
        return loss, _metrics(loss, aux["logits"], x0, aux["is_masked"])
    b = x0.shape[0]
    t_rng, u_rng = jax.random.split(rng)
    schedule = _schedule(diff_cfg)
    # MDLM draws t in [eps, 1]; LLaDA draws t in [0, 1] and puts eps into the mask probability instead.
    t_eps = diff_cfg.eps if diff_cfg.objective == "mdlm" else 0.0
    t = forward.sample_t(t_rng, b, eps=t_eps, antithetic=diff_cfg.antithetic)
    p_mask = schedule.mask_prob(t)
    u = jax.random.uniform(u_rng, x0.shape)
    xt, is_masked = forward.forward_sample(x0, p_mask[:, None], u, diff_cfg.mask_id,
                                           protect=_protected(batch, diff_cfg))
    logits = build_model(model_cfg).apply({"params": params}, xt, key_mask=batch["valid_mask"],
                                        **_packing_kwargs(batch))
    if diff_cfg.objective == "mdlm":
        loss, _ = losses.mdlm_loss(logits, x0, xt, t, batch["valid_mask"], schedule, mask_id=diff_cfg.mask_id)
    elif diff_cfg.objective == "llada":
        loss = losses.llada_pretrain_loss(logits, x0, is_masked, p_mask)
    elif diff_cfg.objective == "masked_ce":
        loss = losses.masked_ce_loss(logits, x0, is_masked)
    else:
        loss = losses.llada_sft_loss(logits, x0, is_masked, p_mask, batch["prompt_mask"])
    return loss, _metrics(loss, logits, x0, is_masked)


def bd3_nelbo_config(diff_cfg: DiffusionConfig) -> DiffusionConfig:
    """The bd3 settings that score likelihoods: `diff_cfg` with the unbiased clip (1e-3, 1), antithetic independent
    block times and the clean context (see `nelbo_terms` for why a noisy-context run is scored this way too)."""
    clip_min, clip_max = BD3_NELBO_CLIP
    return dataclasses.replace(diff_cfg, clip_min=clip_min, clip_max=clip_max, antithetic=True,
                               block_times="independent", context="clean")


def nelbo_terms(params, batch, rng, *, model_cfg: ModelConfig, diff_cfg: DiffusionConfig,
                condition_on_prompt: bool = False):
    """Per-token NELBO terms in nats f32[B, L] (0 off scored slots) and the scored slots bool[B, L].

    An unbiased one-sample estimate of the continuous-time NELBO with antithetic t over the batch. Scored
    tokens are the ones the objective may noise (valid, and not prompt for SFT and bd3). Objectives that train
    with the LLaDA mask probability are scored with the linear schedule alpha(t) = 1 - t (weight 1/t), whose
    NELBO is the exact bound that their loss approximates; MDLM is scored with its own schedule and SUBS; bd3
    with its block factorisation and the unbiased clip (1e-3, 1) whatever it trains with (`bd3_nelbo_config`):
    clean context and independent times even for a D2F run, because only a block that reads the clean prefix
    makes the sum over blocks a bound on `-log p(x) = -sum_b log p(x^b | x^{<b})` of the network read as a
    block-autoregressive model; the noisy-context loss conditions on a corrupted prefix and bounds no likelihood.

    `condition_on_prompt=True` keeps prompt slots clean and unscored for every objective (a text's likelihood
    given a BOS it was framed with, `dlmjax.rolling`); the training-time NELBO leaves it off, so MDLM and LLaDA
    pre-training runs keep scoring every valid slot as they train.
    """
    if diff_cfg.objective == "bd3":  # prompts are clean context already
        _, aux = bd3_loss(params, batch, rng, model_cfg=model_cfg, diff_cfg=bd3_nelbo_config(diff_cfg))
        return aux["nll"], aux["scored"]
    x0 = batch["tokens"]
    b = x0.shape[0]
    t_rng, u_rng = jax.random.split(rng)
    schedule = _schedule(diff_cfg) if diff_cfg.objective == "mdlm" else schedules.get_schedule("linear")
    t = forward.sample_t(t_rng, b, eps=1e-3, antithetic=True)
    u = jax.random.uniform(u_rng, x0.shape)
    protect = _protected(batch, diff_cfg)
    if condition_on_prompt:
        protect = protect | batch["prompt_mask"]
    xt, is_masked = forward.forward_sample(x0, schedule.mask_prob(t)[:, None], u, diff_cfg.mask_id,
                                           protect=protect)
    logits = build_model(model_cfg).apply({"params": params}, xt, key_mask=batch["valid_mask"],
                                        **_packing_kwargs(batch))
    scored = ~protect
    if diff_cfg.objective == "mdlm":
        _, nll = losses.mdlm_loss(logits, x0, xt, t, batch["valid_mask"], schedule, mask_id=diff_cfg.mask_id)
    else:
        logp = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(logp, x0[..., None], axis=-1)[..., 0]
        nll = jnp.where(is_masked, ce * schedule.weight(t)[:, None], 0.0)
    return jnp.where(scored, nll, 0.0), scored


def nelbo_sums(params, batch, rng, *, model_cfg: ModelConfig, diff_cfg: DiffusionConfig):
    """(sum of per-token NELBO terms in nats, number of scored tokens) for one batch (`nelbo_terms`)."""
    nll, scored = nelbo_terms(params, batch, rng, model_cfg=model_cfg, diff_cfg=diff_cfg)
    return jnp.sum(nll), jnp.sum(scored)
