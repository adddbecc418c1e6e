"""D2F pipelined decoding (issue 16, item 3): `generate_pipelined` and its uncached twin.

References: the block sampler with fused commits and the threshold rule (what D2F with one active block is), the
uncached twin (the whole canvas under the block-causal mask at every pass: the cached window never reads a slot
the mask forbids), and a naive loop written here: the state machine as per-row Python bookkeeping, a dense
block-causal forward of the whole canvas per pass, the argmax proposal and its softmax probability in numpy. Its
decisions are checked to be far from float ties, so the equality is not luck.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from conftest import compiles, tiny_model_config
from dlmjax.errors import SettingsError
from dlmjax.models.transformer import init_params
from dlmjax.sampling import BlockSamplerSettings, Denoiser, generate_blocks
from dlmjax.sampling.pipeline import PipelineSettings, generate_pipelined, generate_pipelined_uncached
from kernels_pallas.masks import BlockCausal

CFG = tiny_model_config(init_std=0.4)
MASK_ID = CFG.vocab_size - 1
_PARAMS = init_params(CFG, jax.random.PRNGKey(0))
# A sharper output head: random weights otherwise give confidences far below 0.9 and nothing would run ahead
# (semi-activated blocks commit only above the threshold). x3 spreads them over (0, 1].
PARAMS = dict(_PARAMS, ff_out=_PARAMS["ff_out"] * 3.0)
DENOISER = Denoiser(CFG)
MAX_LENGTH, BLOCK = 32, 4
LENGTHS = (9, 2, 5)  # prompts ending inside blocks 2, 0 and 1 (the first row has two full prompt blocks)
EOS_ID = 2  # a token the tiny model emits: some rows stop early, others run to the end (asserted)
TIE = 1e-4  # a decision closer than this to a float tie would make the comparison luck


def make_prompt(lengths, seed=1):
    """Left-padded prompts int32[B, max(lengths)], their mask, and the rows as lists."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(4, MASK_ID, size=n).tolist() for n in lengths]  # no EOS in the prompts
    width = max(lengths)
    prompt = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        prompt[i, width - len(row):] = row
        mask[i, width - len(row):] = True
    return prompt, mask, rows


def d2f(**changes) -> PipelineSettings:
    kwargs = dict(max_length=MAX_LENGTH, block_length=BLOCK, window_blocks=3, mask_id=MASK_ID, eos_id=EOS_ID)
    kwargs.update(changes)
    return PipelineSettings.d2f(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The naive loop


@dataclasses.dataclass
class NaiveRun:
    tokens: np.ndarray  # int32[B, T]
    passes: int
    committed: np.ndarray  # int32[B, T]: the pass that committed each slot, -1 if none
    movable: list  # per pass, per row: whether the row's first unfinished block was in the window (row not done)


@functools.cache
def dense_logits_fn():
    return jax.jit(lambda params, canvas: dataclasses.replace(DENOISER, mask=BlockCausal(BLOCK))(params, canvas))


def naive_d2f(rows, settings: PipelineSettings) -> NaiveRun:
    """The D2F state machine, one row at a time, from the module's definition (temperature 0, low confidence)."""
    s, length = settings, settings.block_length
    n_blocks, width = s.num_blocks, s.window_blocks
    mask, eos, pad = s.tokens.mask_id, s.tokens.eos_id, s.tokens.pad_id
    canvas = np.full((len(rows), s.max_length), mask, np.int64)
    for i, row in enumerate(rows):
        canvas[i, :len(row)] = row
    committed = np.full(canvas.shape, -1, np.int64)
    added = [len(row) // length for row in rows]
    done = [False] * len(rows)
    start = min(len(row) for row in rows) // length
    passes, movable = 0, []

    def slots(i, b):
        return range(b * length, (b + 1) * length)

    def generated(i, b):
        return [j for j in slots(i, b) if j >= len(rows[i])]

    def fraction(i, b):
        gen = generated(i, b)
        return 1.0 if not gen else sum(canvas[i, j] != mask for j in gen) / len(gen)

    def finished(i, b):
        return all(canvas[i, j] != mask for j in slots(i, b))

    def has_eos(i, b):
        return eos is not None and any(canvas[i, j] == eos for j in generated(i, b))

    while not all(done):
        ws = min(start, n_blocks - width)
        finished_before = [[finished(i, b) for b in range(n_blocks)] for i in range(len(rows))]
        movable.append([not done[i] and next(b for b in range(n_blocks) if not finished_before[i][b]) < ws + width
                        for i in range(len(rows))])
        logits = np.asarray(dense_logits_fn()(PARAMS, canvas.astype(np.int32)), np.float64)
        logits[..., mask] = -np.inf
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        commits = []  # (row, slot, token), decided on the state before the pass, applied after
        for i in range(len(rows)):
            if done[i]:
                continue
            if (added[i] < n_blocks and added[i] < ws + width
                    and (added[i] == 0 or fraction(i, added[i] - 1) >= s.block_add_threshold)
                    and not any(has_eos(i, b) for b in range(added[i]))):
                added[i] += 1
            for b in range(ws, ws + width):
                if b >= added[i] or finished_before[i][b]:
                    continue
                fully = b == 0 or fraction(i, b - 1) >= s.decoded_token_threshold
                masked = [j for j in slots(i, b) if canvas[i, j] == mask]
                token = {j: int(np.argmax(probs[i, j])) for j in masked}
                conf = {j: probs[i, j, token[j]] for j in masked}
                assert all(abs(conf[j] - s.skip_threshold) > TIE for j in masked), "float tie"
                chosen = [j for j in masked if conf[j] >= s.skip_threshold]
                if not chosen and fully:
                    ranked = sorted(masked, key=lambda j: -conf[j])
                    assert len(ranked) == 1 or conf[ranked[0]] - conf[ranked[1]] > TIE, "float tie"
                    chosen = ranked[:1]
                for j in chosen:  # the committed token is the argmax by a margin
                    top2 = np.sort(probs[i, j])[-2:]
                    assert top2[1] - top2[0] > TIE, "float tie"
                commits += [(i, j, token[j]) for j in chosen]
        for i, j, token in commits:
            canvas[i, j] = token
            committed[i, j] = passes
        for i in range(len(rows)):
            if done[i]:
                continue
            for b in range(n_blocks):
                if not finished(i, b):
                    break
                if has_eos(i, b):
                    canvas[i, (b + 1) * length:] = pad
                    done[i] = True
                    break
            else:
                done[i] = True
        while start < ws + width and all(finished_before[i][start] or done[i] for i in range(len(rows))):
            start += 1
        passes += 1
    return NaiveRun(tokens=canvas, passes=passes, committed=committed, movable=movable)


# ---------------------------------------------------------------------------------------------------------------
# D2F with one active block is the block sampler


def check_equals_block_sampler(lengths, eos_id):
    prompt, mask, rows = make_prompt(lengths)
    settings = d2f(window_blocks=2, block_add_threshold=1.0, eos_id=eos_id)
    blocks = BlockSamplerSettings.bd3(max_length=MAX_LENGTH, block_length=BLOCK, threshold=settings.skip_threshold,
                                      mask_id=MASK_ID, eos_id=eos_id)
    key = jax.random.key(0)
    tokens, nfe = generate_pipelined(DENOISER, PARAMS, prompt, settings, key, prompt_mask=mask)
    want, want_nfe = generate_blocks(DENOISER, PARAMS, prompt, blocks, key, prompt_mask=mask, fuse_commits=True)
    tokens = np.asarray(tokens)
    np.testing.assert_array_equal(tokens, np.asarray(want))
    assert not (tokens == MASK_ID).any()
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(tokens[i, :len(row)], row)
    # Rows progress independently here, in lockstep in the block sampler.
    assert int(nfe) == int(want_nfe) if len(lengths) == 1 else int(nfe) <= int(want_nfe)
    return tokens, int(nfe), int(want_nfe)


def test_one_active_block_equals_the_block_sampler():
    tokens, nfe, want_nfe = check_equals_block_sampler(LENGTHS, EOS_ID)
    stopped = [(tokens[i, n:] == EOS_ID).any() for i, n in enumerate(LENGTHS)]
    assert any(stopped) and not all(stopped), "the case should hold a row that stops and one that does not"


@pytest.mark.slow
@pytest.mark.parametrize("lengths, eos_id", [((9,), None), ((9,), EOS_ID), (LENGTHS, None)])
def test_one_active_block_equals_the_block_sampler_more(lengths, eos_id):
    check_equals_block_sampler(lengths, eos_id)


# ---------------------------------------------------------------------------------------------------------------
# Several active blocks: the cached window against the dense twin and the naive loop


@functools.cache
def pipelined_runs(window_blocks: int, temperature: float, seed: int = 1):
    """(cached (tokens, nfe, committed), uncached (tokens, nfe, committed)), numpy, for the module's prompt lengths
    (prompts drawn with `seed`)."""
    prompt, mask, _ = make_prompt(LENGTHS, seed)
    settings = d2f(window_blocks=window_blocks, temperature=temperature)
    key = jax.random.key(3)
    runs = [f(DENOISER, PARAMS, prompt, settings, key, prompt_mask=mask, trace=True)
            for f in (generate_pipelined, generate_pipelined_uncached)]
    return tuple(tuple(np.asarray(x) for x in run) for run in runs)


def check_cached_equals_uncached(window_blocks, temperature):
    (tokens, nfe, committed), (twin, twin_nfe, twin_committed) = pipelined_runs(window_blocks, temperature)
    np.testing.assert_array_equal(tokens, twin)
    np.testing.assert_array_equal(committed, twin_committed)
    assert int(nfe) == int(twin_nfe)
    assert not (tokens == MASK_ID).any()
    # The case is pipelined: some pass commits slots of two different blocks of one row.
    blocks_per_pass = {(i, p): {j // BLOCK for j in np.flatnonzero(committed[i] == p)}
                       for i in range(len(LENGTHS)) for p in range(int(nfe))}
    assert max(len(b) for b in blocks_per_pass.values()) >= 2


@pytest.mark.parametrize("window_blocks", [3])
def test_cached_equals_uncached_with_several_active_blocks(window_blocks):
    check_cached_equals_uncached(window_blocks, 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("window_blocks, temperature", [(3, 1.0), (4, 0.0)])
def test_cached_equals_uncached_more(window_blocks, temperature):
    check_cached_equals_uncached(window_blocks, temperature)


def check_equals_naive_loop(window_blocks, seed=1):
    (tokens, nfe, committed), _ = pipelined_runs(window_blocks, 0.0, seed)
    _, _, rows = make_prompt(LENGTHS, seed)
    naive = naive_d2f(rows, d2f(window_blocks=window_blocks))
    np.testing.assert_array_equal(tokens, naive.tokens)
    np.testing.assert_array_equal(committed, naive.committed)
    assert int(nfe) == naive.passes
    return naive


def test_equals_a_naive_loop_and_every_pass_commits():
    naive = check_equals_naive_loop(3)
    (tokens, nfe, committed), _ = pipelined_runs(3, 0.0)
    stops = [(tokens[i, n:] == EOS_ID).any() for i, n in enumerate(LENGTHS)]
    assert any(stops) and not all(stops), "the case should hold a row that stops and one that does not"
    # Every pass commits >= 1 slot in every row whose first unfinished block lies in the window, and each pass
    # either commits something or only moves finished blocks into the cache (the next pass's window moves on).
    for p, rows in enumerate(naive.movable):
        for i, movable in enumerate(rows):
            if movable:
                assert (committed[i] == p).any(), (p, i)
        assert any(rows) or not (committed == p).any()
    assert sum(any(rows) for rows in naive.movable) >= int(nfe) - MAX_LENGTH // BLOCK


@pytest.mark.slow
def test_equals_a_naive_loop_wide_window():
    check_equals_naive_loop(4, seed=2)  # seed 1 has a float tie at window 4


# ---------------------------------------------------------------------------------------------------------------
# Compilation and errors


def test_compiles_once_per_shape():
    settings = d2f(window_blocks=2, max_length=16, skip_threshold=0.8)  # settings no other test uses
    prompt_a, mask_a, _ = make_prompt([3, 1], seed=5)
    prompt_b, mask_b, _ = make_prompt([1, 3], seed=6)
    with compiles("generate_pipelined") as counter:
        def run(prompt, mask, seed):
            params = jax.tree.map(lambda w: w * (1 + seed / 10), PARAMS)
            return generate_pipelined(DENOISER, params, prompt, settings, jax.random.key(seed),
                                      prompt_mask=mask)[0].block_until_ready()

        run(prompt_a, mask_a, 1)
        first = counter.count
        run(prompt_b, mask_b, 2)  # new prompt values, mask, key and params: no recompile
        second = counter.count - first
    assert (first, second) == (1, 0)


@pytest.mark.parametrize("changes, field", [
    (dict(window_blocks=1), "window_blocks"),
    (dict(window_blocks=9), "window_blocks"),  # 8 blocks in a row
    (dict(block_add_threshold=0.0), "block_add_threshold"),
    (dict(decoded_token_threshold=1.5), "decoded_token_threshold"),
    (dict(skip_threshold=-0.1), "skip_threshold"),
    (dict(max_length=30), "max_length"),  # not a multiple of block_length 4
    (dict(remasking="random"), "remasking"),
    (dict(cache_length=16), "cache_length"),
])
def test_bad_settings_name_the_field(changes, field):
    with pytest.raises(SettingsError) as raised:
        d2f(**changes)
    message = str(raised.value)
    assert raised.value.field == field and field in message and "\n" not in message


def test_bad_requests_are_refused_before_tracing():
    prompt, mask, _ = make_prompt([3, 2])
    too_long = dataclasses.replace(d2f(), max_length=CFG.max_seq_len + BLOCK)
    with pytest.raises(SettingsError, match="max_length=36"):
        generate_pipelined(DENOISER, PARAMS, prompt, too_long, jax.random.key(0), prompt_mask=mask)
    with pytest.raises(SettingsError, match="eos_id=40"):
        generate_pipelined(DENOISER, PARAMS, prompt, d2f(eos_id=40), jax.random.key(0), prompt_mask=mask)


@pytest.mark.slow
def test_long_prompts_clamp_the_window_at_the_row_end():
    """Prompts of 25 and 22 tokens: the first pass forwards the whole row (prefill + window > T) and every window
    starts at N - W, before `start` (finished blocks are forwarded again)."""
    lengths = (25, 22)
    prompt, mask, rows = make_prompt(lengths)
    settings = d2f(window_blocks=3)
    runs = [tuple(np.asarray(x) for x in f(DENOISER, PARAMS, prompt, settings, jax.random.key(0), prompt_mask=mask,
                                             trace=True)) for f in (generate_pipelined, generate_pipelined_uncached)]
    naive = naive_d2f(rows, settings)
    for tokens, nfe, committed in runs:
        np.testing.assert_array_equal(tokens, naive.tokens)
        np.testing.assert_array_equal(committed, naive.committed)
        assert int(nfe) == naive.passes
