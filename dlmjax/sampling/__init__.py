"""Samplers for masked diffusion language models.

- `settings`: `SamplerSettings`, the static, validated sampler settings.
- `schedule`: `transfer_counts`, how many masked slots each step commits.
- `generate`: `generate`, LLaDA-style block-wise denoising as one jitted program of nested
  `lax.while_loop`s, and the per-step pieces (`propose`, `confidence`, `select_commits`, `commit`).

Terms (canvas, block, step, NFE, commit, transfer count, confidence) are those of the glossary in
ALGORITHMS.md §0.
"""
from dlmjax.sampling.generate import (
    Denoiser,
    commit,
    confidence,
    denoise_step,
    generate,
    guided_logits,
    propose,
    restrict_to_block,
    select_commits,
    step_keys,
)
from dlmjax.sampling.schedule import transfer_counts
from dlmjax.sampling.settings import REMASKING_RULES, SamplerSettings

__all__ = [
    "Denoiser",
    "REMASKING_RULES",
    "SamplerSettings",
    "commit",
    "confidence",
    "denoise_step",
    "generate",
    "guided_logits",
    "propose",
    "restrict_to_block",
    "select_commits",
    "step_keys",
    "transfer_counts",
]
