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
        for name in ("gen_length", "steps", "block_length"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"SamplerSettings.{name}={value!r} is not allowed; use an int >= 1")
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
        if self.remasking not in REMASKING_RULES:
            raise ValueError(
                f"SamplerSettings.remasking={self.remasking!r} is not allowed; choose one of "
                f"{list(REMASKING_RULES)}")
        for name in ("temperature", "cfg_scale"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"SamplerSettings.{name}={value!r} is not allowed; use a finite number >= 0 "
                    f"(0 turns it off)")
        if not _is_int(self.mask_id) or self.mask_id < 0:
            raise ValueError(f"SamplerSettings.mask_id={self.mask_id!r} is not allowed; use an int >= 0")
        if self.eos_id is not None and (not _is_int(self.eos_id) or self.eos_id < 0):
            raise ValueError(
                f"SamplerSettings.eos_id={self.eos_id!r} is not allowed; use None or an int >= 0")
        if not isinstance(self.logits_eos_inf, bool):
            raise ValueError(
                f"SamplerSettings.logits_eos_inf={self.logits_eos_inf!r} is not allowed; use a bool")
        if self.logits_eos_inf and self.eos_id is None:
            raise ValueError(
                "SamplerSettings.logits_eos_inf=True needs eos_id, which is None; set eos_id to the "
                "model's EOS token id, or logits_eos_inf=False")


def _is_int(value) -> bool:
    # bool is an int subclass, but `steps=True` is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
