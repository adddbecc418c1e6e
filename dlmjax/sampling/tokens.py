"""`SpecialTokens`: the token ids a sampler needs to know about, read once per checkpoint."""
from __future__ import annotations

import dataclasses

from dlmjax.errors import SettingsError
from dlmjax.sampling import validation as check


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecialTokens:
    """The special token ids of a model; hashable, so settings that hold it stay static jit arguments.

    Attributes:
      mask_id: The absorbing [MASK] state. It need not be a logit index (MD4-style vocabularies put it at V).
      bos_id: Beginning of sequence (prompts start with it when the tokenizer frames them); None if none.
      eos_id: End of sequence: what `stop_at_eos` (masked sampler) and the block sampler stop a row at, and
        what LLaDA's `logits_eos_inf` / `confidence_eos_eot_inf` flags act on. None: unknown (rows never stop).
      eot_id: End of turn (LLaDA's `<|eot_id|>`), for `confidence_eos_eot_inf`.
      pad_id: What a stopped row's later slots and the padding of ragged prompts hold; defaults to `eos_id`.

    Raises SettingsError when an id is not an int >= 0 (or None), or when EOS or pad equals the mask id: a [MASK]
    fill would be denoised again instead of staying finished.
    """

    mask_id: int
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    pad_id: int | None = None

    def __post_init__(self):
        if self.pad_id is None and self.eos_id is not None:
            object.__setattr__(self, "pad_id", self.eos_id)
        name = type(self).__name__
        if self.mask_id is None:
            raise SettingsError(f"{name}.mask_id=None is not allowed; use an int >= 0", field="mask_id")
        for field in ("mask_id", "bos_id", "eos_id", "eot_id", "pad_id"):
            check.optional_token_id(name, field, getattr(self, field))
        for field in ("eos_id", "pad_id"):
            if getattr(self, field) == self.mask_id:
                raise SettingsError(f"{name}.{field}={self.mask_id} is not allowed: eos_id and pad_id must differ "
                                    f"from mask_id={self.mask_id} (a [MASK] fill would be denoised again)",
                                    field=field)

    def fill_id(self) -> int:
        """The id that pads ragged prompts: `pad_id`, else any id that is not the mask (0, or 1 if 0 is the mask)."""
        if self.pad_id is not None:
            return self.pad_id
        return 0 if self.mask_id != 0 else 1
