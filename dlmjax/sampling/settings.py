"""Static settings of the masked-diffusion sampler (LLaDA `generate`, ALGORITHMS.md §4.2).

`SamplerSettings` is a static argument of the jitted sampler: it holds only hashable Python
scalars and is validated once, when it is built, so a bad combination never reaches tracing.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

REMASKING_RULES = ("low_confidence", "random")
# Confidence scores the masked sampler ranks slots by: LLaDA's two plus Dream's margin and negative entropy.
CONFIDENCE_RULES = ("low_confidence", "random", "margin", "entropy")
SCHEDULES = ("llada", "dream", "origin")
CACHE_MODES = ("none", "prefix", "dual")
CONFIDENCE_DTYPES = ("float32", "float64")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerSettings:
    """How the masked sampler (`dlmjax.sampling.generate`) fills a generation region of `gen_length` slots.

    One settings object covers LLaDA `generate`, Fast-dLLM (threshold / factor decoding, prefix and dual KV
    cache) and Dream `diffusion_generate`; ALGORITHMS.md §4.2, §4.3, §4.5. It is a static argument of the jitted
    sampler: hashable Python scalars only, validated once when built, so a bad combination never reaches tracing.

    Attributes:
      gen_length: Number of generated slots `G` appended after the prompt.
      steps: Denoising steps summed over all blocks (LLaDA convention); each block gets
        `steps // num_blocks`. With a fixed schedule every step costs one forward pass (one NFE).
      block_length: Slots per block `L'`; `None` means a single block of `gen_length` slots
        (no semi-AR). Resolved to an int when built, so equal settings hash equally and share
        one compiled sampler.
      schedule: How many slots a step commits.
        "llada": LLaDA's front-loaded transfer table per block (`k = n // S` plus one for the first
          `n % S` steps); with `threshold` or `factor`, Fast-dLLM's parallel decoding instead (a block is
          denoised until it has no mask).
        "dream": Dream's `int(n * (1 - s/t))` over `t = linspace(1, eps, S + 1)` (all remaining masks at the last
          step); with `threshold`, Dream's `confidence_threshold` algorithm (budget `n // S` per step, top-1
          always, others only at confidence >= threshold, rejected slots carried; steps extended until filled).
        "origin": Dream's `origin`: every masked slot is unmasked independently with probability `1 - s/t`.
      remasking: The confidence that ranks slots: "low_confidence" (probability of the proposal; Dream's
        `maskgit_plus`), "random" (a uniform draw per slot), "margin" (top-1 minus top-2 probability; Dream's
        `topk_margin`) or "entropy" (negative entropy of the proposal distribution; Dream's `entropy`).
      threshold: Confidence threshold in (0, 1]; None turns it off. See `schedule`.
      factor: Fast-dLLM's factor rule (schedule "llada" only): commit the longest prefix of the confidence
        ranking with `(n + 1) * (1 - c_(n)) < factor`; None turns it off.
      cache: "none" (every step is a forward over the whole canvas), "prefix" (Fast-dLLM prefix cache: K/V of the
        slots before the block are computed once per block, at the block's first step; later steps forward the
        block and everything after it) or "dual" (Fast-dLLM dual cache: K/V of every slot outside the block are
        from the block's first step; later steps forward only the block). Both caches are approximations by
        design (the cached K/V were computed while the block was still masked); schedule "llada" only.
      temperature: 0 takes the argmax; `T > 0` samples from `softmax(logits / T)` (LLaDA: Gumbel-max in float64
        when `jax_enable_x64` is on; Dream: a categorical draw whose probability is the confidence).
      top_k: Keep only the `k` most likely tokens of each proposal distribution (0 = off).
      top_p: Nucleus filtering (1.0 = off), applied before `top_k` as in Dream.
      alg_temp: Dream's algorithm temperature: > 0 draws the `k` committed slots without replacement from
        `softmax(confidence / alg_temp)` instead of taking the top `k` (schedule "dream" only).
      eps: Dream's final time `eps` of `linspace(1, eps, S + 1)` (schedules "dream" and "origin").
      cfg_scale: Classifier-free guidance weight `w`; 0 turns it off. With `w > 0` the logits
        are `u + (w + 1) * (c - u)`, from one forward over the batch doubled with an
        unconditional copy whose prompt slots hold `mask_id`.
      mask_id: Token id of the absorbing [MASK] state. It need not be a logit index
        (MD4-style vocabularies put it at `V`).
      eos_id: End-of-sequence token id (`logits_eos_inf`, `confidence_eos_eot_inf`, `stop_at_eos`).
      eot_id: End-of-turn token id (LLaDA's `<|eot_id|>`), for `confidence_eos_eot_inf`.
      logits_eos_inf: Set the `eos_id` logit to -inf before proposing (LLaDA's flag), so EOS is
        never generated.
      confidence_eos_eot_inf: LLaDA's flag, reproduced literally: after the proposal the `eot_id` logit is set
        to -inf for the confidence softmax, and so is the `eos_id` logit when `temperature == 0` (in LLaDA's
        chained assignment the noisy and clean logits are the same tensor at T = 0).
      stop_at_eos: A row that has generated `eos_id` is done once its block is finished: its later slots are
        filled with `pad_id` and never denoised, and sampling stops when every row is done.
      pad_id: Fill of a done row's later slots (default `eos_id`).
      confidence_dtype: "float32", or "float64" (Fast-dLLM's softmax; needs `jax_enable_x64`, otherwise JAX
        computes it in float32).
      model: The `ModelConfig` to sample from, for `dlmjax.generate(params, prompt_ids, settings)` (set by
        `for_model`); the low-level `dlmjax.sampling.generate` takes a denoiser instead and ignores it.
    """

    gen_length: int
    steps: int
    block_length: int | None = None
    schedule: str = "llada"
    remasking: str = "low_confidence"
    threshold: float | None = None
    factor: float | None = None
    cache: str = "none"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    alg_temp: float = 0.0
    eps: float = 1e-3
    cfg_scale: float = 0.0
    mask_id: int
    eos_id: int | None = None
    eot_id: int | None = None
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    stop_at_eos: bool = False
    pad_id: int | None = None
    confidence_dtype: str = "float32"
    model: Any = None

    def __post_init__(self):
        if self.block_length is None and _is_int(self.gen_length):
            object.__setattr__(self, "block_length", self.gen_length)
        if self.pad_id is None and self.eos_id is not None:
            object.__setattr__(self, "pad_id", self.eos_id)
        self.validate()

    @property
    def num_blocks(self) -> int:
        """Blocks denoised left to right: `gen_length // block_length`."""
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        """Denoising steps `S` per block: `steps // num_blocks`."""
        return self.steps // self.num_blocks

    @property
    def parallel(self) -> bool:
        """True when commits per step are data dependent (threshold or factor decoding)."""
        return self.threshold is not None or self.factor is not None

    def validate(self) -> None:
        """Raises ValueError naming the field, its value and what is allowed."""
        name = type(self).__name__
        check_positive_ints(self, ("gen_length", "steps", "block_length"))
        if self.gen_length % self.block_length:
            divisors = [d for d in range(1, self.gen_length + 1) if self.gen_length % d == 0]
            raise ValueError(
                f"{name}.block_length={self.block_length} does not divide "
                f"gen_length={self.gen_length}; choose a divisor of gen_length, one of {divisors}")
        num_blocks = self.num_blocks
        if self.steps % num_blocks:
            # Also catches steps < num_blocks: no block may get zero steps.
            raise ValueError(
                f"{name}.steps={self.steps} is not a multiple of num_blocks={num_blocks} "
                f"(= gen_length // block_length); choose one of {num_blocks}, {2 * num_blocks}, "
                f"{3 * num_blocks}, ...")
        check_choice(self, "schedule", SCHEDULES)
        check_choice(self, "remasking", CONFIDENCE_RULES)
        check_choice(self, "cache", CACHE_MODES)
        check_choice(self, "confidence_dtype", CONFIDENCE_DTYPES)
        check_nonnegative_reals(self, ("temperature", "cfg_scale"), off="0 turns it off")
        check_nonnegative_reals(self, ("alg_temp",), off="0 takes the top k")
        for field in ("threshold", "factor"):
            value = getattr(self, field)
            if value is not None and (not _is_real(value) or not math.isfinite(value) or value <= 0
                                      or (field == "threshold" and value > 1)):
                rule = "a number in (0, 1]" if field == "threshold" else "a finite number > 0"
                raise ValueError(f"{name}.{field}={value!r} is not allowed; use None (off) or {rule}")
        if self.threshold is not None and self.factor is not None:
            raise ValueError(f"{name}: threshold={self.threshold} and factor={self.factor} are two rules for the "
                             "same choice; set one of them")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"{name}.top_k={self.top_k!r} is not allowed; use an int >= 0 (0 turns it off)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"{name}.top_p={self.top_p!r} is not allowed; use a number in (0, 1] (1 turns it off)")
        if not _is_real(self.eps) or not 0 < self.eps < 1:
            raise ValueError(f"{name}.eps={self.eps!r} is not allowed; use a number in (0, 1)")
        check_token_ids(self, ("mask_id", "eos_id", "eot_id", "pad_id"))
        if self.mask_id is None:
            raise ValueError(f"{name}.mask_id=None is not allowed; use an int >= 0")
        for flag in ("logits_eos_inf", "confidence_eos_eot_inf", "stop_at_eos"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{name}.{flag}={getattr(self, flag)!r} is not allowed; use a bool")
        for flag, needs in (("logits_eos_inf", ("eos_id",)), ("stop_at_eos", ("eos_id",)),
                            ("confidence_eos_eot_inf", ("eos_id", "eot_id"))):
            for field in needs:
                if getattr(self, flag) and getattr(self, field) is None:
                    raise ValueError(
                        f"{name}.{flag}=True needs {field}, which is None; set {field} to the "
                        f"model's token id, or {flag}=False")
        if self.stop_at_eos and self.pad_id == self.mask_id:
            raise ValueError(f"{name}.pad_id={self.pad_id} equals mask_id; a [MASK] fill would be denoised again")
        self._validate_schedule(name)

    def _validate_schedule(self, name: str) -> None:
        """Combinations the references do not define are refused rather than guessed."""
        if self.schedule == "llada":
            if self.alg_temp:
                raise ValueError(f"{name}.alg_temp={self.alg_temp} is Dream's and needs schedule='dream'")
            return
        if self.cache != "none":
            raise ValueError(f"{name}.cache={self.cache!r} needs schedule='llada' (Fast-dLLM's caches); "
                             f"schedule={self.schedule!r} runs Dream's uncached loop")
        if self.factor is not None:
            raise ValueError(f"{name}.factor={self.factor} is Fast-dLLM's rule and needs schedule='llada'")
        if self.schedule == "dream" and self.remasking == "random":
            raise ValueError(f"{name}.remasking='random' is not a Dream algorithm; with schedule='dream' choose "
                             "low_confidence (maskgit_plus), margin (topk_margin) or entropy")
        if self.schedule == "origin" and (self.threshold is not None or self.alg_temp):
            raise ValueError(f"{name}: schedule='origin' unmasks slots at random; it takes no threshold or alg_temp")

    @classmethod
    def dream(cls, *, max_new_tokens: int, steps: int, alg: str = "origin", alg_temp: float | None = None,
              threshold: float | None = None, **kwargs) -> "SamplerSettings":
        """Settings in Dream's `diffusion_generate` terms: `alg` in origin, maskgit_plus, topk_margin, entropy,
        confidence_threshold (the Fast-dLLM addition; default threshold 0.9 as there)."""
        algs = {"origin": ("origin", "low_confidence"), "maskgit_plus": ("dream", "low_confidence"),
                "topk_margin": ("dream", "margin"), "entropy": ("dream", "entropy"),
                "confidence_threshold": ("dream", "low_confidence")}
        if alg not in algs:
            raise ValueError(f"SamplerSettings.dream: alg={alg!r} is not allowed; choose one of {list(algs)}")
        schedule, remasking = algs[alg]
        if alg == "confidence_threshold":
            threshold = 0.9 if threshold is None else threshold
        elif threshold is not None:
            raise ValueError(f"SamplerSettings.dream: threshold={threshold} needs alg='confidence_threshold'")
        return cls(gen_length=max_new_tokens, steps=steps, schedule=schedule, remasking=remasking,
                   alg_temp=alg_temp or 0.0, threshold=threshold, **kwargs)

    @classmethod
    def for_model(cls, config, **kwargs) -> "SamplerSettings":
        """Settings whose token ids come from a checkpoint's `Config` (mask id) unless given."""
        kwargs.setdefault("mask_id", config.diffusion.mask_id)
        return cls(model=config.model, **kwargs)


# Field checks shared by the settings classes: each raises ValueError naming class, field, value and rule.

def check_positive_ints(settings, fields) -> None:
    for field in fields:
        value = getattr(settings, field)
        if not _is_int(value) or value < 1:
            raise ValueError(f"{type(settings).__name__}.{field}={value!r} is not allowed; use an int >= 1")


def check_choice(settings, field, allowed) -> None:
    value = getattr(settings, field)
    if value not in allowed:
        raise ValueError(
            f"{type(settings).__name__}.{field}={value!r} is not allowed; choose one of {list(allowed)}")


def check_nonnegative_reals(settings, fields, *, off: str) -> None:
    for field in fields:
        value = getattr(settings, field)
        if not _is_real(value) or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"{type(settings).__name__}.{field}={value!r} is not allowed; use a finite number >= 0 ({off})")


def check_token_ids(settings, fields) -> None:
    """Optional token ids: None or an int >= 0 (whether it is in the vocabulary is checked against the model)."""
    for field in fields:
        value = getattr(settings, field)
        if value is not None and (not _is_int(value) or value < 0):
            raise ValueError(f"{type(settings).__name__}.{field}={value!r} is not allowed; use an int >= 0")


def _is_int(value) -> bool:
    # bool is an int subclass, but `steps=True` is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSamplerSettings:
    """How the block-diffusion sampler (`generate_blocks`, ALGORITHMS.md §4.4, §4.10) fills rows up to `max_length`.

    A row is cut into blocks of `block_length` slots counted from its first token, the grid BD3 training
    uses, so a prompt that ends inside a block shares that block with the first generated slots. Blocks are
    finished left to right; each is denoised in at most `steps_per_block` steps (one forward pass each)
    with the masked sampler's rules, then committed to the KV cache. `block_length=1` is autoregressive
    decoding; `block_length=max_length` is MDLM/LLaDA with the prompt as clean context.

    Attributes:
      max_length: Slots per row, prompt included (BD3's sequence length); a multiple of `block_length`.
        A row with a prompt of `n` tokens generates `max_length - n` slots.
      block_length: Slots per block `L'`.
      steps_per_block: Denoising steps `S` per block (default `block_length`: one commit per step). Commits
        per step follow LLaDA's front-loaded transfer table over the block's masked slots; a block stops
        early once none of its slots is masked, so a block that the prompt half fills takes fewer steps.
      remasking: "low_confidence" or "random", as in `SamplerSettings`.
      temperature: 0 is greedy; `T > 0` samples from `softmax(logits / T)` (Gumbel-max).
      top_k: Keep only the `k` most likely tokens of each proposal distribution (0 = off).
      top_p: Nucleus filtering: keep the smallest set of most likely tokens whose mass reaches `top_p`
        (1.0 = off). Applied after `top_k`, to the temperature-scaled distribution.
      mask_id: Token id of [MASK]; the model never proposes it (SUBS).
      eos_id: A row that generates `eos_id` is done once its block is finished: its later blocks are
        `pad_id` and frozen, and sampling stops when every row is done. None: rows never stop early.
      pad_id: Fill of a done row's later blocks (default `eos_id`).
      cache_length: KV-cache slots per row; None sizes it exactly (`max_length - block_length`: the last
        block is never committed). Too small a value is an error, never a silent overwrite.
    """

    max_length: int
    block_length: int
    steps_per_block: int | None = None
    remasking: str = "low_confidence"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    mask_id: int
    eos_id: int | None = None
    pad_id: int | None = None
    cache_length: int | None = None

    def __post_init__(self):
        if self.steps_per_block is None and _is_int(self.block_length):
            object.__setattr__(self, "steps_per_block", self.block_length)
        if self.pad_id is None and self.eos_id is not None:
            object.__setattr__(self, "pad_id", self.eos_id)
        self.validate()

    @property
    def num_blocks(self) -> int:
        return self.max_length // self.block_length

    def validate(self) -> None:
        """Raises ValueError naming the field, its value and what is allowed."""
        name = type(self).__name__
        check_positive_ints(self, ("max_length", "block_length", "steps_per_block"))
        if self.max_length % self.block_length:
            divisors = [d for d in range(1, self.max_length + 1) if self.max_length % d == 0]
            raise ValueError(
                f"{name}.max_length={self.max_length} is not a multiple of block_length={self.block_length}; "
                f"choose a block_length in {divisors} or a max_length that is a multiple of {self.block_length}")
        check_choice(self, "remasking", REMASKING_RULES)
        check_nonnegative_reals(self, ("temperature",), off="0 is greedy")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"{name}.top_k={self.top_k!r} is not allowed; use an int >= 0 (0 turns it off)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"{name}.top_p={self.top_p!r} is not allowed; use a number in (0, 1] (1 turns it off)")
        check_token_ids(self, ("mask_id", "eos_id", "pad_id"))
        if self.mask_id is None:
            raise ValueError(f"{name}.mask_id=None is not allowed; use an int >= 0")
        if self.mask_id in (self.eos_id, self.pad_id):
            # A [MASK] fill would be denoised again instead of staying frozen.
            raise ValueError(f"{name}: eos_id={self.eos_id} and pad_id={self.pad_id} must differ from "
                             f"mask_id={self.mask_id}")
        if self.cache_length is not None and (not _is_int(self.cache_length) or self.cache_length < 1):
            raise ValueError(f"{name}.cache_length={self.cache_length!r} is not allowed; use None or an int >= 1")
