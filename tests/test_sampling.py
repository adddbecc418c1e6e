"""Tests for dlmjax.sampling: transfer schedule, per-step pieces, and LLaDA-style `generate`.

`generate` is held token for token against `reference_generate`, a plain Python/numpy loop written
from the description of LLaDA's `generate` that shares only the toy denoiser (called once per step) and, for the random
draws, the same keys (the same noise is fed to both sides, never compared as streams).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlmjax.sampling import (
    SamplerSettings,
    select_commits,
    step_keys,
    transfer_counts,
)
from conftest import ContextToy, compiles, toy_params
from dlmjax.sampling import DreamProposal, DreamTransfer, DualCache, SpecialTokens
from dlmjax.sampling import generate_masked as generate

VOCAB = 32
MASK_ID = VOCAB  # outside the logit vocabulary (MD4-style), so the toy never proposes a mask
EOS_ID = 3
EMBED = 16
MAX_LEN = 64


TOY = ContextToy()


def make_params(seed: int = 0, eos_bias: float = 0.0):
    return toy_params(seed, eos_bias=eos_bias, vocab=VOCAB, eos_id=EOS_ID, embed=EMBED, max_len=MAX_LEN)


def make_prompt(batch: int, length: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length)).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Independent references


def naive_transfer_counts(n: int, steps: int) -> list[int]:
    counts = [n // steps] * steps
    for i in range(n % steps):
        counts[i] += 1
    return counts


# Jitted only to avoid compiling every eager primitive anew for each test's shapes.
_denoise = jax.jit(lambda denoiser, *args: denoiser(*args), static_argnums=0)
_gumbel = jax.jit(jax.random.gumbel, static_argnums=(1, 2))
_uniform = jax.jit(jax.random.uniform, static_argnums=(1, 2))


def reference_generate(denoiser, params, prompt, s: SamplerSettings, rng, prompt_mask=None):
    """LLaDA `generate` as plain loops; returns (tokens int64[B, Lp+G], nfe, history list)."""
    prompt = np.asarray(prompt)
    batch, lp = prompt.shape
    g, m, bl = s.gen_length, s.tokens.mask_id, s.block_length
    x = np.full((batch, lp + g), m, dtype=np.int64)
    x[:, :lp] = prompt
    if prompt_mask is None:
        prompt_mask = np.ones((batch, lp), dtype=bool)
    key_mask = np.concatenate([np.asarray(prompt_mask, bool), np.ones((batch, g), bool)], axis=1)
    num_blocks = g // bl
    steps_per_block = s.steps // num_blocks
    noise_dtype = np.float64 if jax.config.jax_enable_x64 else np.float32

    def forward(tokens):
        return np.array(_denoise(denoiser, params, jnp.asarray(tokens, jnp.int32), jnp.asarray(key_mask)))

    nfe, history = 0, []
    for b in range(num_blocks):
        lo, hi = lp + b * bl, lp + (b + 1) * bl
        tables = [naive_transfer_counts(int((x[j, lo:hi] == m).sum()), steps_per_block)
                  for j in range(batch)]
        for i in range(steps_per_block):
            if not (x[:, lo:hi] == m).any():
                break  # a full block takes no more steps (Fast-dLLM; LLaDA would run no-op steps)
            rng, gumbel_key, confidence_key = step_keys(rng)
            if s.guidance.cfg_scale > 0:
                unconditional = x.copy()
                unconditional[:, :lp] = m
                cond, uncond = forward(x), forward(unconditional)  # two passes here, one in dlmjax
                logits = uncond + np.float32(s.guidance.cfg_scale + 1.0) * (cond - uncond)
            else:
                logits = forward(x)
            nfe += 1
            if s.proposal.logits_eos_inf:
                logits[:, :, s.tokens.eos_id] = -np.inf
            # dlmjax draws the step's noise for the block's slots only; the same keys feed both sides.
            block_logits = logits[:, lo:hi]
            if s.proposal.temperature == 0:
                proposal = block_logits.argmax(-1)
            else:
                gumbel = np.asarray(_gumbel(gumbel_key, block_logits.shape, noise_dtype))
                proposal = (block_logits.astype(noise_dtype) + s.proposal.temperature * gumbel).argmax(-1)
            if s.proposal.confidence == "low_confidence":
                shifted = np.exp(block_logits - block_logits.max(-1, keepdims=True))
                probs = shifted / shifted.sum(-1, keepdims=True)  # float32, like LLaDA's fp32 logits
                conf = np.take_along_axis(probs, proposal[..., None], -1)[..., 0]
            else:
                conf = np.asarray(_uniform(confidence_key, proposal.shape, jnp.float32))
            for j in range(batch):
                masked = [q for q in range(lo, hi) if x[j, q] == m]
                masked.sort(key=lambda q: -conf[j, q - lo])  # stable: equal confidence -> lower index
                for q in masked[: tables[j][i]]:
                    x[j, q] = proposal[j, q - lo]
            history.append(x.copy())
    return x, nfe, history


# ---------------------------------------------------------------------------------------------
# Schedule and per-step pieces


def test_transfer_counts_equals_naive_loop():
    n = np.arange(0, 41, dtype=np.int32)  # includes n < S, n == S and non-divisible n
    jitted = jax.jit(transfer_counts, static_argnums=1)
    for steps in (1, 2, 3, 5, 7, 8, 16, 64):
        table = np.asarray(jitted(jnp.asarray(n), steps))
        assert table.dtype == np.int32 and table.shape == (n.size, steps)
        expected = np.array([naive_transfer_counts(int(v), steps) for v in n])
        np.testing.assert_array_equal(table, expected)
        np.testing.assert_array_equal(table.sum(1), n)
    np.testing.assert_array_equal(transfer_counts(jnp.array([30]), 8)[0], [4, 4, 4, 4, 4, 4, 3, 3])


def test_select_commits_ranks_stably_with_per_row_k():
    rng = np.random.default_rng(0)
    batch, length = 6, 20
    # Few distinct values so that ties are common; -inf marks ineligible slots.
    scores = rng.choice(np.float32([0.1, 0.5, 0.9, -np.inf]), size=(batch, length))
    k = np.array([0, 1, 3, 7, 20, 25], dtype=np.int32)  # includes k above the eligible count
    got = np.asarray(jax.jit(select_commits)(jnp.asarray(scores), jnp.asarray(k)))
    for j in range(batch):
        eligible = [q for q in range(length) if np.isfinite(scores[j, q])]
        chosen = sorted(eligible, key=lambda q: -scores[j, q])[: k[j]]
        expected = np.zeros(length, bool)
        expected[chosen] = True
        np.testing.assert_array_equal(got[j], expected, err_msg=f"row {j}")
        assert got[j].sum() == min(k[j], len(eligible))


# ---------------------------------------------------------------------------------------------
# generate against the reference

REFERENCE_CASES = {
    "one_block_steps_eq_gen": dict(gen_length=8, steps=8),
    "one_block_fewer_steps": dict(gen_length=12, steps=5),  # n=12, S=5: [3, 3, 2, 2, 2]
    "semi_ar": dict(gen_length=12, block_length=4, steps=6),
    "semi_ar_non_divisible": dict(gen_length=12, block_length=4, steps=9),  # [2, 1, 1] per block
    "more_steps_than_slots": dict(gen_length=4, steps=8),  # [1, 1, 1, 1, 0, 0, 0, 0]: stops after 4
    "cfg": dict(gen_length=12, block_length=6, steps=6, cfg_scale=1.0),
    "logits_eos_inf": dict(gen_length=8, block_length=4, steps=4, eos_id=EOS_ID, logits_eos_inf=True),
}
# temperature > 0 and "random" remasking are compared with the reference, step by step, in
# test_random_paths_commit_exactly_k_and_never_change_commits.


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_generate_equals_reference(name):
    settings = SamplerSettings.llada(mask_id=MASK_ID, **REFERENCE_CASES[name])
    # A large EOS bias makes EOS the argmax everywhere, so ignoring the flag cannot go unnoticed.
    params = make_params(eos_bias=20.0 if settings.proposal.logits_eos_inf else 0.0)
    prompt = make_prompt(2, 4)
    rng = jax.random.key(7)
    tokens, nfe = generate(TOY, params, jnp.asarray(prompt), settings, rng)
    expected, expected_nfe, _ = reference_generate(TOY, params, prompt, settings, rng)
    assert tokens.dtype == jnp.int32 and tokens.shape == (2, 4 + settings.gen_length)
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    assert nfe.dtype == jnp.int32
    # One forward per step (a CFG doubled-batch pass counts once), and no step once the block is full.
    assert int(nfe) == expected_nfe == min(settings.steps, settings.gen_length)
    assert not np.any(np.asarray(tokens) == MASK_ID)
    if settings.proposal.logits_eos_inf:
        assert not np.any(np.asarray(tokens)[:, 4:] == EOS_ID)


def test_eos_toy_generates_only_eos_without_the_flag():
    # Guards the logits_eos_inf case above: without the flag this toy generates nothing but EOS,
    # so a sampler that ignored the flag could not match the reference there.
    settings = SamplerSettings.llada(mask_id=MASK_ID, gen_length=8, block_length=4, steps=4, eos_id=EOS_ID)
    tokens, _, _ = reference_generate(TOY, make_params(eos_bias=20.0), make_prompt(2, 4), settings,
                                      jax.random.key(0))
    assert np.all(tokens[:, 4:] == EOS_ID)


def test_left_padding_with_prompt_mask():
    settings = SamplerSettings.llada(mask_id=MASK_ID, gen_length=8, block_length=4, steps=8)
    params = make_params()
    full = make_prompt(2, 6)
    short = full[1, 3:]  # a 3-token prompt, left-padded in the batch
    padded = full.copy()
    padded[1, :3] = 0  # pad id 0 != mask id
    prompt_mask = np.ones_like(padded, dtype=bool)
    prompt_mask[1, :3] = False
    rng = jax.random.key(0)
    tokens, _ = generate(TOY, params, jnp.asarray(padded), settings, rng,
                         prompt_mask=jnp.asarray(prompt_mask))
    expected, _, _ = reference_generate(TOY, params, padded, settings, rng, prompt_mask=prompt_mask)
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    # The key mask must reach the denoiser: the padded row equals the unpadded prompt's generation.
    alone, _ = generate(TOY, params, jnp.asarray(short[None]), settings, rng)
    np.testing.assert_array_equal(np.asarray(tokens)[1, 6:], np.asarray(alone)[0, 3:])
    unmasked, _ = generate(TOY, params, jnp.asarray(padded), settings, rng,
                           prompt_mask=jnp.ones_like(jnp.asarray(prompt_mask)))
    assert not np.array_equal(np.asarray(unmasked)[1], np.asarray(tokens)[1])


# ---------------------------------------------------------------------------------------------
# Structural properties of the random paths


@pytest.mark.parametrize("kwargs", [
    dict(gen_length=12, steps=5, remasking="random"),  # one block, [3, 3, 2, 2, 2]
    dict(gen_length=12, block_length=6, steps=8, temperature=0.8),  # semi-AR, [2, 2, 1, 1]
    dict(gen_length=12, block_length=6, steps=8, remasking="random", temperature=1.5, cfg_scale=1.0),
])
def test_random_paths_commit_exactly_k_and_never_change_commits(kwargs):
    settings = SamplerSettings.llada(mask_id=MASK_ID, **kwargs)
    params = make_params()
    prompt = make_prompt(2, 4)
    lp, bl, s = 4, settings.block_length, settings.steps_per_block
    tokens, nfe, history = generate(TOY, params, jnp.asarray(prompt), settings, jax.random.key(11),
                                    return_history=True)
    tokens, history = np.asarray(tokens), np.asarray(history)
    assert history.shape == (settings.steps, 2, lp + settings.gen_length)
    np.testing.assert_array_equal(history[-1], tokens)
    assert int(nfe) == settings.steps
    assert not np.any(tokens == MASK_ID)

    prev = np.concatenate([prompt, np.full((2, settings.gen_length), MASK_ID, np.int32)], axis=1)
    table = naive_transfer_counts(bl, s)  # every block starts fully masked
    for t, cur in enumerate(history):
        block, step = divmod(t, s)
        np.testing.assert_array_equal(cur[:, :lp], prompt)  # prompt unchanged
        committed = prev != MASK_ID
        np.testing.assert_array_equal(cur[committed], prev[committed])  # commits never change
        new = (prev == MASK_ID) & (cur != MASK_ID)
        np.testing.assert_array_equal(new.sum(1), [table[step]] * 2)  # exactly k commits
        lo = lp + block * bl
        assert not new[:, :lo].any() and not new[:, lo + bl:].any()  # only inside the block
        prev = cur

    # The reference fed with the same keys agrees step by step, not only at the end.
    _, _, expected_history = reference_generate(TOY, params, prompt, settings, jax.random.key(11))
    np.testing.assert_array_equal(history, np.stack(expected_history))

    # return_history=True again: the same compiled program, no extra compile.
    again = generate(TOY, params, jnp.asarray(prompt), settings, jax.random.key(11), return_history=True)
    np.testing.assert_array_equal(np.asarray(again[0]), tokens)  # deterministic given the key
    other = generate(TOY, params, jnp.asarray(prompt), settings, jax.random.key(12), return_history=True)
    assert not np.array_equal(np.asarray(other[0]), tokens)  # and the key matters


def test_gumbel_noise_is_float64_under_x64():
    # The settings of a case above, so that the float32 half below reuses compiled pieces.
    settings = SamplerSettings.llada(mask_id=MASK_ID, gen_length=12, block_length=6, steps=8, temperature=0.8)
    params = make_params()
    prompt = make_prompt(2, 4)
    rng = jax.random.key(3)
    with jax.enable_x64(True):
        tokens, nfe = generate(TOY, params, jnp.asarray(prompt), settings, rng)
        expected, _, _ = reference_generate(TOY, params, prompt, settings, rng)
    assert tokens.dtype == jnp.int32 and nfe.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    # float32 noise from the same keys gives other tokens, so the comparison above can fail.
    float32_noise, _, _ = reference_generate(TOY, params, prompt, settings, rng)
    assert not np.array_equal(float32_noise, expected)


# ---------------------------------------------------------------------------------------------
# Compilation


def test_generate_compiles_once_per_shape_and_settings():
    settings = SamplerSettings.llada(mask_id=MASK_ID, gen_length=6, block_length=3, steps=4)
    params = make_params()
    # Shapes used by no other test, so the first call must compile.
    prompt_a = jnp.asarray(make_prompt(3, 5, seed=1))
    prompt_b = jnp.asarray(make_prompt(3, 5, seed=2))
    key_a, key_b = jax.random.key(0), jax.random.key(1)
    with compiles("generate_masked") as counter:
        generate(TOY, params, prompt_a, settings, key_a)[0].block_until_ready()
        first = counter.count
        generate(TOY, params, prompt_b, settings, key_b)[0].block_until_ready()
        second = counter.count - first
        longer = dataclasses.replace(settings, gen_length=9, steps=6)
        generate(TOY, params, prompt_a, longer, key_a)[0].block_until_ready()
        third = counter.count - first - second
    assert (first, second, third) == (1, 0, 1)


# ---------------------------------------------------------------------------------------------
# Settings


# Each error names the object that owns the field (the settings core, or one of its strategies), the field as the
# caller wrote it, and the value.
@pytest.mark.parametrize("kwargs, needle", [
    (dict(gen_length=0, steps=1), "SamplerSettings.gen_length=0"),
    (dict(gen_length=12, steps=6, block_length=5), "SamplerSettings.block_length=5"),
    (dict(gen_length=12, steps=6, block_length=3), "SamplerSettings.steps=6"),  # 4 blocks need a multiple of 4
    (dict(gen_length=12, steps=2, block_length=4), "SamplerSettings.steps=2"),  # fewer steps than blocks
    (dict(gen_length=8, steps=8, remasking="entropic"), "SamplerSettings.remasking='entropic'"),
    (dict(gen_length=8, steps=8, cache="full"), "SamplerSettings.cache='full'"),
    (dict(gen_length=8, steps=8, threshold=1.5), "Threshold.threshold=1.5"),
    (dict(gen_length=8, steps=8, factor=0.0), "Factor.factor=0.0"),
    (dict(gen_length=8, steps=8, threshold=0.5, factor=1.0), "SamplerSettings.factor=1.0"),
    (dict(gen_length=8, steps=8, eos_id=3, eot_id=None, confidence_eos_eot_inf=True),
     "confidence_eos_eot_inf=True needs the model's eot_id"),
    (dict(gen_length=8, steps=8, stop_at_eos=True), "SamplerSettings.stop_at_eos=True"),
    (dict(gen_length=8, steps=8, top_p=0.0), "LladaProposal.top_p=0.0"),
    (dict(gen_length=8, steps=8, temperature=-0.5), "LladaProposal.temperature=-0.5"),
    (dict(gen_length=8, steps=8, cfg_scale=float("nan")), "Guidance.cfg_scale=nan"),
    (dict(gen_length=8, steps=8, logits_eos_inf=True), "LladaProposal.logits_eos_inf=True"),
    (dict(gen_length=8, steps=8, eos_id=-2), "SpecialTokens.eos_id=-2"),
])
def test_settings_errors_name_the_field(kwargs, needle):
    with pytest.raises(ValueError) as error:
        SamplerSettings.llada(mask_id=MASK_ID, **kwargs)
    assert needle in str(error.value)


@pytest.mark.parametrize("build, needle", [
    # Fast-dLLM's caches are defined for LLaDA's loop only.
    (lambda: SamplerSettings(gen_length=8, steps=8, tokens=SpecialTokens(mask_id=MASK_ID),
                             rule=DreamTransfer(), proposal=DreamProposal(), cache=DualCache()),
     "SamplerSettings.cache=DualCache()"),
    (lambda: SamplerSettings.dream(max_new_tokens=8, steps=8, alg="origin", alg_temp=0.5, mask_id=MASK_ID),
     "SamplerSettings.dream.alg_temp=0.5"),
    (lambda: SamplerSettings.dream(max_new_tokens=8, steps=8, alg="entropy", threshold=0.5, mask_id=MASK_ID),
     "SamplerSettings.dream.threshold=0.5"),
    (lambda: SamplerSettings.dream(max_new_tokens=8, steps=8, alg="entropic", mask_id=MASK_ID),
     "SamplerSettings.dream.alg='entropic'"),
    (lambda: DreamProposal(confidence="random"), "DreamProposal.confidence='random'"),
    (lambda: SamplerSettings(gen_length=8, steps=8, tokens=SpecialTokens(mask_id=MASK_ID), rule="llada"),
     "SamplerSettings.rule='llada'"),
])
def test_composed_settings_errors_name_the_part(build, needle):
    with pytest.raises(ValueError) as error:
        build()
    assert needle in str(error.value)


def test_settings_error_lists_allowed_values_and_defaults_resolve():
    with pytest.raises(ValueError, match="low_confidence"):
        SamplerSettings.llada(mask_id=0, gen_length=8, steps=8, remasking="margins")
    with pytest.raises(ValueError, match=r"\[1, 2, 3, 4, 6, 12\]"):
        SamplerSettings.llada(mask_id=0, gen_length=12, steps=12, block_length=5)
    default = SamplerSettings.llada(mask_id=0, gen_length=8, steps=4)
    explicit = SamplerSettings.llada(mask_id=0, gen_length=8, steps=4, block_length=8)
    assert default.block_length == 8 and default == explicit and hash(default) == hash(explicit)
    assert (default.num_blocks, default.steps_per_block) == (1, 4)


def test_eos_id_outside_vocabulary_is_rejected_at_trace_time():
    settings = SamplerSettings.llada(mask_id=MASK_ID, gen_length=4, steps=4, eos_id=VOCAB + 5,
                               logits_eos_inf=True)
    with pytest.raises(ValueError, match=f"eos_id={VOCAB + 5}"):
        generate(TOY, make_params(), jnp.asarray(make_prompt(1, 2)), settings, jax.random.key(0))
