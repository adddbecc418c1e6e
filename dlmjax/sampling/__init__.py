"""Samplers for masked diffusion language models.

- `settings`: `SamplerSettings`, the static, validated sampler settings.
- `schedule`: `transfer_counts`, how many masked slots each step commits.
- `generate`: `generate`, LLaDA-style block-wise denoising as one jitted program of nested
  `lax.while_loop`s, and the per-step pieces (`propose`, `confidence`, `select_commits`, `commit`).
- `block`: `generate_blocks`, BD3-LM block diffusion with an exact KV cache (AR at block length 1),
  its uncached twin `generate_blocks_uncached`, and `filter_logits` (top-k / nucleus).

Terms (canvas, block, step, NFE, commit, transfer count, confidence) are those of the glossary in
ALGORITHMS.md §0.
"""
from dlmjax.sampling.block import block_step, filter_logits, generate_blocks, generate_blocks_uncached
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
from dlmjax.sampling.settings import REMASKING_RULES, BlockSamplerSettings, SamplerSettings

__all__ = [
    "BlockSamplerSettings",
    "Denoiser",
    "REMASKING_RULES",
    "SamplerSettings",
    "block_step",
    "commit",
    "confidence",
    "denoise_step",
    "filter_logits",
    "generate",
    "generate_blocks",
    "generate_blocks_uncached",
    "guided_logits",
    "propose",
    "restrict_to_block",
    "select_commits",
    "step_keys",
    "transfer_counts",
]
