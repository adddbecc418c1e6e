"""Rolling likelihood of whole texts (`dlmjax.rolling`), held against independent computations.

- the training-time held-out NELBO on the same rows (MDLM, LLaDA pre-training and block-diffusion runs);
- the closed form of the linear-schedule NELBO's expectation, by enumerating every masked subset of a short text;
- an AR run's exact log-likelihood against a loop of causal forwards, one prefix at a time.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_run_config

from dlmjax.data.build import load_eval_data
from dlmjax.data.pipeline import make_eval_batches
from dlmjax.errors import SettingsError
from dlmjax.models.transformer import build_model
from dlmjax.rolling import ar_token_log_probs, conditional_log_likelihoods, rolling_log_likelihoods, text_rows
from dlmjax.train.step import as_batch, make_eval_step
from kernels_pallas.masks import Causal

TEXT = str(REPO / "configs" / "text.yaml")


def text_config(*extra):
    return tiny_run_config("data.seq_len=32", "model.max_seq_len=32", "data.eval_size=16",
                           f"data.path={REPO / 'README.md'}", *extra, base=TEXT)


def random_params(cfg, seed=0):
    model = build_model(cfg.model)
    return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, cfg.data.seq_len), jnp.int32))["params"]


@pytest.mark.parametrize("objective", [("diffusion.objective=mdlm",),
                                       ("diffusion.objective=llada", "diffusion.schedule=llada"),
                                       ("diffusion.objective=bd3", "diffusion.block_size=8")])
def test_equals_the_training_time_nelbo_on_the_same_rows(objective):
    cfg = text_config(*objective)
    params = random_params(cfg)
    records = load_eval_data(cfg).records
    batch = as_batch(next(iter(make_eval_batches(records, 16))))
    rows = np.asarray(batch["tokens"])  # held-out rows, [BOS] chunk [EOS], all valid
    rng = jax.random.PRNGKey(3)
    ours = rolling_log_likelihoods(cfg, params, list(rows), rng=rng, samples=1, batch_size=len(rows))
    # The rolling scorer's one draw for its first batch is split(fold_in(rng, 0), 1)[0].
    key = jax.random.split(jax.random.fold_in(rng, 0), 1)[0]
    total, count = make_eval_step(cfg.model, cfg.diffusion)(params, batch, key)
    assert int(count) == rows.size
    np.testing.assert_allclose(ours.sum(), -float(total), rtol=2e-6)


def subset_mean_losses(cfg, params, text) -> dict[int, float]:
    """A(n): the mean over every n-subset S of the text of sum_{j in S} -log p(x_j | text with S masked)."""
    model = build_model(cfg.model)
    length = len(text)
    out = {}
    for n in range(1, length + 1):
        values = []
        for subset in itertools.combinations(range(length), n):
            noisy = np.array(text)
            noisy[list(subset)] = cfg.diffusion.mask_id
            logits = model.apply({"params": params}, jnp.asarray(noisy[None]))[0]
            logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1), np.float64)
            values.append(-sum(logp[j, text[j]] for j in subset))
        out[n] = float(np.mean(values))
    return out


def test_linear_nelbo_expectation_matches_the_enumerated_closed_form():
    # LLaDA pre-training objective: scored with the linear schedule (mask probability t, weight 1/t), t uniform
    # on [eps, 1]. Given n masked slots out of L, E = 1/(1 - eps) sum_n A(n) int_eps^1 C(L, n) t^(n-1)
    # (1 - t)^(L - n) dt, computed here with exact polynomial integration.
    cfg = text_config("data.seq_len=4", "model.max_seq_len=4", "diffusion.objective=llada",
                      "diffusion.schedule=llada", "model.init_std=0.5")
    params = random_params(cfg, seed=1)
    text = [72, 105, 33, 10]
    a = subset_mean_losses(cfg, params, text)
    eps, length = 1e-3, len(text)
    expected = 0.0
    for n in range(1, length + 1):
        poly = np.polynomial.Polynomial([0, 1]) ** (n - 1) * np.polynomial.Polynomial([1, -1]) ** (length - n)
        integral = poly.integ()(1.0) - poly.integ()(eps)
        expected += a[n] * math.comb(length, n) * integral / (1 - eps)
    samples = 3000
    rng = jax.random.PRNGKey(0)
    estimate = rolling_log_likelihoods(cfg, params, [text], rng=rng, samples=samples, batch_size=1)[0]
    # The same draws one at a time give the estimate's standard error.
    from dlmjax.train.objective import nelbo_terms

    keys = jax.random.split(jax.random.fold_in(rng, 0), samples)
    batch = {"tokens": jnp.asarray([text], jnp.int32), "valid_mask": jnp.ones((1, 4), bool),
             "prompt_mask": jnp.zeros((1, 4), bool)}
    draws = np.asarray(jax.vmap(lambda k: nelbo_terms(params, batch, k, model_cfg=cfg.model,
                                                      diff_cfg=cfg.diffusion)[0].sum())(keys), np.float64)
    np.testing.assert_allclose(estimate, -draws.mean(), rtol=1e-5)
    stderr = draws.std() / math.sqrt(samples)
    assert abs(-estimate - expected) < 5 * stderr, (estimate, expected, stderr)
    assert stderr < 0.05 * expected  # the bound is tight enough to mean something


def ar_config(*extra):
    return text_config("diffusion.objective=bd3", "diffusion.block_size=1", "diffusion.clip_min=1.0",
                       "diffusion.clip_max=1.0", "data.seq_len=8", "model.max_seq_len=8", "model.init_std=0.3", *extra)


def causal_loop(cfg, params, row):
    """Per slot i >= 1 of `row`: (log p(row[i] | row[:i]), whether row[i] is the argmax, the argmax), from the
    prefix with a
    [MASK] appended under a causal mask (query i sees its own [MASK] and the clean tokens before it: the BD3
    pattern at block size 1). SUBS: the mask logit is never a prediction."""
    model = build_model(cfg.model, Causal())
    out = []
    for i in range(1, len(row)):
        inp = jnp.asarray([list(row[:i]) + [cfg.diffusion.mask_id]], jnp.int32)
        logits = np.asarray(model.apply({"params": params}, inp)[0, -1], np.float64)
        logits[cfg.diffusion.mask_id] = -np.inf
        top = logits.max()
        best = int(np.argmax(logits))
        out.append((logits[row[i]] - top - np.log(np.exp(logits - top).sum()), best == row[i], best))
    return out


def test_autoregressive_run_is_exact_against_a_loop_of_causal_forwards():
    cfg = ar_config()
    params = random_params(cfg, seed=2)
    bos = 257  # the byte tokenizer's BOS
    text = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33]  # 13 tokens: rows of 7 after the BOS
    ours = rolling_log_likelihoods(cfg, params, [text], rng=jax.random.PRNGKey(0), bos_id=bos, samples=5)[0]
    expected = sum(lp for start in range(0, len(text), 7)
                   for lp, _, _ in causal_loop(cfg, params, [bos] + text[start:start + 7]))
    np.testing.assert_allclose(ours, expected, rtol=1e-5)


def test_conditional_scores_of_an_autoregressive_run_are_exact_and_greedy_is_the_argmax_chain():
    cfg = ar_config()
    params = random_params(cfg, seed=2)
    prompt = [257, 72, 101]
    loop = causal_loop(cfg, params, prompt + [108, 108, 111, 44, 32])
    greedy_answer = []  # the argmax chain after the prompt: a continuation that must come out greedy
    for _ in range(3):
        greedy_answer.append(causal_loop(cfg, params, prompt + greedy_answer + [0])[-1][2])
    pairs = [(prompt, [108, 108, 111, 44, 32]), (prompt, greedy_answer), ([257], [72])]
    logliks, greedy = conditional_log_likelihoods(cfg, params, pairs, rng=jax.random.PRNGKey(0), batch_size=2)
    np.testing.assert_allclose(logliks[0], sum(lp for lp, _, _ in loop[2:]), rtol=1e-5)
    assert greedy[0] == all(ok for _, ok, _ in loop[2:])
    assert greedy[1] and not greedy[0]
    np.testing.assert_allclose(logliks[2], causal_loop(cfg, params, [257, 72])[0][0], rtol=1e-5)
    with pytest.raises(SettingsError, match="data.seq_len=8"):
        conditional_log_likelihoods(cfg, params, [(prompt, list(range(40, 46)))], rng=jax.random.PRNGKey(0))


def test_conditional_nelbo_of_a_block_diffusion_run_is_its_training_nelbo_on_the_same_rows():
    from dlmjax.train.objective import nelbo_terms

    cfg = text_config("diffusion.objective=bd3", "diffusion.block_size=4", "data.seq_len=16",
                      "model.max_seq_len=16")
    params = random_params(cfg, seed=4)
    pairs = [([257, 65, 66], [67, 68, 69, 70, 71]), ([257, 80], [81, 82])]
    rng = jax.random.PRNGKey(5)
    logliks, _ = conditional_log_likelihoods(cfg, params, pairs, rng=rng, batch_size=2)
    tokens = np.zeros((2, 16), np.int32)
    valid = np.zeros((2, 16), bool)
    prompt = np.zeros((2, 16), bool)
    for i, (p, a) in enumerate(pairs):
        tokens[i, :len(p) + len(a)] = p + a
        valid[i, :len(p) + len(a)] = True
        prompt[i, :len(p)] = True
    batch = {"tokens": jnp.asarray(tokens), "valid_mask": jnp.asarray(valid), "prompt_mask": jnp.asarray(prompt)}
    key = jax.random.split(jax.random.fold_in(rng, 0), 1)[0]
    nll, scored = nelbo_terms(params, batch, key, model_cfg=cfg.model, diff_cfg=cfg.diffusion)
    assert np.asarray(scored).sum(1).tolist() == [5, 2]  # the answers only
    np.testing.assert_allclose(logliks, -np.asarray(nll).sum(1), rtol=1e-5)


def test_ar_token_log_probs_refuses_a_diffusion_run():
    cfg = text_config()
    with pytest.raises(ValueError, match="block_size=1"):
        ar_token_log_probs(cfg, random_params(cfg), jnp.zeros((1, 32), jnp.int32), jnp.ones((1, 32), bool))


def test_text_rows_cover_every_token_once():
    texts = [list(range(1, 18)), [], [5]]
    rows = text_rows(texts, 8, bos_id=0, pad_id=99)
    assert rows.text_index.tolist() == [0, 0, 0, 2]
    assert (rows.tokens[:, 0] == 0).all() and rows.prompt_mask[:, 0].all() and not rows.prompt_mask[:, 1:].any()
    body = rows.tokens[:3][rows.valid_mask[:3] & ~rows.prompt_mask[:3]]
    assert body.tolist() == texts[0]
    assert rows.valid_mask.sum(1).tolist() == [8, 8, 4, 2]
    plain = text_rows(texts, 8)
    assert plain.tokens[plain.valid_mask].tolist() == texts[0] + texts[2] and not plain.prompt_mask.any()


def test_bad_token_ids_are_refused_before_any_work():
    cfg = text_config()
    with pytest.raises(SettingsError, match="text 1 holds token id 259"):
        rolling_log_likelihoods(cfg, None, [[1, 2], [3, cfg.diffusion.mask_id]], rng=jax.random.PRNGKey(0))


def test_an_empty_text_scores_zero_and_a_longer_text_scores_less():
    cfg = text_config()
    params = random_params(cfg)
    a, b, c = rolling_log_likelihoods(cfg, params, [[], [65, 66], [65, 66] * 40], rng=jax.random.PRNGKey(1),
                                      samples=64)  # a 2-token row often masks nothing in one draw
    assert a == 0.0 and c < b < 0.0
