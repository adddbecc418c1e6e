"""Log-likelihood of an answer given a prompt, the way LLaDA's lm-eval harness scores multiple choice.

A masked diffusion model has no left-to-right factorisation, so `log p(answer | prompt)` is estimated by Monte
Carlo from the model's ELBO (LLaDA's `get_log_likelihood`, `eval_llada.py`). For a prompt of Lp tokens and an
answer of La tokens, the row prompt + answer is scored `batch_size` times per round, `mc_num // batch_size`
rounds:

- each round draws one k uniformly from 1..La, and row i (of b = `batch_size`) masks n_i answer slots,
  n_i = ((round(k + i La / b) - 1) mod La) + 1 (`masked_counts`: float32 linspace as torch builds it, round half
  to even). The rows of a round are stratified over mask ratios rather than drawn independently;
- the n_i masked slots are a uniformly random subset of the answer; the prompt is never masked;
- a row scores (La / n_i) x the summed cross-entropy of its masked answer tokens; the estimate is minus the mean
  over rows and rounds.

With a one-token answer every row masks that token with ratio 1, so the estimate is exactly the log-softmax at
that slot. Classifier-free guidance (`cfg_scale > 0`) mixes in a copy whose prompt is masked, as the sampler does
(`dlmjax.sampling.Guidance`).

`greedy_check` is LLaDA's `suffix_greedy_prediction` (lm-eval's `is_greedy`): fill the masked answer one slot
per forward, always the most confident one, and compare with the answer.

Requests are left-padded into width buckets (a multiple of `bucket` slots, with a key mask; the `Denoiser` counts
positions over real tokens, so a padded row computes what the unpadded row computes) and scored `group` requests
per call: one compiled program per (width, group, settings).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlmjax.errors import SettingsError
from dlmjax.sampling import validation as check
from dlmjax.sampling.api import bucket_width, check_token_rows
from dlmjax.sampling.guidance import Guidance
from dlmjax.sampling.tokens import SpecialTokens

DEFAULT_BUCKET = 16
DEFAULT_GROUP = 4


@dataclasses.dataclass(frozen=True)
class LikelihoodSettings:
    """Static settings of the estimator (a static argument of the jitted programs).

    Attributes:
      mask_id: the [MASK] id written into masked slots.
      mc_num: rows scored per request in total; a multiple of `batch_size` (LLaDA: 128).
      batch_size: rows per round, stratified over mask ratios (LLaDA: 32; 1 gives independent uniform rows).
      cfg_scale: classifier-free guidance weight, 0 turns it off.
    """

    mask_id: int
    mc_num: int = 128
    batch_size: int = 16
    cfg_scale: float = 0.0

    def __post_init__(self):
        if not check.is_int(self.mask_id) or self.mask_id < 0:
            check.fail("LikelihoodSettings", "mask_id", self.mask_id, "use an int >= 0")
        check.positive_int("LikelihoodSettings", "mc_num", self.mc_num)
        check.positive_int("LikelihoodSettings", "batch_size", self.batch_size)
        check.nonnegative_real("LikelihoodSettings", "cfg_scale", self.cfg_scale, off="0 turns it off")
        if self.mc_num % self.batch_size:
            check.fail("LikelihoodSettings", "mc_num", self.mc_num,
                       f"use a multiple of batch_size={self.batch_size} (each round scores batch_size rows)")

    @property
    def rounds(self) -> int:
        return self.mc_num // self.batch_size

    @property
    def guidance(self) -> Guidance:
        return Guidance(self.cfg_scale)


# ---------------------------------------------------------------------------------------------------------------
# Stratified mask counts (host side: a table per answer length, gathered inside jit)


def masked_counts(k: int, answer_length: int, batch_size: int) -> np.ndarray:
    """int64[batch_size]: the masked answer slots of each row of a round that drew `k` (1 <= k <= answer_length).

    LLaDA builds `linspace(k, k + (b - 1) La / b, b)` with torch in float32 (the end is float32 k plus the
    float32 of the offset computed in double; step = (end - start) / (b - 1); the first half of the values is
    start + i step, the second half end - (b - 1 - i) step; one step gives start), rounds half to even and wraps
    into 1..La. With b a power of two every value is exact, and ties like k + 0.5 round to the even neighbour,
    so some rows' counts are not uniform over 1..La.
    """
    b, la = int(batch_size), int(answer_length)
    if not 1 <= k <= la:
        raise ValueError(f"k={k} must be in 1..answer_length={la}")
    start = np.float32(k)
    if b == 1:
        values = np.array([start], np.float32)
    else:
        end = np.float32(start + np.float32((b - 1) * (la / b)))
        step = np.float32((end - start) / np.float32(b - 1))
        half = b // 2
        values = np.array([start + step * np.float32(i) if i < half else end - step * np.float32(b - 1 - i)
                           for i in range(b)], np.float32)
    rounded = np.round(values).astype(np.int64)  # numpy rounds half to even, as torch.round
    return (rounded - 1) % la + 1


def count_table(answer_length: int, batch_size: int, rows: int | None = None) -> np.ndarray:
    """int32[rows or answer_length, batch_size]: row k - 1 is `masked_counts(k, ...)`; rows past La repeat 1s."""
    table = np.ones((rows or answer_length, batch_size), np.int32)
    for k in range(1, answer_length + 1):
        table[k - 1] = masked_counts(k, answer_length, batch_size)
    return table


# ---------------------------------------------------------------------------------------------------------------
# Packing requests into width buckets


@dataclasses.dataclass(frozen=True)
class _Packed:
    """A group of requests left-padded to one width W: prompt then answer at the right end of each row."""

    tokens: np.ndarray  # int32[G, W], the answer tokens in place
    key_mask: np.ndarray  # bool[G, W], real tokens
    answer: np.ndarray  # bool[G, W], answer slots
    answer_lengths: np.ndarray  # int32[G]


def _pack(requests: Sequence[tuple[list[int], list[int]]], width: int, group: int) -> _Packed:
    # A short group is filled with copies of its last request, so every call of a bucket has one shape.
    filled = list(requests) + [requests[-1]] * (group - len(requests))
    tokens = np.zeros((group, width), np.int32)  # padding is key-masked: any id in the vocabulary does
    key_mask = np.zeros((group, width), bool)
    answer = np.zeros((group, width), bool)
    for g, (prompt, ans) in enumerate(filled):
        row = list(prompt) + list(ans)
        tokens[g, width - len(row):] = row
        key_mask[g, width - len(row):] = True
        answer[g, width - len(ans):] = True
    return _Packed(tokens, key_mask, answer, np.array([len(a) for _, a in filled], np.int32))


def _requests(denoiser, requests, mask_id: int) -> list[tuple[list[int], list[int]]]:
    """Requests as lists of ints, refused on the host if they cannot be scored."""
    out = [(list(map(int, p)), list(map(int, a))) for p, a in requests]
    if not out:
        raise SettingsError("requests is empty; give at least one (prompt_ids, answer_ids) pair", field="requests")
    config = getattr(denoiser, "config", None)
    tokens = SpecialTokens(mask_id=mask_id)
    for i, (prompt, ans) in enumerate(out):
        if not ans:
            raise SettingsError(f"answer_ids of request {i} is empty; a log-likelihood needs at least one answer "
                                "token", field="answer_ids")
        if config is not None:
            check_token_rows([prompt], "prompt_ids", vocab_size=config.vocab_size, tokens=tokens)
            check_token_rows([ans], "answer_ids", vocab_size=config.vocab_size, tokens=tokens)
            if len(prompt) + len(ans) > config.max_seq_len:
                raise SettingsError(f"request {i}: prompt ({len(prompt)}) + answer ({len(ans)}) tokens do not fit "
                                    f"model.max_seq_len={config.max_seq_len}", field="prompt_ids")
        elif mask_id in prompt or mask_id in ans:
            raise SettingsError(f"request {i} holds the mask id {mask_id}", field="prompt_ids")
    return out


def _groups(requests, bucket: int, group: int):
    """(indices, width) per call: requests of one width bucket, `group` at a time, in order of first request."""
    check.positive_int("log_likelihoods", "bucket", bucket)
    check.positive_int("log_likelihoods", "group", group)
    by_width: dict[int, list[int]] = {}
    for i, (p, a) in enumerate(requests):
        by_width.setdefault(bucket_width(len(p) + len(a), bucket), []).append(i)
    for width, idx in by_width.items():
        for s in range(0, len(idx), group):
            yield idx[s:s + group], width


# ---------------------------------------------------------------------------------------------------------------
# The jitted programs


def _forward(denoiser, settings: LikelihoodSettings, params, tokens, key_mask, prompt):
    """Guided position-aligned logits float32[B, W, V] of `tokens` int32[B, W]."""
    guidance = settings.guidance
    doubled = guidance.double(tokens, prompt, settings.mask_id)
    return guidance.mix(denoiser(params, doubled, guidance.twice(key_mask)).astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("denoiser", "settings"))
def _row_losses(denoiser, settings: LikelihoodSettings, params, tokens, key_mask, answer, answer_lengths, counts,
                index, rng):
    """float32[rounds, G, b]: each row's (La / n) x summed cross-entropy of its n masked answer tokens.

    tokens, key_mask, answer: [G, W]; answer_lengths: int32[G]; counts: int32[G, Amax, b] (`count_table`);
    index: int32[G], each request's number in the caller's list: its key is `fold_in(rng, index)`, so its
    estimate does not depend on the other requests of its call.
    """
    g, w = tokens.shape
    b = settings.batch_size
    prompt = key_mask & ~answer
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(rng, i), settings.rounds))(index)
    keys = jnp.swapaxes(keys, 0, 1)  # [rounds, G]

    def one_round(_, round_keys):
        draw_k, draw_subset = jnp.moveaxis(jax.vmap(jax.random.split)(round_keys), 1, 0)
        k = jax.vmap(lambda key, la: jax.random.randint(key, (), 1, la + 1))(draw_k, answer_lengths)  # [G]
        n = jnp.take_along_axis(counts, (k - 1)[:, None, None], axis=1)[:, 0]  # [G, b]
        # A uniformly random n-subset of the answer: the n answer slots with the smallest uniform draws.
        u = jax.vmap(lambda key: jax.random.uniform(key, (b, w)))(draw_subset)  # [G, b, W]
        u = jnp.where(answer[:, None], u, jnp.inf)
        rank = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)
        masked = answer[:, None] & (rank < n[..., None])  # [G, b, W]
        noisy = jnp.where(masked, jnp.int32(settings.mask_id), tokens[:, None])
        def rows(x):  # [G, W] or [G, b, W] -> [G * b, W]: every request's b rows
            return jnp.broadcast_to(x[:, None] if x.ndim == 2 else x, (g, b, w)).reshape(g * b, w)

        logits = _forward(denoiser, settings, params, rows(noisy), rows(key_mask), rows(prompt))
        logp = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(logp, rows(tokens)[..., None], axis=-1)[..., 0].reshape(g, b, w)
        # As LLaDA: each cross-entropy divided by the row's mask ratio n / La (float32).
        ratio = n.astype(jnp.float32) / answer_lengths[:, None].astype(jnp.float32)
        return None, jnp.where(masked, ce, 0.0).sum(-1) / ratio

    _, rows = jax.lax.scan(one_round, None, keys)
    return rows


@functools.partial(jax.jit, static_argnames=("denoiser", "settings"))
def _greedy_fill(denoiser, settings: LikelihoodSettings, params, tokens, key_mask, answer):
    """int32[G, W]: the canvas after filling each row's masked answer one slot per forward, most confident first
    (ties to the lower slot). A row runs as many forwards as its answer has slots (as LLaDA); the loop runs the
    group's longest answer, and a row with nothing masked left commits nothing."""
    prompt = key_mask & ~answer
    canvas = jnp.where(answer, jnp.int32(settings.mask_id), tokens)

    def fill_one(_, canvas):
        logits = _forward(denoiser, settings, params, canvas, key_mask, prompt)
        proposal = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        confidence = jnp.exp(logits.max(-1) - jax.nn.logsumexp(logits, axis=-1))  # softmax at the argmax
        open_ = answer & (canvas == settings.mask_id)
        best = jnp.argmax(jnp.where(open_, confidence, -jnp.inf), axis=-1)  # first of equals: the lower slot
        commit = (jnp.arange(canvas.shape[1]) == best[:, None]) & open_
        return jnp.where(commit, proposal, canvas)

    return jax.lax.fori_loop(0, answer.sum(-1).max(), fill_one, canvas)


# ---------------------------------------------------------------------------------------------------------------
# Public functions


def row_losses(denoiser, params, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, mask_id: int,
               mc_num: int = 128, batch_size: int = 16, cfg_scale: float = 0.0, rng: jax.Array,
               bucket: int = DEFAULT_BUCKET, group: int = DEFAULT_GROUP) -> np.ndarray:
    """float32[R, rounds, batch_size]: every scored row of every request (its mean is minus the estimate).

    Args:
      denoiser: a `dlmjax.sampling.Denoiser` (or any hashable (params, tokens, key_mask) -> logits [B, W, V]).
      params: its parameters (traced, never baked into the program).
      requests: (prompt_ids, answer_ids) pairs of any lengths; answers not empty.
      mc_num, batch_size, cfg_scale, mask_id: `LikelihoodSettings`.
      rng: PRNG key; request j draws from `fold_in(rng, j)` whatever else is in the list.
      bucket: rows are left-padded to a multiple of this width (one compile per width).
      group: requests per call (each call runs `group * batch_size` rows per forward, twice that with guidance).
    """
    settings = LikelihoodSettings(mask_id=mask_id, mc_num=mc_num, batch_size=batch_size, cfg_scale=cfg_scale)
    requests = _requests(denoiser, requests, mask_id)
    out = np.zeros((len(requests), settings.rounds, batch_size), np.float32)
    pending = []
    for idx, width in _groups(requests, bucket, group):
        packed = _pack([requests[i] for i in idx], width, group)
        counts = np.stack([count_table(int(la), batch_size, rows=width) for la in packed.answer_lengths])
        index = np.array(idx + [idx[-1]] * (group - len(idx)), np.int32)
        rows = _row_losses(denoiser, settings, params, packed.tokens, packed.key_mask, packed.answer,
                           packed.answer_lengths, counts, index, rng)
        pending.append((idx, rows))
    for idx, rows in pending:  # one host sync per call, after every call is dispatched
        out[idx] = np.swapaxes(np.asarray(rows), 0, 1)[:len(idx)]
    return out


def log_likelihoods(denoiser, params, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, mask_id: int,
                    mc_num: int = 128, batch_size: int = 16, cfg_scale: float = 0.0, rng: jax.Array,
                    bucket: int = DEFAULT_BUCKET, group: int = DEFAULT_GROUP) -> np.ndarray:
    """float64[R]: LLaDA's Monte Carlo estimate of log p(answer | prompt) for each request (see `row_losses`)."""
    rows = row_losses(denoiser, params, requests, mask_id=mask_id, mc_num=mc_num, batch_size=batch_size,
                      cfg_scale=cfg_scale, rng=rng, bucket=bucket, group=group)
    # As LLaDA: the mean over each round's rows, then minus the mean over rounds (in double).
    return -rows.mean(axis=2, dtype=np.float32).astype(np.float64).mean(axis=1)


def log_likelihood(denoiser, params, prompt_ids: Sequence[int], answer_ids: Sequence[int], *, mask_id: int,
                   mc_num: int = 128, batch_size: int = 16, cfg_scale: float = 0.0, rng: jax.Array,
                   bucket: int = DEFAULT_BUCKET) -> float:
    """LLaDA's Monte Carlo estimate of log p(answer_ids | prompt_ids) (one request: `log_likelihoods`)."""
    return float(log_likelihoods(denoiser, params, [(prompt_ids, answer_ids)], mask_id=mask_id, mc_num=mc_num,
                                 batch_size=batch_size, cfg_scale=cfg_scale, rng=rng, bucket=bucket, group=1)[0])


def greedy_checks(denoiser, params, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, mask_id: int,
                  cfg_scale: float = 0.0, bucket: int = DEFAULT_BUCKET, group: int = DEFAULT_GROUP) -> list[bool]:
    """Per request, whether greedy filling of its masked answer (most confident slot first) gives the answer."""
    settings = LikelihoodSettings(mask_id=mask_id, mc_num=1, batch_size=1, cfg_scale=cfg_scale)
    requests = _requests(denoiser, requests, mask_id)
    out = [False] * len(requests)
    for idx, width in _groups(requests, bucket, group):
        packed = _pack([requests[i] for i in idx], width, group)
        filled = np.asarray(_greedy_fill(denoiser, settings, params, packed.tokens, packed.key_mask, packed.answer))
        for g, i in enumerate(idx):
            out[i] = bool(np.array_equal(filled[g][packed.answer[g]], packed.tokens[g][packed.answer[g]]))
    return out


def greedy_check(denoiser, params, prompt_ids: Sequence[int], answer_ids: Sequence[int], *, mask_id: int,
                 cfg_scale: float = 0.0, bucket: int = DEFAULT_BUCKET) -> bool:
    """LLaDA's `suffix_greedy_prediction` (lm-eval's `is_greedy`) for one request (see `greedy_checks`)."""
    return greedy_checks(denoiser, params, [(prompt_ids, answer_ids)], mask_id=mask_id, cfg_scale=cfg_scale,
                         bucket=bucket, group=1)[0]


__all__ = ["LikelihoodSettings", "count_table", "greedy_check", "greedy_checks", "log_likelihood",
           "log_likelihoods", "masked_counts", "row_losses"]
