"""`dlmjax.sampling.generate(model, params, prompt_ids, settings)`: the notebook entry point of both samplers.

It takes ragged prompts (lists of ids, one per row), refuses ids the model cannot read (on the host, before any
work), left-pads the rows into a width bucket (a multiple of `bucket` slots, with a prompt mask, so prompts of 7
and 9 tokens share one compiled program), runs the jitted sampler the settings are for (`generate_masked` for
`SamplerSettings`, `generate_blocks` for `BlockSamplerSettings`, `generate_pipelined` for D2F's
`PipelineSettings`), and returns each row as the references return
it: prompt + generation (+ suffix), without padding.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from dlmjax.config import ModelConfig
from dlmjax.errors import SettingsError
from dlmjax.sampling import stream
from dlmjax.sampling.block import generate_blocks
from dlmjax.sampling.denoiser import Denoiser
from dlmjax.sampling.masked import generate_masked
from dlmjax.sampling.pipeline import PipelineSettings, generate_pipelined
from dlmjax.sampling.settings import BlockSamplerSettings, SamplerSettings
from dlmjax.sampling.tokens import SpecialTokens

DEFAULT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Generation:
    """The result of `generate`.

    Attributes:
      tokens: int32[B, N], the sampler's canvas. Masked sampler: prompts left-padded to the bucket width W, then
        the G generated slots (then the suffix bucket). Block sampler: each row's prompt at its left end (no
        padding), then its generated slots, N = max_length.
      nfe: forward passes run.
      prompt_lengths, suffix_lengths: real tokens per row.
      width: the bucket width W of the prompts.
      gen_length: generated slots of the masked sampler's rows (the block sampler's rows generate
        `max_length - prompt length` slots each).
      spans: per row, (start, generation start, generation end, end) in `tokens`.
    """

    tokens: np.ndarray
    nfe: int
    prompt_lengths: tuple[int, ...]
    suffix_lengths: tuple[int, ...]
    width: int
    gen_length: int
    spans: tuple[tuple[int, int, int, int], ...]
    commit_step: np.ndarray | None = None  # int32[B, N] like `tokens` (`generate(..., trace=True)`), else None

    def generated(self) -> list[list[int]]:
        """Per row, its generated tokens."""
        return [row[g0:g1].tolist() for row, (_, g0, g1, _) in zip(self.tokens, self.spans)]

    def rows(self) -> list[list[int]]:
        """Per row, prompt + generation (+ suffix) without padding, as the reference `generate` returns it."""
        return [row[a:b].tolist() for row, (a, _, _, b) in zip(self.tokens, self.spans)]

    def commit_steps(self) -> list[list[int]]:
        """Per row, aligned with `rows()`: the forward pass (0-based) that committed each slot, -1 where the sampler
        committed nothing (prompt, suffix, the fill after a row's EOS). Needs `generate(..., trace=True)`."""
        if self.commit_step is None:
            raise ValueError("commit_steps() needs dlmjax.generate(..., trace=True)")
        return [row[a:b].tolist() for row, (a, _, _, b) in zip(self.commit_step, self.spans)]

    def tokens_before_eos(self, eos_id: int) -> int:
        """Generated tokens before each row's first `eos_id`, summed: the throughput numerator."""
        total = 0
        for row in self.generated():
            total += row.index(eos_id) if eos_id in row else len(row)
        return total


def bucket_width(length: int, bucket: int) -> int:
    """The smallest multiple of `bucket` that holds `length` slots (at least one bucket)."""
    return max(bucket, -(-length // bucket) * bucket)


def as_denoiser(model) -> Denoiser:
    """A `Denoiser` from a run `Config`, a `ModelConfig` or a `Denoiser`."""
    if isinstance(model, Denoiser):
        return model
    if isinstance(model, ModelConfig):
        return Denoiser(model)
    if isinstance(getattr(model, "model", None), ModelConfig):  # a run Config
        return Denoiser(model.model)
    raise TypeError(f"model must be a Config, a ModelConfig or a Denoiser, got {type(model).__name__}")


def _as_rows(ids, what: str) -> list[list[int]]:
    if isinstance(ids, np.ndarray) or hasattr(ids, "shape"):
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise SettingsError(f"{what} must be a list of rows of token ids or int[batch, length], got shape "
                                f"{list(ids.shape)}", field=what)
        return [list(map(int, r)) for r in ids]
    rows = list(ids)
    if rows and not isinstance(rows[0], (list, tuple, np.ndarray)):
        rows = [rows]  # one row given as a flat list
    return [list(map(int, r)) for r in rows]


def check_token_rows(rows: Sequence[Sequence[int]], what: str, *, vocab_size: int, tokens: SpecialTokens) -> None:
    """Refuses, on the host, ids a model cannot read: negative, >= `vocab_size`, or the mask id (a [MASK] inside
    a prompt would be denoised as a slot to generate). SettingsError naming the row, the ids and the range."""
    for i, r in enumerate(rows):
        bad = [t for t in r if not 0 <= t < vocab_size]
        if bad:
            raise SettingsError(f"{what} row {i}: token ids {bad[:5]} are outside [0, model.vocab_size={vocab_size})",
                                field=what)
        if tokens.mask_id in r:
            raise SettingsError(f"{what} row {i} holds the mask id {tokens.mask_id} at position "
                                f"{list(r).index(tokens.mask_id)}: a prompt is clean text, [MASK] is what the sampler "
                                "fills", field=what)


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


def _watching(on_block, spans):
    """`stream.observing` of `on_block(block, rows)`, rows as `Generation.rows` gives them (no padding)."""
    if on_block is None:
        return contextlib.nullcontext()
    return stream.observing(lambda block, canvas: on_block(block, [canvas[i, a:b].tolist()
                                                                   for i, (a, _, _, b) in enumerate(spans)]))


def generate(model, params, prompt_ids, settings: SamplerSettings | BlockSamplerSettings,
             rng: jax.Array | None = None, *, suffix_ids: Sequence[Sequence[int]] | None = None,
             bucket: int = DEFAULT_BUCKET,
             on_block: Callable[[int, list[list[int]]], None] | None = None, trace: bool = False) -> Generation:
    """Samples after each prompt row: `settings.gen_length` tokens (masked sampler, before each suffix if given:
    infilling), or up to `settings.max_length` slots per row (block sampler).

    Args:
      model: the run's `Config`, its `ModelConfig`, or a `Denoiser`.
      params: the model's parameters (`dlmjax.load(ckpt)[1]`).
      prompt_ids: rows of token ids of any lengths (a list of lists, or int[B, L]).
      settings: `SamplerSettings` (the masked sampler), `BlockSamplerSettings` (the block sampler) or
        `PipelineSettings` (D2F pipelined decoding).
      rng: PRNG key (default `jax.random.PRNGKey(0)`); used by temperature > 0 and the random rules.
      suffix_ids: masked sampler only: rows of clean tokens after the generated region; the sampler fills the
        middle.
      bucket: prompt (and suffix) widths are rounded up to a multiple of this, so one compiled program serves
        every prompt length in a bucket.
      on_block: called on the host after every finished block with (block index, each row's prompt + canvas,
        the mask id where nothing is committed yet), in order, while the sampler runs (`dlmjax chat` prints
        with it). The sampler compiles once with it on, whatever the function.
      trace: also record the forward pass that committed each slot (`Generation.commit_steps()`), inside the
        jitted program.

    Raises:
      SettingsError: a prompt or suffix id outside the vocabulary, negative, or the mask id; prompts that do not
        fit the model's context; a bad `bucket`.
    """
    denoiser = as_denoiser(model)
    config = denoiser.config
    if not isinstance(settings, (SamplerSettings, BlockSamplerSettings, PipelineSettings)):
        raise TypeError(f"settings must be a SamplerSettings, a BlockSamplerSettings or a PipelineSettings, got "
                        f"{type(settings).__name__}")
    if not isinstance(bucket, int) or isinstance(bucket, bool) or bucket < 1:
        raise SettingsError(f"bucket={bucket!r} is not allowed; use an int >= 1", field="bucket")
    rows = _as_rows(prompt_ids, "prompt_ids")
    if not rows:
        raise SettingsError("prompt_ids is empty; give at least one row", field="prompt_ids")
    tokens = settings.tokens
    check_token_rows(rows, "prompt_ids", vocab_size=config.vocab_size, tokens=tokens)
    longest = max(len(r) for r in rows)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    lengths = tuple(len(r) for r in rows)
    if isinstance(settings, (BlockSamplerSettings, PipelineSettings)):
        if suffix_ids is not None:
            raise SettingsError("suffix_ids: the block samplers generate left to right and take no suffix",
                                field="suffix_ids")
        total = settings.max_length
        if longest >= total:
            raise SettingsError(f"the longest prompt ({longest} tokens) leaves nothing to generate within "
                                f"{type(settings).__name__}.max_length={total}", field="max_length")
        # A row's generation does not depend on the width (rows are moved to the left): only the compile does.
        width = min(bucket_width(longest, bucket), total - 1)
        prompt, prompt_mask = _pack(rows, width, tokens.fill_id(), left=True)
        spans = tuple((0, n, total, total) for n in lengths)
        with _watching(on_block, spans):
            sampler = generate_blocks if isinstance(settings, BlockSamplerSettings) else generate_pipelined
            out, nfe, *committed = sampler(denoiser, params, prompt, settings, rng, prompt_mask=prompt_mask,
                                           observe=on_block is not None, trace=trace)
            out = np.asarray(out)  # the callbacks have all run once the result is here
        return Generation(tokens=np.asarray(out), nfe=int(nfe), prompt_lengths=lengths,
                          suffix_lengths=(0,) * len(rows), width=width, gen_length=total - longest, spans=spans,
                          commit_step=np.asarray(committed[0]) if trace else None)

    kwargs, suffix_lengths, suffix_width = {}, (0,) * len(rows), 0
    if suffix_ids is not None:
        suffix_rows = _as_rows(suffix_ids, "suffix_ids")
        if len(suffix_rows) != len(rows):
            raise SettingsError(f"suffix_ids has {len(suffix_rows)} rows but prompt_ids has {len(rows)}",
                                field="suffix_ids")
        check_token_rows(suffix_rows, "suffix_ids", vocab_size=config.vocab_size, tokens=tokens)
        suffix_width = bucket_width(max(len(r) for r in suffix_rows), bucket)
        suffix, suffix_mask = _pack(suffix_rows, suffix_width, tokens.fill_id(), left=False)
        kwargs = {"suffix": suffix, "suffix_mask": suffix_mask}
        suffix_lengths = tuple(len(r) for r in suffix_rows)
    gen = settings.gen_length
    width = bucket_width(longest, bucket)
    room = config.max_seq_len - gen - suffix_width
    if width > room >= longest:
        width = room  # near the end of the context the bucket shrinks to what fits
    if longest > room:
        suffix_note = f" + suffix bucket ({suffix_width})" if kwargs else ""
        raise SettingsError(f"the longest prompt ({longest} tokens) + gen_length ({gen}){suffix_note} = "
                            f"{longest + config.max_seq_len - room} exceeds the model's context "
                            f"model.max_seq_len={config.max_seq_len}", field="gen_length")
    prompt, prompt_mask = _pack(rows, width, tokens.fill_id(), left=True)
    spans = tuple((width - n, width, width + gen, width + gen + m) for n, m in zip(lengths, suffix_lengths))
    with _watching(on_block, spans):
        out, nfe, *committed = generate_masked(denoiser, params, prompt, settings, rng, prompt_mask=prompt_mask,
                                               observe=on_block is not None, trace=trace, **kwargs)
        out = np.asarray(out)  # the callbacks have all run once the result is here
    return Generation(tokens=np.asarray(out), nfe=int(nfe), prompt_lengths=lengths, suffix_lengths=suffix_lengths,
                      width=width, gen_length=gen, spans=spans,
                      commit_step=np.asarray(committed[0]) if trace else None)


__all__ = ["DEFAULT_BUCKET", "Generation", "as_denoiser", "bucket_width", "check_token_rows", "generate"]
