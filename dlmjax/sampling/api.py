"""`dlmjax.generate(params, prompt_ids, settings)`: the notebook entry point of the masked sampler.

It takes ragged prompts (lists of ids, one per row), left-pads them into a width bucket (a multiple of `bucket`
slots, with a key mask, so prompts of 7 and 9 tokens share one compiled program), calls the jitted
`dlmjax.sampling.generate`, and returns each row as the reference returns it: prompt + generation (+ suffix),
without padding.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from dlmjax.models.transformer import Denoiser
from dlmjax.sampling.generate import generate as generate_canvas
from dlmjax.sampling.settings import SamplerSettings

DEFAULT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Generation:
    """The result of `dlmjax.generate`.

    Attributes:
      tokens: int32[B, W + G (+ Ls)], the padded canvas (prompts left-padded to the bucket width W).
      nfe: forward passes run.
      prompt_lengths, suffix_lengths: real tokens per row.
      width: the bucket width W of the prompts.
      gen_length: G.
    """

    tokens: np.ndarray
    nfe: int
    prompt_lengths: tuple[int, ...]
    suffix_lengths: tuple[int, ...]
    width: int
    gen_length: int

    def generated(self) -> list[list[int]]:
        """Per row, the G generated tokens."""
        return [row[self.width:self.width + self.gen_length].tolist() for row in self.tokens]

    def rows(self) -> list[list[int]]:
        """Per row, prompt + generation (+ suffix) without padding, as the reference `generate` returns it."""
        out = []
        for row, n, m in zip(self.tokens, self.prompt_lengths, self.suffix_lengths):
            end = self.width + self.gen_length
            out.append(row[self.width - n:end + m].tolist())
        return out

    def tokens_before_eos(self, eos_id: int) -> int:
        """Generated tokens before each row's first `eos_id`, summed: the throughput numerator (ALGORITHMS.md §6.4)."""
        total = 0
        for row in self.generated():
            total += row.index(eos_id) if eos_id in row else len(row)
        return total


def bucket_width(length: int, bucket: int) -> int:
    """The smallest multiple of `bucket` that holds `length` slots (at least one bucket)."""
    return max(bucket, -(-length // bucket) * bucket)


def _as_rows(ids, what: str) -> list[list[int]]:
    if isinstance(ids, np.ndarray) or hasattr(ids, "shape"):
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"{what} must be a list of rows of token ids or int[batch, length], got shape "
                             f"{list(ids.shape)}")
        return [list(map(int, r)) for r in ids]
    rows = list(ids)
    if rows and not isinstance(rows[0], (list, tuple, np.ndarray)):
        rows = [rows]  # one row given as a flat list
    return [list(map(int, r)) for r in rows]


def _pack(rows: list[list[int]], width: int, pad: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        if not r:
            continue
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        tokens[i, sl] = r
        mask[i, sl] = True
    return tokens, mask


def generate(params, prompt_ids, settings: SamplerSettings, rng: jax.Array | None = None, *,
             suffix_ids: Sequence[Sequence[int]] | None = None, bucket: int = DEFAULT_BUCKET) -> Generation:
    """Generates `settings.gen_length` tokens after each prompt (and before each suffix: infilling).

    Args:
      params: the model's parameters (`dlmjax.load(ckpt)[1]`).
      prompt_ids: rows of token ids of any lengths (a list of lists, or int[B, L]).
      settings: `SamplerSettings` with `model` set (`SamplerSettings.for_model(config, ...)`).
      rng: PRNG key (default `jax.random.PRNGKey(0)`); used by temperature > 0 and the random rules.
      suffix_ids: optional rows of clean tokens after the generated region; the sampler fills the middle.
      bucket: prompt (and suffix) widths are rounded up to a multiple of this, so one compiled program serves
        every prompt length in a bucket.
    """
    if not isinstance(settings, SamplerSettings):
        raise TypeError(f"settings must be a SamplerSettings, got {type(settings).__name__}")
    if settings.model is None:
        raise ValueError("settings.model is None: build the settings with SamplerSettings.for_model(config, ...) "
                         "so that dlmjax.generate knows the model, or call dlmjax.sampling.generate(denoiser, ...)")
    if not isinstance(bucket, int) or isinstance(bucket, bool) or bucket < 1:
        raise ValueError(f"bucket={bucket!r} is not allowed; use an int >= 1")
    rows = _as_rows(prompt_ids, "prompt_ids")
    if not rows:
        raise ValueError("prompt_ids is empty; give at least one row")
    vocab = settings.model.vocab_size
    for what, rs in (("prompt_ids", rows), ("suffix_ids", _as_rows(suffix_ids, "suffix_ids") if suffix_ids
                                            is not None else [])):
        for i, r in enumerate(rs):
            bad = [t for t in r if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{what} row {i}: token ids {bad[:5]} are outside [0, model.vocab_size={vocab})")
    pad = settings.pad_id if settings.pad_id is not None else (0 if settings.mask_id != 0 else 1)
    kwargs = {}
    suffix_lengths = (0,) * len(rows)
    if suffix_ids is not None:
        suffix_rows = _as_rows(suffix_ids, "suffix_ids")
        if len(suffix_rows) != len(rows):
            raise ValueError(f"suffix_ids has {len(suffix_rows)} rows but prompt_ids has {len(rows)}")
        suffix, suffix_mask = _pack(suffix_rows, bucket_width(max(len(r) for r in suffix_rows), bucket), pad,
                                    left=False)
        kwargs = {"suffix": suffix, "suffix_mask": suffix_mask}
        suffix_lengths = tuple(len(r) for r in suffix_rows)
    longest = max(len(r) for r in rows)
    width = bucket_width(longest, bucket)
    room = settings.model.max_seq_len - settings.gen_length - (kwargs["suffix"].shape[1] if kwargs else 0)
    if width > room >= longest:
        width = room  # near the end of the context the bucket shrinks to what fits
    if longest > room:
        suffix_note = f" + suffix bucket ({kwargs['suffix'].shape[1]})" if kwargs else ""
        raise ValueError(f"the longest prompt ({longest} tokens) + gen_length ({settings.gen_length}){suffix_note} = "
                         f"{longest + settings.model.max_seq_len - room} exceeds the model's context "
                         f"model.max_seq_len={settings.model.max_seq_len}")
    prompt, prompt_mask = _pack(rows, width, pad, left=True)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    tokens, nfe = generate_canvas(Denoiser(settings.model), params, prompt, settings, rng,
                                  prompt_mask=prompt_mask, **kwargs)
    return Generation(tokens=np.asarray(tokens), nfe=int(nfe), prompt_lengths=tuple(len(r) for r in rows),
                      suffix_lengths=suffix_lengths, width=width, gen_length=settings.gen_length)
