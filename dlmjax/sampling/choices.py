"""The named choices of the samplers, shared by the settings, the run config (`sample.*`) and the command line.

A leaf module (enums only, no JAX), so that the config can check `sample.remasking` without importing a sampler.
Each is a `StrEnum`: a member equals its string (`Confidence.RANDOM == "random"`), so YAML values and flags need
no conversion, and `parse_choice` turns a string into its member with an error that lists what is allowed.
"""
from __future__ import annotations

import enum

from dlmjax.errors import SettingsError


class Confidence(enum.StrEnum):
    """The score that ranks a block's masked slots for commitment (higher commits first)."""

    LOW_CONFIDENCE = "low_confidence"  # probability of the proposed token (Dream: maskgit_plus)
    RANDOM = "random"  # a uniform draw per slot
    MARGIN = "margin"  # top-1 minus top-2 probability (Dream: topk_margin)
    ENTROPY = "entropy"  # negative entropy of the proposal distribution (Dream: entropy)


class CacheKind(enum.StrEnum):
    """Where a denoising step of the masked sampler gets its block's logits (Fast-dLLM's caches)."""

    NONE = "none"  # every step forwards the whole canvas
    PREFIX = "prefix"  # K/V of the slots before the block, kept from the block's first step
    DUAL = "dual"  # K/V of every slot outside the block, kept from the block's first step


class DreamAlg(enum.StrEnum):
    """Dream's `diffusion_generate` algorithms (`confidence_threshold` is Fast-dLLM's addition)."""

    ORIGIN = "origin"
    MASKGIT_PLUS = "maskgit_plus"
    TOPK_MARGIN = "topk_margin"
    ENTROPY = "entropy"
    CONFIDENCE_THRESHOLD = "confidence_threshold"


class ConfidenceDtype(enum.StrEnum):
    """The dtype of the confidence softmax (float64 is Fast-dLLM's; it needs `jax_enable_x64`)."""

    FLOAT32 = "float32"
    FLOAT64 = "float64"


# The block sampler ranks by LLaDA's two remasking rules only.
BLOCK_CONFIDENCES = (Confidence.LOW_CONFIDENCE, Confidence.RANDOM)


def parse_choice(kind: type[enum.StrEnum], value, *, owner: str, field: str, allowed=None):
    """`value` (a member or its string) as a member of `kind`; SettingsError naming `owner.field` otherwise.

    `allowed` narrows the members accepted (default: all of `kind`).
    """
    allowed = tuple(kind) if allowed is None else tuple(allowed)
    if isinstance(value, str) and value in {str(a) for a in allowed}:
        return kind(value)
    raise SettingsError(f"{owner}.{field}={value!r} is not allowed; choose one of {[str(a) for a in allowed]}",
                        field=field)


__all__ = ["BLOCK_CONFIDENCES", "CacheKind", "Confidence", "ConfidenceDtype", "DreamAlg", "parse_choice"]
