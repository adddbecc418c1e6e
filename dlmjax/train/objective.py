"""Training objectives and the held-out NELBO, as pure functions of (params, batch, rng).

A batch is a dict of arrays `[B, L]`: `tokens` int32 (x_0), `prompt_mask` bool (slots that are never noised),
`valid_mask` bool (False on padding: never noised, never attended to, never scored).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dlmjax.config import DiffusionConfig, ModelConfig
from dlmjax.diffusion import forward, losses, schedules
from dlmjax.models.transformer import Transformer


def _schedule(cfg: DiffusionConfig):
    return schedules.get_schedule(cfg.schedule, **({"eps": cfg.eps} if cfg.schedule in ("loglinear", "llada") else {}))


def _protected(batch, cfg: DiffusionConfig):
    protect = ~batch["valid_mask"]
    if cfg.objective == "llada_sft":
        protect = protect | batch["prompt_mask"]
    return protect


def diffusion_loss(params, batch, rng, *, model_cfg: ModelConfig, diff_cfg: DiffusionConfig):
    """Scalar training loss and a dict of scalar metrics for the configured objective."""
    x0 = batch["tokens"]
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
    logits = Transformer(model_cfg).apply({"params": params}, xt, key_mask=batch["valid_mask"])
    if diff_cfg.objective == "mdlm":
        loss, _ = losses.mdlm_loss(logits, x0, xt, t, batch["valid_mask"], schedule, mask_id=diff_cfg.mask_id)
    elif diff_cfg.objective == "llada":
        loss = losses.llada_pretrain_loss(logits, x0, is_masked, p_mask)
    else:
        loss = losses.llada_sft_loss(logits, x0, is_masked, p_mask, batch["prompt_mask"])
    masked_acc = jnp.sum((jnp.argmax(logits, -1) == x0) & is_masked) / jnp.maximum(jnp.sum(is_masked), 1)
    return loss, {"loss": loss, "masked_accuracy": masked_acc, "masked_fraction": jnp.mean(is_masked)}


def nelbo_sums(params, batch, rng, *, model_cfg: ModelConfig, diff_cfg: DiffusionConfig):
    """(sum of per-token NELBO terms in nats, number of scored tokens) for one batch.

    An unbiased one-sample estimate of the continuous-time NELBO with antithetic t over the batch. Scored
    tokens are the ones the objective may noise (valid, and not prompt for SFT). Objectives that train with
    the LLaDA mask probability are scored with the linear schedule alpha(t) = 1 - t (weight 1/t), whose
    NELBO is the exact bound that their loss approximates; MDLM is scored with its own schedule and SUBS.
    """
    x0 = batch["tokens"]
    b = x0.shape[0]
    t_rng, u_rng = jax.random.split(rng)
    schedule = _schedule(diff_cfg) if diff_cfg.objective == "mdlm" else schedules.get_schedule("linear")
    t = forward.sample_t(t_rng, b, eps=1e-3, antithetic=True)
    u = jax.random.uniform(u_rng, x0.shape)
    protect = _protected(batch, diff_cfg)
    xt, is_masked = forward.forward_sample(x0, schedule.mask_prob(t)[:, None], u, diff_cfg.mask_id,
                                           protect=protect)
    logits = Transformer(model_cfg).apply({"params": params}, xt, key_mask=batch["valid_mask"])
    scored = ~protect
    if diff_cfg.objective == "mdlm":
        _, nll = losses.mdlm_loss(logits, x0, xt, t, batch["valid_mask"], schedule, mask_id=diff_cfg.mask_id)
    else:
        logp = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(logp, x0[..., None], axis=-1)[..., 0]
        nll = jnp.where(is_masked, ce * schedule.weight(t)[:, None], 0.0)
    return jnp.sum(jnp.where(scored, nll, 0.0)), jnp.sum(scored)
