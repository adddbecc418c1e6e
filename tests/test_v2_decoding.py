"""Shifted ("lead") models in the exact-cache block sampler, Fast-dLLM v2's sub-block decoding and early stop
(issue 16, items 2 and 4).

The references are independent of the sampler's code paths: the raw transformer under a dense mask built from its
definition (`Transformer` with `Causal()` / `BlockCausal(L')`, never the `Denoiser`'s alignment), shifted by hand
(slot i from raw row i - 1), and naive Python loops over one row at a time; the early-stop count replays the
sampler's key chain (`step_keys`) to draw the same uniforms, a model-free count. Decisions the references make are
checked to be far from float ties, so equal tokens are not luck.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compiles, tiny_model_config

from dlmjax.errors import SettingsError
from dlmjax.models.transformer import Transformer, init_params
from dlmjax.sampling import BlockSamplerSettings, Denoiser, SamplerSettings, generate_blocks, generate_blocks_uncached
from dlmjax.sampling.block import lead_and_denoise, lead_chunk_mask
from dlmjax.sampling.proposals import step_keys
from dlmjax.sampling.rules import (DreamOrigin, DreamThreshold, SubBlocks, Threshold, TransferTable,
                                   dream_transfer_fractions)
from kernels_pallas.masks import BlockCausal, Causal

# A shifted model (arch dream: raw row i predicts slot i + 1). Two layers: with one, K/V come from the embeddings
# alone and a mask that showed a slot too much would leave the cache unchanged. A sharper head (x3) spreads the
# confidences over (0, 1], so the threshold rules commit one slot at some steps and several at others.
CFG = tiny_model_config(arch="dream", init_std=0.4)
MASK_ID = CFG.vocab_size - 1
_PARAMS = init_params(CFG, jax.random.key(0))
PARAMS = dict(_PARAMS, ff_out=_PARAMS["ff_out"] * 3.0)
DENOISER = Denoiser(CFG)
TIE = 1e-4


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


@functools.partial(jax.jit, static_argnums=0)
def raw_forward(mask, params, tokens):
    return Transformer(CFG, mask).apply({"params": params}, tokens)


def shifted_logits(mask, tokens: list[int]) -> np.ndarray:
    """float64[T, V]: slot i's logits are the raw row i - 1 of one dense forward of the row (slot 0: none)."""
    raw = np.asarray(raw_forward(mask, PARAMS, jnp.asarray([tokens], jnp.int32))[0], np.float64)
    return np.concatenate([np.full_like(raw[:1], np.nan), raw[:-1]])


def greedy(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argmax token, its softmax probability) per row of float64[n, V], the mask id never proposed; asserts the
    argmax is not a float tie (rows of NaN, slot 0's, predict nothing and are never used)."""
    logits = logits.copy()
    logits[:, MASK_ID] = -np.inf
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert (np.isnan(top2[:, 1]) | (top2[:, 1] - top2[:, 0] > TIE)).all(), "argmax near a tie"
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    proposal = logits.argmax(-1)
    return proposal, probs[np.arange(len(proposal)), proposal]


# ---------------------------------------------------------------------------------------------------------------
# The lead pass: the chunk's mask and its logits


@pytest.mark.parametrize("length", [1, 4])
def test_lead_pass_mask_is_block_causal_restricted_to_the_chunk_and_its_logits_are_the_dense_rows(length):
    total = 16
    full = BlockCausal(length).dense(total, total)
    for start in range(length, total, length):
        np.testing.assert_array_equal(lead_chunk_mask(length), full[start - 1:start + length, start - 1:start + length])

    # Its logits: the block's rows of one dense forward under the block-causal mask, shifted by hand. The block
    # holds masks and a clean slot; the blocks after it hold other tokens, which the mask must hide.
    rng = np.random.default_rng(length)
    tokens = rng.integers(0, MASK_ID, size=(2, total)).astype(np.int32)
    start = 2 * length if length > 1 else 5
    tokens[:, start:start + length] = np.where(rng.random((2, length)) < 0.7, MASK_ID, tokens[:, start:start + length])

    @functools.partial(jax.jit, static_argnums=2)
    def cached(params, tokens, start):
        cache = DENOISER.init_cache(2, total)
        prefix = tokens[:, :start]
        _, cache = DENOISER.forward_cached(
            params, prefix, positions=jnp.broadcast_to(jnp.arange(start), prefix.shape), cache=cache,
            update_cache=True, dense_mask=BlockCausal(length).dense(start, start)[None],
            cache_ranges=jnp.zeros((2, 0, 2), jnp.int32))
        return lead_and_denoise(DENOISER, params, cache, tokens[:, start - 1:start],
                                tokens[:, start:start + length], jnp.int32(start))

    got = np.asarray(cached(PARAMS, tokens, start))
    raw = np.asarray(raw_forward(BlockCausal(length), PARAMS, tokens))
    # float32, 1e-5 relative to the logits' scale (the cached pass sums its softmax in two segments).
    np.testing.assert_allclose(got, raw[:, start - 1:start + length - 1], rtol=1e-5, atol=1e-5 * np.abs(raw).max())


# ---------------------------------------------------------------------------------------------------------------
# Shifted models: cached == uncached, and block 1 is greedy autoregressive decoding


def settings_for(max_length, block_length, steps, temperature=0.0, eos_id=None, **kw):
    return BlockSamplerSettings.bd3(max_length=max_length, block_length=block_length, steps_per_block=steps,
                                    temperature=temperature, mask_id=MASK_ID, eos_id=eos_id,
                                    pad_id=None if eos_id is None else 0, **kw)


# Prompts ending inside blocks 0 (the block with no slot before it: the lead is a placeholder), 1 and 2.
LEAD_CASES = {
    "bl4-greedy-eos": ([3, 6, 9], settings_for(16, 4, 2, eos_id=15)),
}
SLOW_LEAD_CASES = {
    "bl8-T": ([3, 10], settings_for(24, 8, 4, temperature=0.8, top_k=8)),
    "bl4-T-eos": ([3, 6, 9], settings_for(16, 4, 3, temperature=1.0, eos_id=23)),
    "bl8-greedy-eos": ([3, 10], settings_for(24, 8, 8, eos_id=27)),
    "bl8-threshold": ([5, 9], settings_for(24, 8, None, threshold=0.5)),
}


def check_cached_equals_uncached(lengths, settings):
    prompt, mask, rows = make_prompt(lengths)
    rng = jax.random.key(7)
    run = functools.partial(generate_blocks, DENOISER, PARAMS, prompt, settings, rng, prompt_mask=mask)
    fused, fused_nfe = run(fuse_commits=True)
    unfused, unfused_nfe = run(fuse_commits=False)
    twin, twin_nfe = generate_blocks_uncached(DENOISER, PARAMS, prompt, settings, rng, prompt_mask=mask)
    fused = np.asarray(fused)
    np.testing.assert_array_equal(fused, unfused)
    np.testing.assert_array_equal(fused, twin)
    assert not (fused == MASK_ID).any()
    for r, row in enumerate(rows):
        assert fused[r, :len(row)].tolist() == row
    # Fewer forwards fused: one commit per visited block after the first, and none has zero steps here (the row
    # with the shortest prompt generates in every block) unless EOS stopped it.
    assert int(fused_nfe) < int(unfused_nfe)
    assert int(twin_nfe) <= int(fused_nfe)
    eos = settings.tokens.eos_id
    if eos is not None:  # the case does what it is named for: a row stops before the last block, another not
        before_last = (settings.num_blocks - 1) * settings.block_length
        stopped = [eos in fused[r, len(row):before_last] for r, row in enumerate(rows)]
        assert any(stopped) and not all(stopped), fused
    return fused


@pytest.mark.parametrize("name", list(LEAD_CASES))
def test_shifted_model_cached_equals_uncached(name):
    check_cached_equals_uncached(*LEAD_CASES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_LEAD_CASES))
def test_shifted_model_cached_equals_uncached_more(name):
    check_cached_equals_uncached(*SLOW_LEAD_CASES[name])


def naive_greedy_ar(prompt: list[int], total: int) -> list[int]:
    """Greedy autoregressive decoding with the causal LM: the whole row recomputed for every token."""
    tokens = list(prompt) + [MASK_ID] * (total - len(prompt))
    for n in range(len(prompt), total):
        proposal, _ = greedy(shifted_logits(Causal(), tokens)[n:n + 1])
        tokens[n] = int(proposal[0])
    return tokens


def test_block_length_1_is_greedy_autoregressive_decoding_at_one_forward_per_token():
    total = 12
    settings = settings_for(total, 1, 1)
    # The same shapes twice (one compile): ragged prompts, then equal ones. The prompt's prefill also predicts
    # the first slot the shortest prompt's row generates (the seed), so every slot that row generates costs exactly
    # one forward.
    for lengths in ([5, 2], [5, 5]):
        prompt, mask, rows = make_prompt(lengths, seed=3)
        tokens, nfe, trace = generate_blocks(DENOISER, PARAMS, prompt, settings, jax.random.key(0),
                                             prompt_mask=mask, fuse_commits=True, trace=True)
        np.testing.assert_array_equal(np.asarray(tokens), [naive_greedy_ar(row, total) for row in rows])
        assert int(nfe) == total - min(lengths)
        # Pass k (0: the prefill) commits slot min(lengths) + k.
        slots = np.arange(total)
        want = [np.where(slots >= n, slots - min(lengths), -1) for n in lengths]
        np.testing.assert_array_equal(np.asarray(trace), want)


# ---------------------------------------------------------------------------------------------------------------
# Fast-dLLM v2: sub-block decoding


def naive_v2_row(prompt: list[int], settings: BlockSamplerSettings):
    """One row alone, as Fast-dLLM v2 decodes it: per block, while a slot is masked, one forward of the row under
    the block-causal mask; the first sub-block holding a masked slot commits its most confident masked slot and
    every masked slot there with confidence >= threshold. Returns (tokens, the step in its block that committed
    each slot (-1: prompt), {block: steps})."""
    total, length = settings.max_length, settings.block_length
    sub, threshold = settings.rule.length, settings.rule.inner.threshold
    tokens = list(prompt) + [MASK_ID] * (total - len(prompt))
    at_step, steps = [-1] * total, {}
    for b in range(settings.num_blocks):
        lo, step = b * length, 0
        while any(tokens[i] == MASK_ID for i in range(lo, lo + length)):
            proposal, conf = greedy(shifted_logits(BlockCausal(length), tokens)[lo:lo + length])
            masked = [j for j in range(length) if tokens[lo + j] == MASK_ID]
            current = min(j // sub for j in masked)
            candidates = [j for j in masked if j // sub == current]
            best = max(candidates, key=lambda j: (conf[j], -j))
            assert all(abs(conf[j] - threshold) > TIE for j in candidates)
            if conf[best] < threshold:  # the best alone commits: it must be clearly the best
                assert all(conf[best] - conf[j] > TIE for j in candidates if j != best)
            for j in {best} | {j for j in candidates if conf[j] >= threshold}:
                tokens[lo + j], at_step[lo + j] = int(proposal[j]), step
            step += 1
        steps[b] = step
    return tokens, at_step, steps


def expected_trace(at_step, steps, first, begin) -> np.ndarray:
    """The pass that committed each slot, given the pass that runs block `first`'s step 0 and no pass between
    blocks (the fused sampler without EOS, or the uncached twin)."""
    out = np.full_like(at_step, -1)
    length = at_step.shape[1] // (first + len(steps))
    for k, b in enumerate(range(first, first + len(steps))):
        part = at_step[:, b * length:(b + 1) * length]
        out[:, b * length:(b + 1) * length] = np.where(part >= 0, begin + part, -1)
        begin += steps[k]
    return out


V2 = BlockSamplerSettings.v2(max_length=16, block_length=8, sub_block_length=4, threshold=0.5, mask_id=MASK_ID)


def test_v2_decoding_equals_a_naive_loop_commits_inside_the_current_sub_block_and_compiles_once():
    assert V2.fuse_commits and V2.rule == SubBlocks(4, Threshold(0.5))
    lengths = [3, 6, 9]
    prompt, mask, rows = make_prompt(lengths, seed=2)
    results = [naive_v2_row(row, V2) for row in rows]
    first = min(lengths) // V2.block_length
    steps = [max(res[2][b] for res in results) for b in range(first, V2.num_blocks)]
    tokens, at_step = np.asarray([res[0] for res in results]), np.asarray([res[1] for res in results])

    # The reference itself, per row and block: each step commits >= 1 slot, all inside the first sub-block that
    # holds a masked slot, and some step commits several (the rule is parallel here).
    several = False
    for r, row in enumerate(rows):
        for b in range(V2.num_blocks):
            lo = b * V2.block_length
            for s in range(results[r][2][b]):
                chosen = [j for j in range(V2.block_length) if at_step[r, lo + j] == s]
                masked_before = [j for j in range(V2.block_length) if at_step[r, lo + j] >= s]
                assert chosen and {j // 4 for j in chosen} == {min(masked_before) // 4}, (r, b, s)
                several |= len(chosen) > 1
    assert several

    with compiles("generate_blocks") as counter:
        cached, nfe, trace = generate_blocks(DENOISER, PARAMS, prompt, V2, jax.random.key(0), prompt_mask=mask,
                                             trace=True)
        compiled = counter.count
        # New prompt values, mask, key and params, the same shapes: no recompile.
        other, other_mask, _ = make_prompt([5, 1, 9], seed=9)
        generate_blocks(DENOISER, jax.tree.map(lambda w: 1.1 * w, PARAMS), other, V2, jax.random.key(1),
                        prompt_mask=other_mask, trace=True)[0].block_until_ready()
    assert (compiled, counter.count - compiled) == (1, 0)
    twin, twin_nfe, twin_trace = generate_blocks_uncached(DENOISER, PARAMS, prompt, V2, jax.random.key(0),
                                                          prompt_mask=mask, trace=True)
    np.testing.assert_array_equal(np.asarray(cached), tokens)
    np.testing.assert_array_equal(np.asarray(twin), tokens)
    # Fused (v2's commit pass is the first forward of the next block): the prefill (some prompt has a full block)
    # also runs block 0's first step (block-causal, block 0 sees only itself), so one forward per step. The twin:
    # the steps.
    assert int(nfe) == sum(steps)
    assert int(twin_nfe) == sum(steps)
    # Every slot was committed at the pass the reference commits it.
    np.testing.assert_array_equal(np.asarray(trace), expected_trace(at_step, steps, first, begin=0))
    np.testing.assert_array_equal(np.asarray(twin_trace), expected_trace(at_step, steps, first, begin=0))


# ---------------------------------------------------------------------------------------------------------------
# Early stop


def test_a_fixed_schedule_runs_no_pass_after_its_block_is_filled():
    """DreamOrigin (each masked slot unmasked with probability 1 - s/t, every slot at step S) with S = 8 steps for
    blocks of 4: blocks fill before their S steps. Which slots a step commits depends on the keys only, so the
    count replays the sampler's key chain without the model."""
    lengths, steps_per_block = [3, 6], 8
    settings = dataclasses.replace(settings_for(16, 4, steps_per_block), rule=DreamOrigin())
    prompt, mask, _ = make_prompt(lengths, seed=4)
    rng = jax.random.key(5)
    cached, nfe = generate_blocks(DENOISER, PARAMS, prompt, settings, rng, prompt_mask=mask)
    twin, twin_nfe = generate_blocks_uncached(DENOISER, PARAMS, prompt, settings, rng, prompt_mask=mask)
    np.testing.assert_array_equal(cached, twin)

    fractions = dream_transfer_fractions(steps_per_block, 1e-3)
    length, first = settings.block_length, min(lengths) // settings.block_length
    steps, key = [], rng
    for b in range(first, settings.num_blocks):
        slots = np.arange(b * length, (b + 1) * length)
        masked = np.stack([slots >= n for n in lengths])
        step = 0
        while masked.any() and step < steps_per_block:  # the block ends when nothing is masked
            key, _, uniform_key = step_keys(key)
            masked &= ~(np.asarray(jax.random.uniform(uniform_key, masked.shape, jnp.float32)) < fractions[step])
            step += 1
        steps.append(step)
    assert sum(steps) < steps_per_block * len(steps), steps  # some block did stop early
    assert int(twin_nfe) == sum(steps)
    assert int(nfe) == int(max(lengths) >= length) + sum(steps) + len(steps) - 1


# ---------------------------------------------------------------------------------------------------------------
# Settings


def test_v2_settings_and_sub_blocks_refuse_what_they_cannot_run():
    with pytest.raises(SettingsError, match="sub-block length 3 must divide block_length=8"):
        BlockSamplerSettings.v2(max_length=16, block_length=8, sub_block_length=3, mask_id=MASK_ID)
    with pytest.raises(SettingsError, match="sub_block_length=0"):
        BlockSamplerSettings.v2(max_length=16, block_length=8, sub_block_length=0, mask_id=MASK_ID)
    with pytest.raises(SettingsError, match="SubBlocks.inner"):
        SubBlocks(4, DreamThreshold(0.9))
    with pytest.raises(SettingsError, match="SubBlocks.inner"):
        SubBlocks(4, TransferTable())
    with pytest.raises(SettingsError, match="block sampler"):
        SamplerSettings(gen_length=8, steps=8, tokens=V2.tokens, rule=SubBlocks(4))
    with pytest.raises(SettingsError, match="slot 0 needs a prompt token"):
        generate_blocks(DENOISER, PARAMS, np.zeros((2, 0), np.int32), V2, jax.random.key(0))
