"""Masked (absorbing-state) diffusion: schedules, the forward process and the training losses.

- `schedules`: `alpha(t)` and friends as frozen dataclasses (`LinearSchedule`, `CosineSchedule`,
  `LogLinearSchedule`, `LLaDASchedule`) and `get_schedule(name, **kw)`.
- `forward`: `sample_t` / `t_from_uniform` (diffusion times), `forward_sample` / `mask_tokens` (x_0 -> x_t).
- `losses`: `subs_log_probs`, `mdlm_loss` (MDLM NELBO), `llada_pretrain_loss`, `llada_sft_loss`.
- `masks`: `bd3_training_mask`, block diffusion's [x_t ; x_0] attention rule materialised.
- `block`: BD3-LM's per-block times (`block_times`), two-stream inputs and per-token NELBO terms.

Terms (mask id, alpha(t), weight, SUBS, block, ...) are those of the glossary in `dlmjax/__init__.py`: `t = 0` is
clean, `t = 1` fully masked, `alpha(t)` the probability that a slot is still clean, mask probability
`1 - alpha(t)`, ELBO weight `-alpha'(t) / (1 - alpha(t))`.
"""
from dlmjax.diffusion import block, forward, losses, masks, schedules
from dlmjax.diffusion.forward import forward_sample, mask_tokens, sample_t, t_from_uniform
from dlmjax.diffusion.losses import (
    NEG_INF,
    llada_pretrain_loss,
    llada_sft_loss,
    mdlm_loss,
    subs_log_probs,
    subs_target_log_probs,
)
from dlmjax.diffusion.masks import bd3_training_mask
from dlmjax.diffusion.schedules import (
    SCHEDULES,
    CosineSchedule,
    LinearSchedule,
    LLaDASchedule,
    LogLinearSchedule,
    Schedule,
    get_schedule,
)

__all__ = [
    "NEG_INF",
    "SCHEDULES",
    "CosineSchedule",
    "LLaDASchedule",
    "LinearSchedule",
    "LogLinearSchedule",
    "Schedule",
    "bd3_training_mask",
    "block",
    "forward",
    "forward_sample",
    "get_schedule",
    "llada_pretrain_loss",
    "llada_sft_loss",
    "losses",
    "mask_tokens",
    "masks",
    "mdlm_loss",
    "sample_t",
    "schedules",
    "subs_log_probs",
    "subs_target_log_probs",
    "t_from_uniform",
]
