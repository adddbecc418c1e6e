"""The fast inference engine: golden parity with LLaDA, Fast-dLLM and Dream,
batches done right, infilling, EOS stop, the parallel-decoding rules against naive loops, compile counts.

Golden cases come from the original PyTorch code (tests/golden/, copied from ../shared/golden): identical tokens
and identical NFE are required.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlmjax
from dlmjax.config import ModelConfig
from dlmjax.interchange import import_hf
from conftest import ContextToy, compiles, toy_params
from dlmjax.models.transformer import init_params
from dlmjax.sampling import Denoiser, SamplerSettings, dream_transfer_fractions, select_factor, select_threshold
from dlmjax.sampling import generate_masked as generate

GOLDEN = Path(__file__).parent / "golden"
FUNCTION_CACHE = {"generate": "none", "generate_with_prefix_cache": "prefix", "generate_with_dual_cache": "dual"}


def golden_cases(name):
    return json.loads((GOLDEN / name / "golden.json").read_text())["cases"]


# ---------------------------------------------------------------------------------------------------------------
# Golden parity

LLADA_CASES = [c for c in golden_cases("tiny_llada") if not c.get("torch_rng_dependent")]


@pytest.fixture(scope="module")
def tiny_llada():
    cfg, params, _ = import_hf(GOLDEN / "tiny_llada", "llada")
    return cfg, params


@pytest.mark.parametrize("case", LLADA_CASES, ids=[c["name"] for c in LLADA_CASES])
def test_llada_and_fast_dllm_golden_tokens_and_nfe(tiny_llada, case):
    """LLaDA `generate` (cfg 0 and 1) and Fast-dLLM `generate` / prefix cache / dual cache, fixed steps and
    threshold 0.9: the same tokens and NFE as the original code. The prompt goes through `dlmjax.generate`, so it
    is left-padded into a 16-slot bucket: padding that leaked into attention or positions would change tokens."""
    cfg, params = tiny_llada
    k = case["kwargs"]
    settings = SamplerSettings.llada(
        mask_id=cfg.diffusion.mask_id, gen_length=k["gen_length"], steps=k["steps"], block_length=k["block_length"],
        remasking=k["remasking"], temperature=k["temperature"], cfg_scale=float(k.get("cfg_scale") or 0.0),
        threshold=k.get("threshold"), cache=FUNCTION_CACHE[case["function"].split("::")[-1]])
    out = dlmjax.generate(cfg, params, [case["prompt"]], settings)
    assert out.width == 16 and out.width > len(case["prompt"])
    assert out.rows() == case["output_ids"]
    assert out.nfe == case["nfe"]


DREAM_CASES = [c for c in golden_cases("tiny_dream") if not c.get("torch_rng_dependent")]


@pytest.mark.parametrize("case", DREAM_CASES, ids=[c["name"] for c in DREAM_CASES])
def test_dream_golden_tokens_commit_steps_and_nfe(case):
    """Every non-RNG case, with `SamplerSettings.dream`'s defaults (the reference's as released: top-k 50 even at
    temperature 0, which decides near-ties between slots: with top_k=0 three of these cases commit differently)."""
    cfg, params, _ = import_hf(GOLDEN / "tiny_dream", "dream")
    k = case["kwargs"]
    settings = SamplerSettings.dream(max_new_tokens=k["max_new_tokens"], steps=k["steps"], alg=k["alg"],
                                     alg_temp=k["alg_temp"], threshold=k.get("threshold"),
                                     temperature=k["temperature"], mask_id=cfg.diffusion.mask_id)
    tokens, nfe, history = generate(Denoiser(cfg.model), params, np.asarray([case["prompt"]], np.int32),
                                    settings, jax.random.PRNGKey(0), return_history=True)
    assert np.asarray(tokens).tolist() == case["output_ids"]
    assert int(nfe) == case["nfe"]
    # The step at which each slot was filled, from the history, equals the reference's.
    history = np.asarray(history)[: int(nfe), 0]
    filled = (history != cfg.diffusion.mask_id).argmax(axis=0)
    want = np.asarray(case["commit_step"][0])
    lp = len(case["prompt"])
    np.testing.assert_array_equal(filled[lp:], want[lp:])


@pytest.mark.parametrize("case", [c for c in DREAM_CASES if c["kwargs"]["alg"] != "confidence_threshold"],
                         ids=lambda c: c["name"])
def test_dream_transfer_counts_equal_the_reference(case):
    """`int(n * (1 - s/t))` with torch's float32 linspace, step by step, for every case (mismatches included)."""
    steps = case["kwargs"]["steps"]
    fractions = dream_transfer_fractions(steps, 1e-3)
    n, counts = 32, []
    for i in range(steps):
        k = int(np.float32(n) * fractions[i])
        counts.append(k)
        n -= k
    assert counts == case["n_committed_per_step"]


# ---------------------------------------------------------------------------------------------------------------
# A small random LLaDA model for the batch, padding, cache and compile tests

MODEL = ModelConfig(arch="llada", vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_hidden=64, max_seq_len=96,
                    rope_theta=10000.0)
MASK, EOS = 63, 2


@pytest.fixture(scope="module")
def small():
    params = init_params(MODEL, jax.random.PRNGKey(3))
    # A larger head spreads the confidences so that threshold decoding commits several slots in some steps.
    params = {**params, "ff_out": params["ff_out"] * 40.0}
    return params


def settings_for(**kw):
    base = dict(gen_length=16, steps=16, block_length=8, mask_id=MASK)
    return SamplerSettings.llada(**{**base, **kw})


PROMPTS = [[5, 9, 11], [7, 8, 20, 21, 22, 30, 31], [12, 13, 14, 15, 16]]
MODES = [dict(cache="none"), dict(cache="prefix"), dict(cache="dual", threshold=0.5),
         dict(cache="prefix", factor=1.0), dict(cache="none", cfg_scale=1.0),
         dict(cache="dual", cfg_scale=0.5, threshold=0.5)]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_batch_rows_do_not_depend_on_padding_or_other_rows(small, mode):
    """Unequal prompts left-padded into a 16-slot bucket give every row exactly what it gets in the reversed batch
    padded only to the longest prompt (7 slots, the 7-token row unpadded): the key mask reaches attention,
    positions restart, caches and transfer counts are per row."""
    settings = settings_for(**mode)
    batch = dlmjax.generate(MODEL, small, PROMPTS, settings, bucket=16)
    reversed_batch = dlmjax.generate(MODEL, small, PROMPTS[::-1], settings, bucket=1)
    assert (batch.width, reversed_batch.width) == (16, 7)
    assert batch.rows() == reversed_batch.rows()[::-1]
    assert all(MASK not in row for row in batch.rows())


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_batch_row_equals_the_row_alone(small, cache):
    settings = settings_for(cache=cache, threshold=0.5)
    batch = dlmjax.generate(MODEL, small, PROMPTS, settings)
    alone = dlmjax.generate(MODEL, small, [PROMPTS[0]], settings, bucket=1)
    assert alone.width == 3 and batch.rows()[0] == alone.rows()[0]


def test_padded_logits_equal_unpadded(small):
    prompt = np.asarray([[5, 9, 11, MASK, MASK, 7]], np.int32)
    padded = np.concatenate([np.full((1, 4), 1, np.int32), prompt], axis=1)
    key_mask = np.concatenate([np.zeros((1, 4), bool), np.ones((1, 6), bool)], axis=1)
    denoiser = Denoiser(MODEL)
    want = np.asarray(denoiser(small, prompt, np.ones((1, 6), bool)))
    got = np.asarray(denoiser(small, padded, key_mask))[:, 4:]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Without the mask the padding is attended and the logits move: the test above can fail.
    leaky = np.asarray(denoiser(small, padded, np.ones((1, 10), bool)))[:, 4:]
    assert np.abs(leaky - want).max() > 1e-3


def test_eos_stops_a_row_and_the_loop(small):
    """With stop_at_eos, a row that generates EOS in a block is frozen after it (later slots = pad_id), other rows
    go on, and the loop ends once every row is done; each row still equals itself alone."""
    eos_row = dict(small)
    # Make EOS the most likely token wherever the first prompt token is 40 (via its embedding + the head).
    head = np.asarray(small["ff_out"]).copy()
    embed = np.asarray(small["wte"]).copy()
    embed[40] = 0.0
    embed[40, :8] = 3.0
    head[:8, EOS] = 30.0
    eos_row["ff_out"], eos_row["wte"] = jnp.asarray(head), jnp.asarray(embed)
    settings = settings_for(eos_id=EOS, pad_id=1, stop_at_eos=True)
    prompts = [[40, 41, 42], [5, 9, 11]]
    out = dlmjax.generate(MODEL, eos_row, prompts, settings)
    stopped, running = out.generated()
    assert EOS in stopped[:8]
    assert stopped[8:] == [1] * 8  # frozen after its first block
    assert MASK not in running
    for i, prompt in enumerate(prompts):
        assert dlmjax.generate(MODEL, eos_row, [prompt], settings).rows()[0] == out.rows()[i]
    alone = dlmjax.generate(MODEL, eos_row, [prompts[0]], settings)
    assert alone.nfe == 8  # one block of 8 one-commit steps, then the loop stops
    no_stop = dlmjax.generate(MODEL, eos_row, [prompts[0]], settings_for(eos_id=EOS))
    assert no_stop.nfe == 16 and no_stop.generated()[0][:8] == stopped[:8]


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_infilling_keeps_prefix_and_suffix(small, cache):
    prefix, suffix = [[5, 9, 11, 13]], [[30, 31, 32]]
    settings = settings_for(cache=cache)
    out = dlmjax.generate(MODEL, small, prefix, settings, suffix_ids=suffix)
    row = out.rows()[0]
    assert row[:4] == prefix[0] and row[-3:] == suffix[0] and len(row) == 4 + 16 + 3
    assert MASK not in row
    # The suffix is context: without it the middle comes out differently.
    assert dlmjax.generate(MODEL, small, prefix, settings).generated()[0] != out.generated()[0]


@pytest.mark.parametrize("mode", [dict(cache="none", threshold=0.999), dict(cache="dual", threshold=0.3),
                                  dict(cache="prefix", factor=2.0), dict(cache="none", factor=0.5)],
                         ids=str)
def test_parallel_decoding_commits_at_least_one_slot_per_step(small, mode):
    settings = settings_for(**mode)
    prompt = np.asarray([[5, 9, 11]], np.int32)
    tokens, nfe, history = generate(Denoiser(MODEL), small, prompt, settings, jax.random.PRNGKey(0),
                                    return_history=True)
    history = np.asarray(history)[: int(nfe), 0]
    masks = (np.concatenate([np.asarray(prompt)[0], np.full(16, MASK)])[None] == MASK).sum()
    counts = [masks - (history[0] == MASK).sum()] + list(np.diff(-(history == MASK).sum(axis=1)))
    cached = mode["cache"] != "none"
    for step, count in enumerate(counts):
        # Fast-dLLM's cached loop always runs once more after a block's first step, even if it filled the block.
        if not (cached and count == 0 and step > 0):
            assert count >= 1, (step, counts)
    assert sum(counts) == 16 and not (np.asarray(tokens) == MASK).any()
    assert max(counts) > 1 or mode.get("threshold") == 0.999  # several slots per step happen


def naive_threshold(scores, threshold):
    out = np.zeros(scores.shape, bool)
    for j, row in enumerate(scores):
        eligible = [q for q in range(len(row)) if np.isfinite(row[q])]
        ranked = sorted(eligible, key=lambda q: -row[q])
        for r, q in enumerate(ranked):
            out[j, q] = r == 0 or row[q] >= threshold
    return out


def naive_factor(scores, factor):
    """Fast-dLLM's `get_transfer_index_dynamic`, loop for loop."""
    out = np.zeros(scores.shape, bool)
    for j, row in enumerate(scores):
        eligible = [q for q in range(len(row)) if np.isfinite(row[q])]
        if not eligible:
            continue
        thresholds = [1 - factor / (n + 1) for n in range(1, len(eligible) + 1)]
        thresholds[0] = -1
        ranked = sorted(eligible, key=lambda q: -row[q])
        top = 0
        for top in range(len(thresholds)):
            if row[ranked[top]] < thresholds[top]:
                break
        if top == 0 or top == len(thresholds) - 1:
            top += 1
        for q in ranked[:top]:
            out[j, q] = True
    return out


def test_threshold_and_factor_rules_equal_the_reference_loops():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.0, 1.0, size=(64, 12)).astype(np.float32)
    scores[rng.uniform(size=scores.shape) < 0.3] = -np.inf
    scores[5] = -np.inf  # a row with nothing eligible
    scores[6, :] = 0.99  # all above every threshold
    scores[7, :2] = [0.99, 0.1]
    scores[7, 2:] = -np.inf  # the first miss at the last rank commits all
    for threshold in (0.3, 0.7, 0.95):
        np.testing.assert_array_equal(np.asarray(select_threshold(jnp.asarray(scores), threshold)),
                                      naive_threshold(scores, threshold))
    for factor in (0.3, 1.0, 2.5):
        np.testing.assert_array_equal(np.asarray(select_factor(jnp.asarray(scores), factor)),
                                      naive_factor(scores, factor))


def test_confidence_eos_eot_flag_is_literal():
    """LLaDA's chained assignment: EoT gets confidence 0 always; EOS too at T = 0 (same tensor), not at T > 0."""
    vocab, eot, eos = 8, 6, 5
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, vocab)), jnp.float32)
    logits = logits.at[0, 0, eot].set(9.0).at[0, 1, eos].set(9.0)  # slot 0 proposes EoT, slot 1 EOS
    key = jax.random.PRNGKey(0)
    for temperature, eos_zero in ((0.0, True), (1e-6, False)):
        s = SamplerSettings.llada(gen_length=4, steps=4, mask_id=7, eos_id=eos, eot_id=eot,
                                  confidence_eos_eot_inf=True, temperature=temperature)
        proposal, conf = s.proposal(logits, s.tokens, key, key)
        assert proposal[0, 0] == eot and proposal[0, 1] == eos
        assert conf[0, 0] == 0.0
        assert (conf[0, 1] == 0.0) == eos_zero
        plain_settings = SamplerSettings.llada(gen_length=4, steps=4, mask_id=7, temperature=temperature)
        plain = plain_settings.proposal(logits, plain_settings.tokens, key, key)[1]
        assert plain[0, 0] > 0.9 and plain[0, 1] > 0.9


def test_one_compile_per_prompt_bucket(small):
    """Prompts of 5 and 9 tokens share the 16-slot bucket and one compiled program; 17 tokens needs another."""
    settings = settings_for(gen_length=8, steps=8, block_length=8, cache="dual")
    with compiles("generate_masked") as counter:
        dlmjax.generate(MODEL, small, [[3] * 5], settings)
        first = counter.count
        dlmjax.generate(MODEL, small, [[4] * 9], settings, jax.random.PRNGKey(5))
        second = counter.count - first
        dlmjax.generate(MODEL, small, [[4] * 17], settings)
        third = counter.count - first - second
    assert (first, second, third) == (1, 0, 1)


def test_generate_api_errors_name_the_problem(small):
    with pytest.raises(TypeError, match="model must be a Config, a ModelConfig or a Denoiser"):
        dlmjax.generate(small, small, [[1, 2]], settings_for())
    with pytest.raises(ValueError, match=r"row 1: token ids \[64\]"):
        dlmjax.generate(MODEL, small, [[1, 2], [64]], settings_for())
    with pytest.raises(ValueError, match=r"prompt \(90 tokens\) \+ gen_length \(16\) = 106 exceeds the model's context model.max_seq_len=96"):
        dlmjax.generate(MODEL, small, [[1] * 90], settings_for())
    with pytest.raises(ValueError, match=r"cache=DualCache\(\) needs a model denoiser"):
        generate(ContextToy(), toy_params(), jnp.zeros((1, 2), jnp.int32),
                 SamplerSettings.llada(gen_length=4, steps=4, mask_id=32, cache="dual"), jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def converted_dream(tmp_path_factory):
    from dlmjax.interchange import convert_from_hf

    return convert_from_hf(GOLDEN / "tiny_dream", "dream", tmp_path_factory.mktemp("dream") / "ckpt")


@pytest.mark.parametrize("case", DREAM_CASES, ids=[c["name"] for c in DREAM_CASES])
def test_dream_golden_through_the_command_line(converted_dream, case, capsys):
    """`dlmjax sample --alg ... --json` on a converted Dream, with the CLI's defaults (the reference's as released):
    the same tokens and NFE as Dream's `diffusion_generate`."""
    from dlmjax.cli import main

    k = case["kwargs"]
    argv = ["sample", "--checkpoint", str(converted_dream), "--prompt-ids", ",".join(map(str, case["prompt"])),
            "--alg", k["alg"], "--gen-length", str(k["max_new_tokens"]), "--steps", str(k["steps"]),
            "--temperature", str(k["temperature"]), "--json"]
    if k.get("threshold") is not None:
        argv += ["--threshold", str(k["threshold"])]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"] == case["output_ids"] and out["nfe"] == case["nfe"]


def test_a_release_generation_config_sets_the_sampling_defaults(tmp_path):
    """generation_config.json's temperature / top_k / top_p become the converted checkpoint's `sample.*`; flags
    still win, and without them Dream keeps the reference's defaults (top-k 50, temperature 1)."""
    import shutil

    from dlmjax.inference import SampleRequest, open_run
    from dlmjax.interchange import convert_from_hf

    plain = open_run(convert_from_hf(GOLDEN / "tiny_dream", "dream", tmp_path / "plain"))
    dream = plain.settings(8, SampleRequest(gen_length=8, steps=8, alg="entropy"))
    assert (dream.proposal.temperature, dream.proposal.top_k, dream.proposal.top_p) == (1.0, 50, 1.0)
    hf = tmp_path / "hf"
    shutil.copytree(GOLDEN / "tiny_dream", hf)
    gen = json.loads((hf / "generation_config.json").read_text())
    (hf / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.2, "top_p": 0.95, "top_k": None}))
    run = open_run(convert_from_hf(hf, "dream", tmp_path / "ckpt"))
    assert (run.config.sample.temperature, run.config.sample.top_p, run.config.sample.top_k) == (0.2, 0.95, None)
    s = run.settings(8, SampleRequest(gen_length=8, steps=8, alg="entropy"))
    assert (s.proposal.temperature, s.proposal.top_p, s.proposal.top_k) == (0.2, 0.95, 50)
    s = run.settings(8, SampleRequest(gen_length=8, steps=8, alg="entropy", temperature=0.0, top_k=3))
    assert (s.proposal.temperature, s.proposal.top_k) == (0.0, 3)
