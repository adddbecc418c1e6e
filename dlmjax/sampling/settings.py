"""Static settings of the masked-diffusion sampler (LLaDA `generate`, ALGORITHMS.md §4.2).

`SamplerSettings` is a static argument of the jitted sampler: it holds only hashable Python
scalars and is validated once, when it is built, so a bad combination never reaches tracing.
"""
from __future__ import annotations

import dataclasses
import math

REMASKING_RULES = ("low_confidence", "random")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerSettings:
    """How to denoise a generation region of `gen_length` slots.

    Attributes:
      gen_length: Number of generated slots `G` appended after the prompt.
      steps: Denoising steps summed over all blocks (LLaDA convention); each block gets
        `steps // num_blocks`, and every step costs one forward pass (one NFE).
      block_length: Slots per block `L'`; `None` means a single block of `gen_length` slots
        (no semi-AR). Resolved to an int when built, so equal settings hash equally and share
        one compiled sampler.
      remasking: How masked slots are ranked for commitment: "low_confidence" (probability of
        the proposed token) or "random" (a uniform draw per slot).
      temperature: 0 takes the argmax of the raw logits; `T > 0` samples from
        `softmax(logits / T)` with the Gumbel-max trick.
      cfg_scale: Classifier-free guidance weight `w`; 0 turns it off. With `w > 0` the logits
        are `u + (w + 1) * (c - u)`, from one forward over the batch doubled with an
        unconditional copy whose prompt slots hold `mask_id`.
      mask_id: Token id of the absorbing [MASK] state. It need not be a logit index
        (MD4-style vocabularies put it at `V`).
      eos_id: End-of-sequence token id; used by `logits_eos_inf`.
      logits_eos_inf: Set the `eos_id` logit to -inf before proposing (LLaDA's flag), so EOS is
        never generated.
    """

    gen_length: int
    steps: int
    block_length: int | None = None
    remasking: str = "low_confidence"
    temperature: float = 0.0
    cfg_scale: float = 0.0
    mask_id: int
    eos_id: int | None = None
    logits_eos_inf: bool = False

    def __post_init__(self):
        if self.block_length is None and _is_int(self.gen_length):
            object.__setattr__(self, "block_length", self.gen_length)
        self.validate()

    @property
    def num_blocks(self) -> int:
        """Blocks denoised left to right: `gen_length // block_length`."""
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        """Denoising steps (forward passes) spent on each block: `steps // num_blocks`."""
        return self.steps // self.num_blocks

    def validate(self) -> None:
        """Raises ValueError naming the field, its value and what is allowed."""
        check_positive_ints(self, ("gen_length", "steps", "block_length"))
        if self.gen_length % self.block_length:
            divisors = [d for d in range(1, self.gen_length + 1) if self.gen_length % d == 0]
            raise ValueError(
                f"SamplerSettings.block_length={self.block_length} does not divide "
                f"gen_length={self.gen_length}; choose a divisor of gen_length, one of {divisors}")
        num_blocks = self.num_blocks
        if self.steps % num_blocks:
            # Also catches steps < num_blocks: no block may get zero steps.
            raise ValueError(
                f"SamplerSettings.steps={self.steps} is not a multiple of num_blocks={num_blocks} "
                f"(= gen_length // block_length); choose one of {num_blocks}, {2 * num_blocks}, "
                f"{3 * num_blocks}, ...")
        check_choice(self, "remasking", REMASKING_RULES)
        check_nonnegative_reals(self, ("temperature", "cfg_scale"), off="0 turns it off")
        check_token_ids(self, ("mask_id", "eos_id"))
        if self.mask_id is None:
            raise ValueError("SamplerSettings.mask_id=None is not allowed; use an int >= 0")
        if not isinstance(self.logits_eos_inf, bool):
            raise ValueError(
                f"SamplerSettings.logits_eos_inf={self.logits_eos_inf!r} is not allowed; use a bool")
        if self.logits_eos_inf and self.eos_id is None:
            raise ValueError(
                "SamplerSettings.logits_eos_inf=True needs eos_id, which is None; set eos_id to the "
                "model's EOS token id, or logits_eos_inf=False")


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
