"""The entropy-bounded commit rule (`EntropyBound`, issue 16 item 2): its selection, its run in the block sampler,
and the settings that refuse it without entropy scores.

The references are written here: a per-row python loop over the ranked slots for the selection, and a naive
per-row block sampler (dense model on the row's prefix under the block-causal mask, softmax entropies in float64)
for the tokens and the pass that commits each slot. Every cut the references make is checked to be far from a
float tie, so equality is not luck.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config
from dlmjax.errors import SettingsError
from dlmjax.models.transformer import init_params
from dlmjax.sampling import (BlockSamplerSettings, Denoiser, SamplerSettings, generate_blocks,
                             generate_blocks_uncached)
from dlmjax.sampling.proposals import DreamProposal, LladaProposal
from dlmjax.sampling.rules import EntropyBound, Threshold, select_entropy_bound
from test_block_rules import block_causal, dense_logits

TIE = 1e-4  # a cut closer than this to the bound would make the comparison luck


# ---------------------------------------------------------------------------------------------------------------
# The selection against a loop


def loop_select(entropies, eligible, bound: float) -> list[int]:
    """One row: the eligible slots by entropy (lowest first, ties: lower slot), the longest prefix with sum <= bound,
    at least one. float64; asserts the cut is not a float tie."""
    order = sorted((i for i in range(len(entropies)) if eligible[i]), key=lambda i: (entropies[i], i))
    taken, total = [], 0.0
    for i in order:
        total += max(entropies[i], 0.0)
        assert abs(total - bound) > TIE, f"a cut within {TIE} of the bound: {total} vs {bound}"
        if total > bound and taken:
            break
        taken.append(i)
    return taken


def loop_select_batch(scores: np.ndarray, bound: float) -> np.ndarray:
    out = np.zeros(scores.shape, bool)
    for r, row in enumerate(scores.astype(np.float64)):
        out[r, loop_select(-row, np.isfinite(row), bound)] = True
    return out


@pytest.mark.parametrize("bound", [0.0, 0.25, 0.75, 1.55, 4.05, 1e3])
def test_selection_equals_a_loop_on_random_scores_with_holes(bound):
    rng = np.random.default_rng(0)
    # Entropies in multiples of 0.1 (many ties, which go to the lower slot); bounds halfway between multiples.
    scores = -(rng.integers(1, 15, size=(64, 12)) / 10).astype(np.float32)
    scores[rng.random(scores.shape) < 0.35] = -np.inf  # clean slots: never chosen
    scores[3] = -np.inf  # a row with nothing masked commits nothing
    scores[4, 1:] = -np.inf  # a row with one masked slot commits it, whatever the bound
    chosen = np.asarray(jax.jit(select_entropy_bound, static_argnums=1)(jnp.asarray(scores), bound))
    np.testing.assert_array_equal(chosen, loop_select_batch(scores, bound))
    eligible = np.isfinite(scores).sum(-1)
    assert not (chosen & ~np.isfinite(scores)).any()
    assert ((chosen.sum(-1) >= 1) == (eligible >= 1)).all()  # at least one wherever a slot is masked
    if bound == 0:
        np.testing.assert_array_equal(chosen.sum(-1), np.minimum(eligible, 1))
    if bound == 1e3:
        np.testing.assert_array_equal(chosen, np.isfinite(scores))
    # The rule object: the same choice, no state.
    commits, state = EntropyBound(bound).commits(jnp.asarray(scores), None, 0, jax.random.PRNGKey(0), 4)
    np.testing.assert_array_equal(np.asarray(commits), chosen)
    assert state is None


def test_selection_reads_scores_a_hair_above_zero_as_zero_entropy():
    # `sum p log(p + 1e-10)` is slightly positive for a certain slot: entropy 0, not negative, so it does not
    # lend headroom to the next slot.
    scores = jnp.asarray([[1e-7, 1e-7, -0.3, -np.inf, 0.0, -0.2]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(select_entropy_bound(scores, 0.0)), [[1, 1, 0, 0, 1, 0]])
    np.testing.assert_array_equal(np.asarray(select_entropy_bound(scores, 0.25)), [[1, 1, 0, 0, 1, 1]])
    np.testing.assert_array_equal(np.asarray(select_entropy_bound(scores, 0.45)), [[1, 1, 0, 0, 1, 1]])
    np.testing.assert_array_equal(np.asarray(select_entropy_bound(scores, 0.55)), [[1, 1, 1, 0, 1, 1]])


# ---------------------------------------------------------------------------------------------------------------
# In the block sampler

CFG = tiny_model_config(init_std=0.4)
MASK_ID = CFG.vocab_size - 1
_PARAMS = init_params(CFG, jax.random.PRNGKey(0))
PARAMS = dict(_PARAMS, ff_out=_PARAMS["ff_out"] * 3.0)  # peaked predictions, as in test_block_rules
MAX_LENGTH, BLOCK = 16, 4
LENGTHS = (3, 6, 9)  # prompts ending inside blocks 0, 1 and 2


def make_prompt(lengths, seed=1):
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, MASK_ID, size=n).tolist() for n in lengths]
    width = max(lengths)
    prompt, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        prompt[i, width - len(row):], mask[i, width - len(row):] = row, True
    return prompt, mask, rows


def settings_of(bound: float) -> BlockSamplerSettings:
    return BlockSamplerSettings.bd3(max_length=MAX_LENGTH, block_length=BLOCK, mask_id=MASK_ID, entropy_bound=bound)


def naive_row(prompt: list[int], bound: float):
    """One row alone: (tokens list[T], the step in its block that committed each slot (-1: prompt),
    {block: steps until filled})."""
    tokens = list(prompt) + [MASK_ID] * (MAX_LENGTH - len(prompt))
    at_step, row_steps = [-1] * MAX_LENGTH, {}
    for b in range(MAX_LENGTH // BLOCK):
        n = (b + 1) * BLOCK
        masked = [i for i in range(BLOCK) if tokens[b * BLOCK + i] == MASK_ID]
        step = 0
        while masked:
            logits = np.asarray(dense_logits(CFG, PARAMS, np.asarray([tokens[:n]], np.int32),
                                             block_causal(n, BLOCK)), np.float64)[0, b * BLOCK:n]
            logits[:, MASK_ID] = -np.inf
            ordered = np.sort(logits, axis=-1)
            assert (ordered[:, -1] - ordered[:, -2] > TIE).all(), "argmax tie"
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
            order = sorted(masked, key=lambda i: entropy[i])
            for a, c in zip(order, order[1:]):  # which slots rank first must not hinge on a float tie
                assert abs(entropy[a] - entropy[c]) > TIE
            chosen = loop_select(entropy, [i in masked for i in range(BLOCK)], bound)
            for i in chosen:
                tokens[b * BLOCK + i], at_step[b * BLOCK + i] = int(logits[i].argmax()), step
            masked = [i for i in masked if i not in chosen]
            step += 1
        row_steps[b] = step
    return tokens, at_step, row_steps


BOUNDS = (0.0, 0.5, 1.5, 1e3)
CHECKED = (0.5, 1.5)  # the bounds held against the naive loop
TWIN = 1.5  # and the bound the uncached twin runs (each bound and sampler is its own compile: the rule is static)


@pytest.fixture(scope="module")
def runs():
    """Per bound: (cached tokens, nfe, trace), and at TWIN the uncached twin's (tokens, nfe, trace)."""
    prompt, mask, _ = make_prompt(LENGTHS)
    out = {}
    for bound in BOUNDS:
        args = (Denoiser(CFG), PARAMS, prompt, settings_of(bound), jax.random.PRNGKey(0))
        out[bound] = (generate_blocks(*args, prompt_mask=mask, trace=True),
                      generate_blocks_uncached(*args, prompt_mask=mask, trace=True) if bound == TWIN else None)
    return out


@pytest.mark.parametrize("bound", CHECKED)
def test_block_sampler_equals_a_naive_loop_and_commits_every_step(runs, bound):
    _, _, rows = make_prompt(LENGTHS)
    results = [naive_row(r, bound) for r in rows]
    tokens = np.asarray([res[0] for res in results])
    at_step = np.asarray([res[1] for res in results])
    first = min(LENGTHS) // BLOCK
    steps = [max(res[2][b] for res in results) for b in range(first, MAX_LENGTH // BLOCK)]
    # Per row and block the steps 0, 1, ... each commit >= 1 slot until filled; some step commits several.
    per_step = Counter((r, i // BLOCK, s) for r in range(len(rows)) for i, s in enumerate(at_step[r]) if s >= 0)
    for r, b in {(r, b) for r, b, _ in per_step}:
        taken = sorted(s for rr, bb, s in per_step if (rr, bb) == (r, b))
        assert taken == list(range(len(taken))), (r, b, taken)
    assert max(per_step.values()) >= 2

    (cached, nfe, trace), twin = runs[bound]
    np.testing.assert_array_equal(np.asarray(cached), tokens)
    prefill = int(max(LENGTHS) >= BLOCK)  # block.py's count: prefill, the steps, a commit between blocks
    assert int(nfe) == prefill + sum(steps) + len(steps) - 1
    # Every slot was committed at the pass the loop commits it (the twin: no prefill, no commit passes).
    expected, begin = np.full_like(at_step, -1), 0
    for k, b in enumerate(range(first, MAX_LENGTH // BLOCK)):
        part = at_step[:, b * BLOCK:(b + 1) * BLOCK]
        expected[:, b * BLOCK:(b + 1) * BLOCK] = np.where(part >= 0, begin + part, -1)
        begin += steps[k]
    shifted = np.where(expected >= 0, expected + prefill + (np.arange(MAX_LENGTH) // BLOCK - first)[None], -1)
    np.testing.assert_array_equal(np.asarray(trace), shifted)
    if bound == TWIN:
        twin_tokens, twin_nfe, twin_trace = twin
        np.testing.assert_array_equal(np.asarray(twin_tokens), tokens)
        assert int(twin_nfe) == sum(steps)
        np.testing.assert_array_equal(np.asarray(twin_trace), expected)


def test_a_larger_bound_never_takes_more_passes(runs):
    nfes = []
    for bound in BOUNDS:
        (cached, nfe, trace), _ = runs[bound]
        assert (np.asarray(cached) != MASK_ID).all()
        np.testing.assert_array_equal((np.asarray(trace) >= 0).sum(-1), MAX_LENGTH - np.asarray(LENGTHS))
        nfes.append(int(nfe))
    assert nfes == sorted(nfes, reverse=True), dict(zip(BOUNDS, nfes))
    # Closed forms at the ends (a prefill, the steps, a commit pass after each of the 4 visited blocks but the
    # last): bound 0 commits one slot per step (the shortest prompt, 3 tokens, leaves 1 slot of block 0 and 4 in
    # each later block); a huge bound fills each block in one step.
    assert nfes[0] == 1 + (1 + 3 * BLOCK) + 3
    assert nfes[-1] == 1 + 4 + 3
    assert nfes[1] < nfes[0]


# ---------------------------------------------------------------------------------------------------------------
# Settings


def one_line(e) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def test_settings_build_the_rule_with_entropy_scores_and_refuse_others():
    common = dict(max_length=MAX_LENGTH, block_length=BLOCK, mask_id=MASK_ID)
    built = BlockSamplerSettings.bd3(**common, entropy_bound=0.5)
    assert built.rule == EntropyBound(0.5) and built.proposal.confidence == "entropy"
    assert BlockSamplerSettings.bd3(**common).proposal.confidence == "low_confidence"  # the default is unchanged
    llada = SamplerSettings.llada(gen_length=8, steps=8, mask_id=MASK_ID, entropy_bound=0.5)
    assert llada.rule == EntropyBound(0.5) and llada.proposal.confidence == "entropy"
    # Dream's proposal scores by entropy too.
    SamplerSettings(gen_length=8, steps=8, tokens=built.tokens, proposal=DreamProposal(confidence="entropy"),
                    rule=EntropyBound(1.0))

    for kind in ("random", "low_confidence"):
        with pytest.raises(SettingsError) as e:
            BlockSamplerSettings.bd3(**common, entropy_bound=0.5, remasking=kind)
        assert e.value.field == "rule" and one_line(e).startswith("BlockSamplerSettings.rule=") and kind in str(e.value)
    for proposal in (LladaProposal(), LladaProposal(confidence="margin"), DreamProposal()):
        with pytest.raises(SettingsError) as e:
            SamplerSettings(gen_length=8, steps=8, tokens=built.tokens, proposal=proposal, rule=EntropyBound(1.0))
        assert e.value.field == "rule" and one_line(e).startswith("SamplerSettings.rule=")
    with pytest.raises(SettingsError) as e:
        dataclasses.replace(built, proposal=LladaProposal())
    assert e.value.field == "rule"
    with pytest.raises(SettingsError) as e:  # without the bound, entropy is still no block-sampler ranking
        BlockSamplerSettings.bd3(**common, remasking="entropy")
    assert e.value.field == "remasking"

    for bad in (-0.1, float("nan"), float("inf"), "1", True):
        with pytest.raises(SettingsError) as e:
            EntropyBound(bad)
        assert e.value.field == "bound" and one_line(e).startswith("EntropyBound.bound=")
    with pytest.raises(SettingsError) as e:
        BlockSamplerSettings.bd3(**common, entropy_bound=-1.0)
    assert e.value.field == "bound"
    for other in (dict(threshold=0.9), dict(factor=1.0)):
        with pytest.raises(SettingsError) as e:
            BlockSamplerSettings.bd3(**common, entropy_bound=0.5, **other)
        assert e.value.field == "entropy_bound" and one_line(e).startswith("BlockSamplerSettings.entropy_bound")
        with pytest.raises(SettingsError) as e:
            SamplerSettings.llada(gen_length=8, steps=8, mask_id=MASK_ID, entropy_bound=0.5, **other)
        assert e.value.field == "entropy_bound"
    # The existing pair keeps its message.
    with pytest.raises(SettingsError) as e:
        BlockSamplerSettings.bd3(**common, threshold=0.9, factor=1.0)
    assert e.value.field == "factor" and isinstance(BlockSamplerSettings.bd3(**common, threshold=0.9).rule, Threshold)


def test_the_front_door_and_the_command_line_take_an_entropy_bound(tmp_path, capsys):
    """`SampleRequest(entropy_bound=...)` (`dlmjax sample --entropy-bound`) builds the rule with entropy scores for
    both samplers; a remasking that is not entropy is refused in one line; a bd3 run samples with it end to end."""
    from conftest import tiny_run_config

    from dlmjax.checkpoint import save_params
    from dlmjax.cli import main
    from dlmjax.inference import SampleRequest, sampler_settings, special_tokens

    for objective in ((), ("diffusion.objective=bd3", "diffusion.block_size=4")):
        cfg = tiny_run_config(*objective)
        settings = sampler_settings(cfg, special_tokens(cfg), 9, SampleRequest(entropy_bound=0.5))
        assert settings.rule == EntropyBound(0.5) and settings.proposal.confidence == "entropy"
        with pytest.raises(SettingsError) as e:
            sampler_settings(cfg, special_tokens(cfg), 9, SampleRequest(entropy_bound=0.5,
                                                                       remasking="low_confidence"))
        assert e.value.field == "rule" and len(str(e.value).splitlines()) == 1
    save_params(tmp_path / "bd3", cfg, init_params(cfg.model, jax.random.PRNGKey(0)))
    assert main(["sample", "--checkpoint", str(tmp_path / "bd3"), "--prompt-ids", "257,49,43,50,61", "--json",
                 "--entropy-bound", "0.5"]) == 0
    assert main(["sample", "--checkpoint", str(tmp_path / "bd3"), "--prompt-ids", "257,49", "--entropy-bound",
                 "-1"]) == 2
    assert "--entropy-bound" in capsys.readouterr().err
