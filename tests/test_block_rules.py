"""Parallel commit rules inside the exact-cache block sampler (issue 16, item 2): Fast-dLLM's threshold and factor
rules and Dream's confidence threshold, run by `generate_blocks`.

The reference is a naive loop written here, one row at a time: for each block and step it runs the dense model on
the row's prefix under the block-causal mask (built from its definition), takes the argmax proposal and its
softmax probability in numpy, and applies the rule's selection written out by hand. Every slot's tokens AND the
step that committed it are held against it, for the cached sampler and its uncached twin; NFE against the
module docstring's count. Each decision the reference makes is checked to be far from a float tie, so the equality
is not luck.
"""
from __future__ import annotations

import dataclasses
import functools
from collections import Counter

import jax
import numpy as np
import pytest

from conftest import compiles, tiny_model_config
from dlmjax.errors import SettingsError
from dlmjax.models.transformer import Transformer, init_params
from dlmjax.sampling import BlockSamplerSettings, Denoiser, SpecialTokens, generate_blocks, generate_blocks_uncached
from dlmjax.sampling.rules import DreamThreshold, Factor, Threshold, TransferTable

CFG = tiny_model_config(init_std=0.4)
MASK_ID = CFG.vocab_size - 1
_PARAMS = init_params(CFG, jax.random.PRNGKey(0))
# A sharper output head: random weights otherwise give confidences far below 0.9, and the threshold rules would
# degrade to one commit per step. x3 spreads them over (0, 1], so some steps commit 1 slot and others several.
PARAMS = dict(_PARAMS, ff_out=_PARAMS["ff_out"] * 3.0)
MAX_LENGTH, BLOCK = 16, 4
LENGTHS = (3, 6, 9)  # prompts ending inside blocks 0, 1 and 2: rows enter at different blocks
TIE = 1e-4  # a decision closer than this to a float tie would make the comparison luck

RULES = {
    "threshold_0.9": dict(threshold=0.9),
    "threshold_0.5": dict(threshold=0.5),  # low: often several slots per step
    "factor_1": dict(factor=1.0),
    "dream_threshold_0.9": dict(rule=DreamThreshold(0.9), steps_per_block=2),  # a budget of 2 slots per step
}


def settings_of(case: str) -> BlockSamplerSettings:
    kwargs = dict(RULES[case])
    rule = kwargs.pop("rule", None)
    settings = BlockSamplerSettings.bd3(max_length=MAX_LENGTH, block_length=BLOCK, mask_id=MASK_ID, **kwargs)
    return settings if rule is None else dataclasses.replace(settings, rule=rule)


def make_prompt(lengths, seed=1):
    """Left-padded prompts int32[B, max(lengths)], their mask, and the rows as lists."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, MASK_ID, size=n).tolist() for n in lengths]
    width = max(lengths)
    prompt = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        prompt[i, width - len(row):] = row
        mask[i, width - len(row):] = True
    return prompt, mask, rows


# ---------------------------------------------------------------------------------------------------------------
# The naive reference


@functools.partial(jax.jit, static_argnums=0)
def dense_logits(cfg, params, tokens, dense_mask):
    positions = np.arange(tokens.shape[1], dtype=np.int32)[None]
    return Transformer(cfg).apply({"params": params}, tokens, positions=positions, dense_mask=dense_mask)


def block_causal(n: int, block: int) -> np.ndarray:
    """bool[1, n, n]: query slot q sees key slot k iff k's block is not after q's."""
    q, k = np.arange(n)[:, None] // block, np.arange(n)[None, :] // block
    return (k <= q)[None]


def propose(tokens: list[int], b: int) -> tuple[np.ndarray, np.ndarray]:
    """Block `b`'s greedy proposals and their confidences (softmax probability, [MASK] excluded), float64[L']."""
    n = (b + 1) * BLOCK
    logits = np.asarray(dense_logits(CFG, PARAMS, np.asarray([tokens[:n]], np.int32), block_causal(n, BLOCK)),
                        np.float64)[0, b * BLOCK:n]
    logits[:, MASK_ID] = -np.inf
    ordered = np.sort(logits, axis=-1)
    assert (ordered[:, -1] - ordered[:, -2] > TIE).all(), "argmax tie"
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    proposal = logits.argmax(-1)
    return proposal, p[np.arange(BLOCK), proposal]


def far(a: float, b: float) -> bool:
    assert abs(a - b) > TIE, f"a decision within {TIE} of a tie: {a} vs {b}"
    return True


def ranked(conf, masked: list[int]) -> list[int]:
    """The masked slots, most confident first (ties: lower slot first)."""
    return sorted(masked, key=lambda i: (-conf[i], i))


def cut(conf, order: list[int], k: int) -> None:
    """The rule takes `order[:k]` as a set: the slots either side of the cut must not be a float tie."""
    if 0 < k < len(order):
        far(conf[order[k - 1]], conf[order[k]])


def pick_threshold(conf, masked, t):
    order = ranked(conf, masked)
    if conf[order[0]] < t:  # only then does it matter which slot is the best
        cut(conf, order, 1)
    return {order[0]} | {i for i in masked if far(conf[i], t) and conf[i] >= t}


def pick_factor(conf, masked, f):
    order = ranked(conf, masked)
    taken = 0
    for n, i in enumerate(order, start=1):  # rank n needs c_n >= 1 - f / (n + 1); rank 1 always passes
        theta = -1.0 if n == 1 else 1.0 - f / (n + 1)
        if not (far(conf[i], theta) and conf[i] >= theta):
            break
        taken = n
    if taken == len(order) - 1:  # the reference's quirk: a first miss at the last rank takes every slot
        taken = len(order)
    cut(conf, order, taken)
    return set(order[:taken])


def pick_dream(conf, masked, t, current):
    """The best slot of the budget `current` always; the others in it at confidence >= t. Returns (chosen,
    accepted beyond the best)."""
    order = ranked(conf, masked)
    cut(conf, order, current)
    budget = order[:current]
    if len(budget) > 1 and conf[budget[1]] < t:  # only then does it matter which slot is the best
        cut(conf, order, 1)
    accepted = [i for i in budget[1:] if far(conf[i], t) and conf[i] >= t]
    return set(budget[:1] + accepted), len(accepted)


def naive_row(prompt: list[int], settings: BlockSamplerSettings):
    """One row alone. Returns (tokens list[T], the step in its block that committed each slot (-1: prompt),
    {block: steps the row keeps its block running})."""
    rule, steps = settings.rule, settings.steps_per_block
    tokens = list(prompt) + [MASK_ID] * (MAX_LENGTH - len(prompt))
    at_step = [-1] * MAX_LENGTH
    row_steps = {}
    for b in range(settings.num_blocks):
        slots = range(b * BLOCK, (b + 1) * BLOCK)
        masked = [i - b * BLOCK for i in slots if tokens[i] == MASK_ID]
        if isinstance(rule, DreamThreshold):  # Dream's loop: S steps, a per-step budget, extended on rejections
            number, left, limit = len(masked) // steps, len(masked) % steps, steps
        step = 0
        while masked and (not isinstance(rule, DreamThreshold) or step < limit):
            proposal, conf = propose(tokens, b)
            if isinstance(rule, Threshold):
                chosen = pick_threshold(conf, masked, rule.threshold)
            elif isinstance(rule, Factor):
                chosen = pick_factor(conf, masked, rule.factor)
            else:
                chosen, accepted = pick_dream(conf, masked, rule.threshold, number + left)
                rejected = max(number + left - 1, 0) - accepted
                if step == limit - 1 and rejected:
                    number, limit = 0, limit + 1
                left = rejected
            for i in chosen:
                tokens[b * BLOCK + i] = int(proposal[i])
                at_step[b * BLOCK + i] = step
            masked = [i for i in masked if i not in chosen]
            step += 1
        # Every rule's block stops once it is filled (the block sampler's early stop), Dream's too.
        row_steps[b] = step
    return tokens, at_step, row_steps


def naive_batch(rows, settings):
    """The batch as the samplers run it: each block takes the most steps any row needs there. Returns (tokens
    int[B, T], step-in-block int[B, T], steps per visited block, first visited block)."""
    results = [naive_row(r, settings) for r in rows]
    first = min(len(r) for r in rows) // BLOCK
    steps = [max(res[2][b] for res in results) for b in range(first, settings.num_blocks)]
    return (np.asarray([res[0] for res in results]), np.asarray([res[1] for res in results]), steps, first)


def trace_from(at_step, steps, first, *, start: int, per_block: int) -> np.ndarray:
    """The forward pass that committed each slot, given where block `first` starts and the passes between blocks."""
    out = np.full_like(at_step, -1)
    begin = start
    for k, b in enumerate(range(first, MAX_LENGTH // BLOCK)):
        part = at_step[:, b * BLOCK:(b + 1) * BLOCK]
        out[:, b * BLOCK:(b + 1) * BLOCK] = np.where(part >= 0, begin + part, -1)
        begin += steps[k] + per_block
    return out


# ---------------------------------------------------------------------------------------------------------------
# The sampler against the reference


@pytest.mark.parametrize("case", list(RULES))
def test_parallel_rule_equals_a_naive_loop_and_commits_every_step(case):
    settings = settings_of(case)
    prompt, mask, rows = make_prompt(LENGTHS)
    tokens, at_step, steps, first = naive_batch(rows, settings)

    # The reference itself: per row and block, steps 0, 1, ... each commit >= 1 slot until the block is filled,
    # and some step commits several (the rule is parallel here, not one slot per step in disguise).
    per_step = Counter((r, i // BLOCK, s) for r in range(len(rows)) for i, s in enumerate(at_step[r]) if s >= 0)
    for r, b in {(r, b) for r, b, _ in per_step}:
        taken = sorted(s for rr, bb, s in per_step if (rr, bb) == (r, b))
        assert taken == list(range(len(taken))), (r, b, taken)
    assert max(per_step.values()) >= 2
    # Batch level: every pass the sampler runs in a block commits something (the block stops once it is filled,
    # so DreamThreshold's step limit never runs passes that commit nothing).
    for k, b in enumerate(range(first, settings.num_blocks)):
        taken = {s for (_, bb, s) in per_step if bb == b}
        assert taken == set(range(steps[k])), (b, taken, steps[k])
    assert all(t != MASK_ID for row in tokens for t in row)

    cached, nfe, trace = generate_blocks(Denoiser(CFG), PARAMS, prompt, settings, jax.random.PRNGKey(0),
                                         prompt_mask=mask, trace=True)
    twin, twin_nfe, twin_trace = generate_blocks_uncached(Denoiser(CFG), PARAMS, prompt, settings,
                                                          jax.random.PRNGKey(0), prompt_mask=mask, trace=True)
    np.testing.assert_array_equal(np.asarray(cached), tokens)
    np.testing.assert_array_equal(np.asarray(twin), tokens)
    # NFE (block.py's count): a prefill if some prompt has a full block, the steps, a commit after each visited
    # block but the last. The twin runs the steps only.
    prefill = int(max(LENGTHS) >= BLOCK)
    assert int(nfe) == prefill + sum(steps) + len(steps) - 1
    assert int(twin_nfe) == sum(steps)
    # Every slot was committed at the very pass the reference commits it.
    np.testing.assert_array_equal(np.asarray(trace), trace_from(at_step, steps, first, start=prefill, per_block=1))
    np.testing.assert_array_equal(np.asarray(twin_trace), trace_from(at_step, steps, first, start=0, per_block=0))


def test_parallel_rules_take_fewer_forwards_than_one_commit_per_step():
    prompt, mask, _ = make_prompt(LENGTHS)
    run = lambda s: int(generate_blocks(Denoiser(CFG), PARAMS, prompt, s, jax.random.PRNGKey(0),  # noqa: E731
                                        prompt_mask=mask)[1])
    table = BlockSamplerSettings.bd3(max_length=MAX_LENGTH, block_length=BLOCK, mask_id=MASK_ID)
    assert table.rule == TransferTable() and table.steps_per_block == BLOCK  # one commit per step and row
    # The shortest prompt (3 tokens) leaves 1 slot of block 0 and 4 in each later block; plus prefill, 3 commits.
    assert run(table) == 1 + (1 + 3 * 4) + 3
    for case in ("threshold_0.9", "threshold_0.5", "factor_1"):
        assert run(settings_of(case)) < run(table), case


def test_a_second_call_with_the_same_shapes_compiles_nothing():
    # Settings no other test uses, so that the first call must compile.
    settings = BlockSamplerSettings.bd3(max_length=MAX_LENGTH, block_length=BLOCK, mask_id=MASK_ID, factor=0.7)
    prompt, mask, _ = make_prompt(LENGTHS)
    other, other_mask, _ = make_prompt((5, 9, 2), seed=9)  # the same width: other values, other lengths
    with compiles("generate_blocks") as first:
        generate_blocks(Denoiser(CFG), PARAMS, prompt, settings, jax.random.PRNGKey(0), prompt_mask=mask)
    with compiles("generate_blocks") as second:
        tokens, _ = generate_blocks(Denoiser(CFG), _PARAMS, other, settings, jax.random.PRNGKey(1),
                                    prompt_mask=other_mask)
        tokens.block_until_ready()
    assert first.count == 1 and second.count == 0


# ---------------------------------------------------------------------------------------------------------------
# Settings and the front door


def test_bd3_constructor_builds_the_rule_and_refuses_two():
    common = dict(max_length=MAX_LENGTH, block_length=BLOCK, mask_id=MASK_ID)
    assert BlockSamplerSettings.bd3(**common, threshold=0.9).rule == Threshold(0.9)
    assert BlockSamplerSettings.bd3(**common, factor=1.5).rule == Factor(1.5)
    with pytest.raises(SettingsError) as e:
        BlockSamplerSettings.bd3(**common, threshold=0.9, factor=1.0)
    assert e.value.field == "factor" and "\n" not in str(e.value) and "BlockSamplerSettings.factor" in str(e.value)
    with pytest.raises(SettingsError, match="threshold") as e:
        BlockSamplerSettings.bd3(**common, threshold=1.5)
    assert "\n" not in str(e.value)


def bd3_config():
    from dlmjax.config import load_config

    cfg = load_config(None, [f"diffusion.mask_id={MASK_ID}", f"data.seq_len={MAX_LENGTH}",
                             "diffusion.objective=bd3", f"diffusion.block_size={BLOCK}"])
    return dataclasses.replace(cfg, model=CFG)


def test_front_door_gives_a_bd3_run_the_parallel_rules_and_still_refuses_masked_only_fields():
    from dlmjax.inference import SampleRequest, sampler_settings

    cfg, tokens = bd3_config(), SpecialTokens(mask_id=MASK_ID)
    settings = sampler_settings(cfg, tokens, 4, SampleRequest(threshold=0.9))
    assert isinstance(settings, BlockSamplerSettings) and settings.rule == Threshold(0.9)
    assert sampler_settings(cfg, tokens, 4, SampleRequest(factor=1.0)).rule == Factor(1.0)
    assert sampler_settings(cfg, tokens, 4).rule == TransferTable()
    for request, flag in ((SampleRequest(threshold=0.9, cache="dual"), "--cache"),
                          (SampleRequest(threshold=0.9, cfg_scale=1.0), "--cfg-scale"),
                          (SampleRequest(alg="confidence_threshold"), "--alg")):
        with pytest.raises(SettingsError) as e:
            sampler_settings(cfg, tokens, 4, request)
        assert str(e.value).startswith(flag) and "\n" not in str(e.value)
    with pytest.raises(SettingsError) as e:
        sampler_settings(cfg, tokens, 4, SampleRequest(threshold=0.9, factor=1.0))
    assert e.value.field == "factor" and "\n" not in str(e.value)


def test_cli_samples_a_bd3_run_with_threshold_as_the_naive_loop(tmp_path, capsys):
    import json

    from dlmjax.checkpoint import save_params
    from dlmjax.cli import main

    export = save_params(tmp_path / "run", bd3_config(), PARAMS)
    prompt = [5, 17, 2]
    assert main(["sample", "--checkpoint", str(export), "--prompt-ids", ",".join(map(str, prompt)),
                 "--gen-length", str(MAX_LENGTH - len(prompt)), "--threshold", "0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tokens, _, steps, _ = naive_batch([prompt], settings_of("threshold_0.5"))
    assert out["tokens"] == tokens.tolist()
    # The front door fuses commits (each finished block is written by the next block's first step) and there is no
    # full prompt block to prefill: one forward per step.
    assert out["nfe"] == sum(steps)
