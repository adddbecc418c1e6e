"""What a denoising step proposes at each slot, and the score that ranks the slots for commitment.

A proposal rule is a small frozen object: `rule(logits, tokens, gumbel_key, confidence_key) -> (proposal int32[B, W],
scores float[B, W])`, where higher scores commit first. `LladaProposal` is LLaDA's (and Fast-dLLM's, and the block
sampler's); `DreamProposal` is Dream's `sample_tokens`.

Random numbers: the carried key is split once per step (`step_keys`) into the next carried key, the key of the
proposal noise and the key of the uniform draws (random confidences, Dream's `origin`, `alg_temp` selection).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dlmjax.sampling import validation as check
from dlmjax.sampling.choices import Confidence, ConfidenceDtype, parse_choice
from dlmjax.sampling.filters import filter_logits
from dlmjax.sampling.tokens import SpecialTokens


def step_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Splits the carried key into (next carried key, proposal-noise key, uniform-draw key)."""
    rng, step_rng = jax.random.split(rng)
    gumbel_key, confidence_key = jax.random.split(step_rng)
    return rng, gumbel_key, confidence_key


def propose(logits: jax.Array, temperature: float, key: jax.Array) -> jax.Array:
    """LLaDA's proposal per slot, int32[B, N], from logits float[B, N, V].

    `temperature == 0` is the argmax of the raw logits (no dtype change, ties to the lower id). Otherwise it is the
    Gumbel-max draw `argmax(logits + T * g)`, which equals LLaDA's `argmax(exp(logits) / (-log u)^T)`, i.e. a
    sample from `softmax(logits / T)`. Logits and noise are float64 when `jax_enable_x64` is on, as in LLaDA
    (low-precision Gumbel noise lowers the entropy of the samples); without x64 both are float32.
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 unless x64 is enabled
    gumbel = jax.random.gumbel(key, logits.shape, dtype)
    return jnp.argmax(logits.astype(dtype) + temperature * gumbel, axis=-1).astype(jnp.int32)


def score_from_probs(probs: jax.Array, proposal: jax.Array, kind: Confidence) -> jax.Array:
    """The confidence of each slot from its proposal distribution (every kind but "random")."""
    if kind == Confidence.LOW_CONFIDENCE:
        return jnp.take_along_axis(probs, proposal[..., None], axis=-1)[..., 0]
    if kind == Confidence.MARGIN:
        top2 = jax.lax.top_k(probs, 2)[0]
        return top2[..., 0] - top2[..., 1]
    if kind == Confidence.ENTROPY:
        return jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
    raise AssertionError(f"no probability score for {kind!r}")  # settings refuse it before tracing


def confidence(logits: jax.Array, proposal: jax.Array, kind: Confidence, key: jax.Array,
               dtype: ConfidenceDtype = ConfidenceDtype.FLOAT32) -> jax.Array:
    """Score that ranks slots for commitment, [B, N] (higher commits first).

    "low_confidence": `softmax(logits)[proposal]`; "margin": top-1 minus top-2 probability; "entropy":
    `sum p log(p + 1e-10)` (negative entropy); "random": a uniform draw per slot. With float32 the softmax runs in
    the logits' dtype as in LLaDA; with float64 (Fast-dLLM) in float64, when x64 is enabled (else float32).
    Returned in that dtype, so thresholds compare at the reference's precision.
    """
    wide = dtype == ConfidenceDtype.FLOAT64
    out = jax.dtypes.canonicalize_dtype(jnp.float64) if wide else jnp.float32
    if kind == Confidence.RANDOM:
        return jax.random.uniform(key, proposal.shape, jnp.float32).astype(out)
    probs = jax.nn.softmax(logits.astype(out) if wide else logits, axis=-1)
    return score_from_probs(probs, proposal, kind).astype(out)


def _check_special_logit(tokens: SpecialTokens, field: str, vocab: int, flag: str) -> None:
    value = getattr(tokens, field)
    if value is None or value >= vocab:
        # An out-of-range `.at[].set` would be dropped silently and the token left in play.
        check.fail("SpecialTokens", field, value,
                   f"{flag} needs the model's {field} as a logit index of a denoiser with vocabulary size {vocab}: "
                   f"use an id in [0, {vocab})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LladaProposal:
    """LLaDA's proposal: filter (top-k, top-p), Gumbel-max at `temperature` (argmax at 0), then a confidence.

    Attributes:
      temperature: 0 takes the argmax; `T > 0` samples from `softmax(logits / T)` (Gumbel-max, float64 with x64).
      top_k: keep the `k` most likely tokens (0 = off); top_p: nucleus filtering (1 = off), after top-k.
      confidence: the score that ranks slots (`Confidence`).
      confidence_dtype: float32, or float64 as Fast-dLLM computes its softmax (needs `jax_enable_x64`).
      logits_eos_inf: LLaDA's flag: the EOS logit is -inf before proposing, so EOS is never generated.
      confidence_eos_eot_inf: LLaDA's flag, literally: after the proposal the EoT logit is -inf for the confidence
        softmax, and so is the EOS logit when `temperature == 0` (in LLaDA's chained assignment the noisy and clean
        logits are one tensor at T = 0).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    confidence: Confidence = Confidence.LOW_CONFIDENCE
    confidence_dtype: ConfidenceDtype = ConfidenceDtype.FLOAT32
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False

    def __post_init__(self):
        name = type(self).__name__
        object.__setattr__(self, "confidence", parse_choice(Confidence, self.confidence, owner=name,
                                                            field="confidence"))
        object.__setattr__(self, "confidence_dtype", parse_choice(ConfidenceDtype, self.confidence_dtype,
                                                                  owner=name, field="confidence_dtype"))
        check.nonnegative_real(name, "temperature", self.temperature, off="0 takes the argmax")
        check.top_k(name, self.top_k)
        check.top_p(name, self.top_p)
        check.boolean(name, "logits_eos_inf", self.logits_eos_inf)
        check.boolean(name, "confidence_eos_eot_inf", self.confidence_eos_eot_inf)

    def check_tokens(self, tokens: SpecialTokens) -> None:
        """The special ids the flags act on must be known (the vocabulary range is checked at trace time)."""
        for flag, fields in (("logits_eos_inf", ("eos_id",)), ("confidence_eos_eot_inf", ("eos_id", "eot_id"))):
            for field in fields:
                if getattr(self, flag) and getattr(tokens, field) is None:
                    check.fail("SpecialTokens", field, None, f"{type(self).__name__}.{flag}=True needs the model's "
                               f"{field}; set it, or turn {flag} off")

    def __call__(self, logits, tokens: SpecialTokens, gumbel_key, confidence_key):
        vocab = logits.shape[-1]
        if self.logits_eos_inf:
            _check_special_logit(tokens, "eos_id", vocab, "logits_eos_inf")
            logits = logits.at[..., tokens.eos_id].set(-jnp.inf)
        logits = filter_logits(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        proposal = propose(logits, self.temperature, gumbel_key)
        if self.confidence_eos_eot_inf:
            for field in ("eos_id", "eot_id"):
                _check_special_logit(tokens, field, vocab, "confidence_eos_eot_inf")
            logits = logits.at[..., tokens.eot_id].set(-jnp.inf)
            if self.temperature == 0:
                logits = logits.at[..., tokens.eos_id].set(-jnp.inf)
        return proposal, confidence(logits, proposal, self.confidence, confidence_key, self.confidence_dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DreamProposal:
    """Dream's `sample_tokens`: logits / T, nucleus (`top_p`) then `top_k` filtering, `p = softmax`.

    `T > 0` draws the proposal from `p` and its confidence is its probability; `T = 0` takes `max p`. Margin and
    entropy confidences are computed from the same `p`. "random" is not one of Dream's algorithms.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    confidence: Confidence = Confidence.LOW_CONFIDENCE
    logits_eos_inf: bool = False

    def __post_init__(self):
        name = type(self).__name__
        allowed = (Confidence.LOW_CONFIDENCE, Confidence.MARGIN, Confidence.ENTROPY)
        object.__setattr__(self, "confidence", parse_choice(Confidence, self.confidence, owner=name,
                                                            field="confidence", allowed=allowed))
        check.nonnegative_real(name, "temperature", self.temperature, off="0 takes the most likely token")
        check.top_k(name, self.top_k)
        check.top_p(name, self.top_p)
        check.boolean(name, "logits_eos_inf", self.logits_eos_inf)

    def check_tokens(self, tokens: SpecialTokens) -> None:
        if self.logits_eos_inf and tokens.eos_id is None:
            check.fail("SpecialTokens", "eos_id", None, "DreamProposal.logits_eos_inf=True needs the model's eos_id")

    def __call__(self, logits, tokens: SpecialTokens, gumbel_key, confidence_key):
        del confidence_key  # Dream's confidences are probabilities, never draws
        if self.logits_eos_inf:
            _check_special_logit(tokens, "eos_id", logits.shape[-1], "logits_eos_inf")
            logits = logits.at[..., tokens.eos_id].set(-jnp.inf)
        scaled = logits / self.temperature if self.temperature > 0 else logits
        scaled = filter_logits(scaled, temperature=0.0, top_k=0, top_p=self.top_p)
        scaled = filter_logits(scaled, temperature=0.0, top_k=self.top_k, top_p=1.0)
        probs = jax.nn.softmax(scaled, axis=-1)
        if self.temperature > 0:
            proposal = jax.random.categorical(gumbel_key, scaled, axis=-1).astype(jnp.int32)
        else:
            proposal = jnp.argmax(probs, axis=-1).astype(jnp.int32)
        return proposal, score_from_probs(probs, proposal, self.confidence).astype(jnp.float32)


Proposal = LladaProposal | DreamProposal

__all__ = ["DreamProposal", "LladaProposal", "Proposal", "confidence", "propose", "score_from_probs", "step_keys"]
