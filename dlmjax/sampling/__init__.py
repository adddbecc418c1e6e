"""Samplers for masked diffusion language models, one module per role.

- `api`: `generate(model, params, prompt_ids, settings)`, the notebook entry point of both samplers (ragged
  prompts, width buckets, prompt ids checked on the host) and its `Generation`; `dlmjax.generate` is this.
- `masked`: `generate_masked`, LLaDA / Fast-dLLM / Dream decoding as one jitted program of nested while loops.
- `block`: `generate_blocks`, BD3-LM block diffusion with an exact KV cache (AR at block length 1), and its
  uncached twin `generate_blocks_uncached`; Fast-dLLM v2's sub-block decoding is its `SubBlocks` rule
  (`BlockSamplerSettings.v2(...)`).
- `pipeline`: `generate_pipelined`, D2F's pipelined decoding (several blocks in flight on one exact cache,
  `PipelineSettings.d2f(...)`), and its dense-mask twin `generate_pipelined_uncached`.
- `settings`: `SamplerSettings` (core + proposal + commit rule + cache + guidance; `.llada(...)`, `.dream(...)`)
  and `BlockSamplerSettings` (`.bd3(...)`), static and validated.
- `rules`: the commit rules (`CommitRule`: `TransferTable`, `Threshold`, `Factor`, `EntropyBound`, `SubBlocks`,
  `DreamTransfer`, `DreamThreshold`, `DreamOrigin`) and the selections and step tables they use.
- `proposals`: the token proposed at a slot and its score (`LladaProposal`, `DreamProposal`).
- `cache`: where a step's block logits come from (`NoCache`, `PrefixCache`, `DualCache`).
- `guidance`: classifier-free guidance (`Guidance`).
- `denoiser`: `Denoiser`, the static view of a model both samplers call (the one place that knows Dream's shift).
- `tokens`: `SpecialTokens`; `choices`: the enums shared with the config and the command line; `layout`: the
  request both samplers take (left-padded prompts with a prompt mask); `filters`: top-k / nucleus; `validation`:
  field checks.

Terms: the canvas is the token array a sampler denoises (prompt, generated slots, any suffix); a block is a run
of slots denoised together before the next; a step is one forward pass (NFE: the number of them) followed by
the commit of some of the block's proposals; the confidence (score) ranks the slots for commitment.
"""
from dlmjax.sampling.api import Generation, bucket_width, check_token_rows, generate
from dlmjax.sampling.block import generate_blocks, generate_blocks_uncached
from dlmjax.sampling.cache import DualCache, NoCache, PrefixCache
from dlmjax.sampling.choices import BLOCK_CONFIDENCES, CacheKind, Confidence, ConfidenceDtype, DreamAlg
from dlmjax.sampling.denoiser import Denoiser
from dlmjax.sampling.filters import filter_logits
from dlmjax.sampling.guidance import Guidance
from dlmjax.sampling.masked import generate_masked
from dlmjax.sampling.pipeline import PipelineSettings, generate_pipelined, generate_pipelined_uncached
from dlmjax.sampling.proposals import DreamProposal, LladaProposal, step_keys
from dlmjax.sampling.rules import (CommitRule, DreamOrigin, DreamTransfer, DreamThreshold, EntropyBound, Factor,
                                   SubBlocks, Threshold, TransferTable, dream_transfer_fractions, select_commits, select_factor,
                                   select_threshold, transfer_counts)
from dlmjax.sampling.settings import BlockSamplerSettings, SamplerSettings
from dlmjax.sampling.tokens import SpecialTokens

__all__ = [
    "BLOCK_CONFIDENCES", "BlockSamplerSettings", "CacheKind", "CommitRule", "Confidence", "ConfidenceDtype",
    "Denoiser", "DreamAlg", "DreamOrigin", "DreamProposal", "DreamTransfer", "DreamThreshold", "DualCache", "EntropyBound",
    "Factor",
    "Generation", "Guidance", "LladaProposal", "NoCache", "PipelineSettings", "PrefixCache",
    "SamplerSettings", "SpecialTokens", "SubBlocks",
    "Threshold", "TransferTable", "bucket_width", "check_token_rows", "filter_logits", "generate", "generate_blocks",
    "generate_blocks_uncached", "generate_masked", "generate_pipelined", "generate_pipelined_uncached", "dream_transfer_fractions", "select_commits", "select_factor",
    "select_threshold", "step_keys", "transfer_counts",
]
