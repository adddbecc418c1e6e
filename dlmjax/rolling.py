"""Likelihood of whole texts: the NELBO of a diffusion run, the exact log-likelihood of an AR run.

A text (token ids, any length) is cut into rows of the run's training length `data.seq_len` (for block diffusion
the rows keep the training block grid) and each row is scored on its own (disjoint windows, no context carried
from the previous window). With a `bos_id` each row starts with that token as clean context, never scored, the way
training rows are framed; without one the rows are plain chunks and every token is scored.

- Masked diffusion (MDLM, LLaDA objectives) and block diffusion (bd3, block size > 1): minus the NELBO, an
  upper bound on the negative log-likelihood (so the returned value is a lower bound on the log-likelihood), the
  same per-token terms as the held-out NELBO the training loop reports (`dlmjax.train.objective.nelbo_terms`),
  averaged over `samples` independent draws of the noise. Its expectation is the exact ELBO; more samples only
  shrink its variance.
- AR runs (bd3 with block size 1): with t = 1 every slot is masked and sees only the clean tokens before it, so
  one pass gives log p(x_i | x_<i) exactly (`ar_token_log_probs`): no sampling, and `samples` is ignored.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlmjax.config import Config
from dlmjax.errors import SettingsError
from dlmjax.sampling import validation as check

DEFAULT_BATCH = 8


def is_autoregressive(cfg: Config) -> bool:
    """True for runs whose likelihood is exact: block diffusion with block size 1 (next-token prediction)."""
    return cfg.diffusion.objective == "bd3" and cfg.diffusion.block_size == 1


@dataclasses.dataclass(frozen=True)
class Rows:
    """Texts cut into scoring rows of one length L.

    Attributes:
      tokens: int32[N, L], each row [BOS] chunk, right-padded.
      valid_mask: bool[N, L], real tokens.
      prompt_mask: bool[N, L], the BOS (clean context, never scored).
      text_index: int32[N], the text each row belongs to.
    """

    tokens: np.ndarray
    valid_mask: np.ndarray
    prompt_mask: np.ndarray
    text_index: np.ndarray


def text_rows(texts: Sequence[Sequence[int]], length: int, *, bos_id: int | None = None, pad_id: int = 0) -> Rows:
    """Each text cut into chunks of `length` tokens (`length - 1` after a BOS); an empty text has no rows."""
    body = length - (bos_id is not None)
    if body < 1:
        raise ValueError(f"length={length} leaves no room for text after the BOS")
    tokens, valid, prompt, owner = [], [], [], []
    for i, text in enumerate(texts):
        text = [int(t) for t in text]
        for start in range(0, len(text), body):
            chunk = ([bos_id] if bos_id is not None else []) + text[start:start + body]
            row = np.full(length, pad_id, np.int32)
            row[:len(chunk)] = chunk
            tokens.append(row)
            valid.append(np.arange(length) < len(chunk))
            prompt.append((np.arange(length) == 0) & (bos_id is not None))
            owner.append(i)
    shape = (len(tokens), length)
    return Rows(np.asarray(tokens, np.int32).reshape(shape), np.asarray(valid, bool).reshape(shape),
                np.asarray(prompt, bool).reshape(shape), np.asarray(owner, np.int32))


def _all_masked_pass(cfg: Config, params, tokens, valid_mask, prompt_mask):
    """(log p(x_i) float32[B, L], argmax == x_i bool[B, L]) of a bd3 run with every non-prompt slot masked at t = 1
    (weight 1): each block reads itself fully masked and the clean blocks before it. At block size 1 these are
    the exact next-token log-probabilities and the greedy choices."""
    from dlmjax.train.objective import bd3_loss_terms, bd3_nelbo_config  # noqa: PLC0415 (the trainer only here)

    batch = {"tokens": tokens, "valid_mask": valid_mask, "prompt_mask": prompt_mask}
    ones = jnp.ones(tokens.shape, jnp.float32)
    # The clean context whatever the run trained with: a D2F run (context=noisy) would otherwise read every
    # earlier block fully masked at t = 1, which is no conditional of the text at all.
    _, aux = bd3_loss_terms(params, batch, ones, jnp.zeros_like(ones), model_cfg=cfg.model,
                            diff_cfg=bd3_nelbo_config(cfg.diffusion))
    logits = aux["logits"].astype(jnp.float32).at[..., cfg.diffusion.mask_id].set(-jnp.inf)  # SUBS
    greedy = jnp.argmax(logits, axis=-1) == tokens
    return jnp.where(aux["scored"], -aux["nll"], 0.0), greedy


@functools.partial(jax.jit, static_argnames=("cfg",))
def ar_token_log_probs(cfg: Config, params, tokens: jax.Array, valid_mask: jax.Array) -> jax.Array:
    """float32[B, L]: log p(x_i | x_<i) of an AR run (bd3, block size 1) at valid slots, 0 elsewhere.

    One forward under the BD3 training mask with every slot masked at t = 1 (weight 1): each query sees itself
    as [MASK] and the clean tokens before it. Slot 0 has no context: its value is the model's unconditional
    prediction of the first token.
    """
    if not is_autoregressive(cfg):
        raise ValueError("ar_token_log_probs needs a run with diffusion.objective=bd3 and diffusion.block_size=1")
    return _all_masked_pass(cfg, params, tokens, valid_mask, jnp.zeros_like(valid_mask))[0]


@functools.partial(jax.jit, static_argnames=("cfg", "samples"))
def _answer_scores(cfg: Config, samples: int, params, tokens, valid_mask, prompt_mask, rng):
    """(float32[B] log-likelihood of each row's non-prompt tokens, bool[B] greedy) of a bd3 run (see
    `conditional_log_likelihoods`)."""
    logp, greedy = _all_masked_pass(cfg, params, tokens, valid_mask, prompt_mask)
    answer = valid_mask & ~prompt_mask
    greedy = jnp.all(greedy | ~answer, axis=-1)
    if is_autoregressive(cfg):
        return logp.sum(-1), greedy
    return _row_log_likelihoods(cfg, samples, params, tokens, valid_mask, prompt_mask, rng), greedy


@functools.partial(jax.jit, static_argnames=("cfg", "samples"))
def _row_log_likelihoods(cfg: Config, samples: int, params, tokens, valid_mask, prompt_mask, rng):
    """float32[B]: each row's log-likelihood (minus its NELBO, averaged over `samples` draws; exact for AR)."""
    if is_autoregressive(cfg):
        logp = ar_token_log_probs(cfg, params, tokens, valid_mask)
        return jnp.where(prompt_mask, 0.0, logp).sum(-1)
    from dlmjax.train.objective import nelbo_terms  # noqa: PLC0415

    batch = {"tokens": tokens, "valid_mask": valid_mask, "prompt_mask": prompt_mask}

    def one_draw(total, key):
        nll, _ = nelbo_terms(params, batch, key, model_cfg=cfg.model, diff_cfg=cfg.diffusion,
                             condition_on_prompt=True)
        return total + nll.sum(-1), None

    total, _ = jax.lax.scan(one_draw, jnp.zeros(tokens.shape[0], jnp.float32), jax.random.split(rng, samples))
    return -total / samples


def rolling_log_likelihoods(cfg: Config, params, texts: Sequence[Sequence[int]], *, rng: jax.Array,
                            samples: int = 1, batch_size: int = DEFAULT_BATCH, bos_id: int | None = None,
                            progress: bool = False) -> np.ndarray:
    """float64[R]: the log-likelihood in nats of each text (token ids, without a BOS), rows scored independently.

    Minus the NELBO (averaged over `samples` noise draws) for diffusion runs, exact for AR runs (see the module
    docstring). Rows go `batch_size` at a time through one compiled program (the last batch padded with empty
    rows); batch j draws its noise from `fold_in(rng, j)`. `bos_id` frames each row as training rows are framed.
    """
    check.positive_int("rolling_log_likelihoods", "samples", samples)
    check.positive_int("rolling_log_likelihoods", "batch_size", batch_size)
    vocab = cfg.model.vocab_size
    for i, text in enumerate(texts):
        bad = [int(t) for t in text if not 0 <= int(t) < vocab or int(t) == cfg.diffusion.mask_id]
        if bad:
            raise SettingsError(f"text {i} holds token id {bad[0]}, which is the mask id or outside the vocabulary "
                                f"0..{vocab - 1}", field="texts")
    rows = text_rows(texts, cfg.data.seq_len, bos_id=bos_id)
    n = len(rows.tokens)
    out = np.zeros(len(texts), np.float64)
    if n == 0:
        return out
    padded = -(-n // batch_size) * batch_size

    def pad(a):
        return np.concatenate([a, np.zeros((padded - n,) + a.shape[1:], a.dtype)])

    tokens, valid, prompt = pad(rows.tokens), pad(rows.valid_mask), pad(rows.prompt_mask)
    starts = range(0, padded, batch_size)
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        starts = tqdm(starts, desc="rolling likelihood", unit="batch")
    pending = [_row_log_likelihoods(cfg, samples, params, tokens[s:s + batch_size], valid[s:s + batch_size],
                                    prompt[s:s + batch_size], jax.random.fold_in(rng, s // batch_size))
               for s in starts]
    scores = np.concatenate([np.asarray(p, np.float64) for p in pending])[:n]  # one read-back, after dispatch
    np.add.at(out, rows.text_index, scores)
    return out


def conditional_log_likelihoods(cfg: Config, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                                rng: jax.Array, samples: int = 1,
                                batch_size: int = DEFAULT_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """(float64[R] log p(answer | prompt) in nats, bool[R] greedy) of a block-diffusion run, per request.

    Each request is one row, prompt then answer, right-padded to `data.seq_len` (the training block grid; the
    caller cuts long prompts): the prompt is clean context as in training, the answer is scored. AR runs (block
    size 1): the exact log-likelihood, and greedy = every answer token is the argmax given the tokens before it.
    Block size > 1: minus the NELBO of the answer (mean of `samples` draws, batch j from `fold_in(rng, j)`), and
    greedy = with every answer slot masked, each block's argmax is the answer (its most likely block, decoded in
    one parallel step).
    """
    if cfg.diffusion.objective != "bd3":
        raise ValueError("conditional_log_likelihoods scores block-diffusion runs; masked-diffusion runs use "
                         "dlmjax.likelihood (LLaDA's estimator)")
    check.positive_int("conditional_log_likelihoods", "samples", samples)
    check.positive_int("conditional_log_likelihoods", "batch_size", batch_size)
    length = cfg.data.seq_len
    n = len(pairs)
    padded = max(-(-n // batch_size), 1) * batch_size
    tokens = np.zeros((padded, length), np.int32)
    valid = np.zeros((padded, length), bool)
    prompt = np.zeros((padded, length), bool)
    for i, (p, a) in enumerate(pairs):
        row = [int(t) for t in p] + [int(t) for t in a]
        if len(row) > length:
            raise SettingsError(f"request {i}: prompt ({len(p)}) + answer ({len(a)}) tokens do not fit the run's "
                                f"rows of data.seq_len={length}", field="prompt_ids")
        tokens[i, :len(row)] = row
        valid[i, :len(row)] = True
        prompt[i, :len(p)] = True
    pending = [_answer_scores(cfg, samples, params, tokens[s:s + batch_size], valid[s:s + batch_size],
                              prompt[s:s + batch_size], jax.random.fold_in(rng, s // batch_size))
               for s in range(0, padded, batch_size)]
    logliks = np.concatenate([np.asarray(ll, np.float64) for ll, _ in pending])[:n]
    greedy = np.concatenate([np.asarray(g) for _, g in pending])[:n]
    return logliks, greedy


__all__ = ["conditional_log_likelihoods", "Rows", "ar_token_log_probs", "is_autoregressive", "rolling_log_likelihoods", "text_rows"]
