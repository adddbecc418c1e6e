"""Samplers for masked diffusion language models.

- `settings`: `SamplerSettings` (masked sampler: LLaDA, Fast-dLLM, Dream) and `BlockSamplerSettings` (BD3-LM),
  the static, validated sampler settings.
- `schedule`: `transfer_counts` (LLaDA's transfer table) and `dream_transfer_fractions` (Dream's `1 - s/t`).
- `generate`: `generate`, LLaDA / Fast-dLLM / Dream decoding as one jitted program of nested
  `lax.while_loop`s with optional prefix / dual KV cache, and the per-step pieces (`propose`, `confidence`,
  `select_commits`, `select_threshold`, `select_factor`, `commit`).
- `api`: `Generation` and `generate`, the notebook entry point `dlmjax.generate(params, prompt_ids, settings)`: ragged
  prompts, prompt-length buckets, per-row outputs.
- `block`: `generate_blocks`, BD3-LM block diffusion with an exact KV cache (AR at block length 1),
  its uncached twin `generate_blocks_uncached`.
- `filters`: `filter_logits` (top-k / nucleus).

Terms (canvas, block, step, NFE, commit, transfer count, confidence) are those of the glossary in
ALGORITHMS.md §0.
"""
from dlmjax.sampling.api import Generation, bucket_width
from dlmjax.sampling.block import block_step, generate_blocks, generate_blocks_uncached
from dlmjax.sampling.filters import filter_logits
from dlmjax.sampling.generate import (
    Denoiser,
    Schedule,
    commit,
    confidence,
    generate,
    propose,
    propose_and_score,
    restrict_to_block,
    select_commits,
    select_factor,
    select_threshold,
    step_keys,
)
from dlmjax.sampling.schedule import dream_transfer_fractions, transfer_counts
from dlmjax.sampling.settings import (
    CACHE_MODES,
    CONFIDENCE_RULES,
    REMASKING_RULES,
    SCHEDULES,
    BlockSamplerSettings,
    SamplerSettings,
)

__all__ = [
    "Generation", "bucket_width", "BlockSamplerSettings", "CACHE_MODES", "CONFIDENCE_RULES", "Denoiser", "REMASKING_RULES", "SCHEDULES",
    "SamplerSettings", "Schedule", "block_step", "commit", "confidence", "dream_transfer_fractions",
    "filter_logits", "generate", "generate_blocks", "generate_blocks_uncached", "propose", "propose_and_score",
    "restrict_to_block", "select_commits", "select_factor", "select_threshold", "step_keys", "transfer_counts",
]
