"""LLaDA's Monte Carlo log-likelihood (`dlmjax.likelihood`): exact cases, the exact expectation by enumeration,
the stratified mask counts, the LLaDA golden and compile counts."""
from __future__ import annotations

import itertools
import json
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compiles, tiny_model_config

from dlmjax.errors import SettingsError
from dlmjax.likelihood import (count_table, greedy_check, greedy_checks, log_likelihood, log_likelihoods,
                               masked_counts, row_losses)
from dlmjax.models.transformer import init_params
from dlmjax.sampling import Denoiser

MASK_ID = 39  # the tiny model's last id
PROMPT = [5, 17, 2, 30, 11]


@pytest.fixture(scope="module")
def tiny():
    config = tiny_model_config()
    return Denoiser(config), init_params(config, jax.random.PRNGKey(3))


def direct_log_probs(denoiser, params, rows) -> np.ndarray:
    """log_softmax of one unpadded forward over `rows` int[N, L] -> float64[N, L, V]."""
    logits = denoiser(params, jnp.asarray(rows, jnp.int32))
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)


# ---------------------------------------------------------------------------------------------------------------
# Exact cases


@pytest.mark.parametrize("mc_num,batch_size", [(1, 1), (8, 8), (12, 4), (6, 3)])
def test_one_token_answer_is_the_log_softmax_at_the_masked_slot(tiny, mc_num, batch_size):
    denoiser, params = tiny
    answer = 23
    expected = direct_log_probs(denoiser, params, [PROMPT + [MASK_ID]])[0, -1, answer]
    got = log_likelihood(denoiser, params, PROMPT, [answer], mask_id=MASK_ID, mc_num=mc_num,
                         batch_size=batch_size, rng=jax.random.PRNGKey(mc_num))
    assert abs(got - expected) < 1e-5, (got, expected)


def test_one_token_answer_with_guidance_mixes_the_unconditional_copy(tiny):
    denoiser, params = tiny
    answer, w = 23, 1.5
    cond = np.asarray(denoiser(params, jnp.asarray([PROMPT + [MASK_ID]])))[0, -1].astype(np.float64)
    uncond = np.asarray(denoiser(params, jnp.asarray([[MASK_ID] * (len(PROMPT) + 1)])))[0, -1].astype(np.float64)
    mixed = uncond + (w + 1) * (cond - uncond)
    expected = mixed[answer] - np.log(np.exp(mixed - mixed.max()).sum()) - mixed.max()
    got = log_likelihood(denoiser, params, PROMPT, [answer], mask_id=MASK_ID, mc_num=4, batch_size=2,
                         cfg_scale=w, rng=jax.random.PRNGKey(0))
    assert abs(got - expected) < 1e-5, (got, expected)


# ---------------------------------------------------------------------------------------------------------------
# The exact expectation, by enumerating every masked subset


def subset_means(denoiser, params, prompt, answer) -> dict[int, float]:
    """A(n): the mean over all n-subsets S of the answer of the summed cross-entropy of the tokens in S."""
    la, lp = len(answer), len(prompt)
    subsets = [s for n in range(1, la + 1) for s in itertools.combinations(range(la), n)]
    rows = [prompt + [MASK_ID if j in s else t for j, t in enumerate(answer)] for s in subsets]
    logp = direct_log_probs(denoiser, params, rows)
    totals: dict[int, list[float]] = {}
    for r, s in enumerate(subsets):
        totals.setdefault(len(s), []).append(-sum(logp[r, lp + j, answer[j]] for j in s))
    return {n: float(np.mean(v)) for n, v in totals.items()}


def exact_expectation(means: dict[int, float], la: int, batch_size: int) -> float:
    """E[estimate] = -(1/La) sum_k (1/b) sum_i (La / n_i(k)) A(n_i(k)) (uniform counts: -sum_n A(n) / n)."""
    total = 0.0
    for k in range(1, la + 1):
        total += np.mean([la / n * means[n] for n in masked_counts(k, la, batch_size)])
    return -total / la


ANSWERS = {2: [8, 21], 3: [4, 33, 12], 4: [19, 7, 26, 1]}


@pytest.mark.parametrize("batch_size", [1, 8])
def test_estimate_matches_the_exact_expectation_by_enumeration(tiny, batch_size):
    denoiser, params = tiny
    mc_num = 4096
    requests = [(PROMPT, a) for a in ANSWERS.values()]
    rows = row_losses(denoiser, params, requests, mask_id=MASK_ID, mc_num=mc_num, batch_size=batch_size,
                      rng=jax.random.PRNGKey(11)).astype(np.float64)  # [R, rounds, b]
    zs = {}
    for r, (la, answer) in enumerate(ANSWERS.items()):
        means = subset_means(denoiser, params, PROMPT, answer)
        exact = exact_expectation(means, la, batch_size)
        uniform = -sum(means[n] / n for n in range(1, la + 1))
        if batch_size == 1:
            assert exact == pytest.approx(uniform, rel=1e-12)
        round_means = rows[r].mean(axis=1)  # rows of a round share k: the rounds are the independent draws
        estimate = -round_means.mean()
        stderr = round_means.std(ddof=1) / np.sqrt(len(round_means))
        zs[la] = (estimate - exact) / stderr
        print(f"b={batch_size} La={la}: estimate {estimate:.5f} exact {exact:.5f} (uniform-count formula "
              f"{uniform:.5f}) stderr {stderr:.5f} z {zs[la]:+.2f}")
    assert all(abs(z) < 5 for z in zs.values()), zs


# ---------------------------------------------------------------------------------------------------------------
# Stratified counts


def reference_counts(k: int, la: int, b: int) -> list[int]:
    """With b a power of two, k + i La / b is exact in float32: round it exactly, half to even (Python's round)."""
    return [(round(Fraction(k) + Fraction(i * la, b)) - 1) % la + 1 for i in range(b)]


@pytest.mark.parametrize("b", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("la", [1, 2, 3, 4, 5, 7])
def test_masked_counts_match_exact_rounding_half_to_even(b, la):
    for k in range(1, la + 1):
        assert masked_counts(k, la, b).tolist() == reference_counts(k, la, b), (k, la, b)
    assert count_table(la, b).tolist() == [reference_counts(k, la, b) for k in range(1, la + 1)]


def test_masked_counts_ties_at_batch_size_8():
    # La=2, b=8, k=1: 1, 1.25, 1.5, 1.75, 2, 2.25, 2.5, 2.75 -> 1, 1, 2, 2, 2, 2, 2, 3 -> wrapped into 1..2.
    assert masked_counts(1, 2, 8).tolist() == [1, 1, 2, 2, 2, 2, 2, 1]
    assert masked_counts(2, 2, 8).tolist() == [2, 2, 2, 1, 1, 1, 2, 2]  # 2.5 -> 2, 3.5 -> 4 -> 2
    # La=3, b=8, k=1: 1, 1.375, ..., 3.625, with 2.5 at i=4 rounding down to 2 and 3.625 wrapping to 1.
    assert masked_counts(1, 3, 8).tolist() == [1, 1, 2, 2, 2, 3, 3, 1]
    # Not uniform: at La=2, b=8 a row masks both answer tokens in 10 of the 16 (k, row) cells.
    assert (count_table(2, 8) == 2).sum() == 10


def test_mc_num_must_be_a_multiple_of_batch_size(tiny):
    denoiser, params = tiny
    with pytest.raises(SettingsError, match="mc_num=10") as err:
        log_likelihood(denoiser, params, PROMPT, [3], mask_id=MASK_ID, mc_num=10, batch_size=4,
                       rng=jax.random.PRNGKey(0))
    assert err.value.field == "mc_num"
    with pytest.raises(SettingsError) as err:
        log_likelihood(denoiser, params, PROMPT, [MASK_ID], mask_id=MASK_ID, rng=jax.random.PRNGKey(0))
    assert err.value.field == "answer_ids"


def test_a_request_estimate_does_not_depend_on_its_neighbours(tiny):
    denoiser, params = tiny
    target = (PROMPT, ANSWERS[3])
    kwargs = dict(mask_id=MASK_ID, mc_num=8, batch_size=4, rng=jax.random.PRNGKey(5))
    with_short = log_likelihoods(denoiser, params, [(PROMPT, [1, 2]), target], **kwargs)
    with_long = log_likelihoods(denoiser, params, [(PROMPT * 4, [1, 2, 3]), target], **kwargs)  # other bucket
    assert with_short[1] == pytest.approx(with_long[1], rel=1e-6, abs=1e-6)
    assert with_short[0] != pytest.approx(with_short[1])


# ---------------------------------------------------------------------------------------------------------------
# Greedy check


def reference_greedy(denoiser, params, prompt, la) -> list[int]:
    row = list(prompt) + [MASK_ID] * la
    for _ in range(la):
        logp = direct_log_probs(denoiser, params, [row])[0]
        open_ = [j for j in range(len(prompt), len(row)) if row[j] == MASK_ID]
        conf = {j: logp[j].max() for j in open_}
        best = max(open_, key=lambda j: (conf[j], -j))
        row[best] = int(logp[best].argmax())
    return row[len(prompt):]


def test_greedy_check_matches_a_plain_reference(tiny):
    denoiser, params = tiny
    filled = reference_greedy(denoiser, params, PROMPT, 3)
    other = filled[:2] + [(filled[2] + 1) % MASK_ID]
    assert greedy_check(denoiser, params, PROMPT, filled, mask_id=MASK_ID)
    assert greedy_checks(denoiser, params, [(PROMPT, other), (PROMPT, filled)], mask_id=MASK_ID) == [False, True]


# ---------------------------------------------------------------------------------------------------------------
# The LLaDA golden


def test_golden_llada_loglik_and_is_greedy(golden_dir):
    from dlmjax.interchange import import_hf

    folder = golden_dir / "tiny_llada_chat"
    golden = json.loads((folder / "golden_loglik.json").read_text())["single_token"]
    cfg, params, _ = import_hf(folder, "llada")
    denoiser, mask_id = Denoiser(cfg.model), cfg.diffusion.mask_id
    requests = [(g["context_ids"], g["continuation_ids"]) for g in golden]
    for mc_num, batch_size in [(1, 1), (8, 8)]:
        got = log_likelihoods(denoiser, params, requests, mask_id=mask_id, mc_num=mc_num, batch_size=batch_size,
                              rng=jax.random.PRNGKey(0))
        diffs = np.abs(got - np.array([g["loglik"] for g in golden]))
        print(f"golden mc_num={mc_num} batch_size={batch_size}: |diff| {diffs.tolist()}")
        assert diffs.max() < 1e-4, diffs
    greedy = greedy_checks(denoiser, params, requests, mask_id=mask_id)
    assert greedy == [g["is_greedy"] for g in golden]
    assert greedy_check(denoiser, params, *requests[1], mask_id=mask_id)


# ---------------------------------------------------------------------------------------------------------------
# Compilation


@pytest.mark.parametrize("name", ["_row_losses", "_greedy_fill"])
def test_same_shapes_compile_once(tiny, name):
    denoiser, params = tiny
    def run(requests, seed):
        if name == "_row_losses":  # settings used by no other test, so the first call must compile
            log_likelihoods(denoiser, params, requests, mask_id=MASK_ID, mc_num=6, batch_size=3, group=2,
                            rng=jax.random.PRNGKey(seed))
        else:
            greedy_checks(denoiser, params, requests, mask_id=MASK_ID, group=3)

    with compiles(name) as counter:
        run([(PROMPT, [1, 2]), (PROMPT[:3], [4, 5, 6, 7])], 0)
        first = counter.count
        run([(PROMPT[:4], [9]), (PROMPT, [3, 3, 3])], 1)  # other lengths, same bucket and group
        second = counter.count - first
    assert (first, second) == (1, 0)


def test_notebook_entry_takes_a_run_config_and_its_mask_id():
    from conftest import tiny_run_config

    import dlmjax
    from dlmjax.models.transformer import init_params as init

    cfg = tiny_run_config()
    params = init(cfg.model, jax.random.PRNGKey(0))
    prompt, answer = [257, 49, 43, 50, 61], 51  # BOS "1+2=" and "3"
    row = np.array([prompt + [cfg.diffusion.mask_id]])
    expected = direct_log_probs(Denoiser(cfg.model), params, row)[0, -1, answer]
    got = dlmjax.log_likelihood(cfg, params, prompt, [answer], mc_num=4, batch_size=2, rng=jax.random.PRNGKey(1))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert dlmjax.greedy_check(cfg, params, prompt, [answer]) == (
        int(np.argmax(direct_log_probs(Denoiser(cfg.model), params, row)[0, -1])) == answer)
    with pytest.raises(TypeError, match="mask_id"):
        dlmjax.log_likelihood(cfg.model, params, prompt, [answer], rng=jax.random.PRNGKey(1))
