"""Block-diffusion sampling with a KV cache (issue 3, items 3 and 4) on a tiny random-weight Transformer.

The slow twins: a full forward under an explicit dense BD3 mask (for the cache), `generate_blocks_uncached`
(for the sampler), and a plain Python greedy loop over a growing prefix (for AR). Random draws are the same
keys on both sides, never compared as streams.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compiles

from dlmjax.config import ModelConfig
from dlmjax.diffusion.block import two_stream_inputs
from kernels_pallas.masks import Bd3Training, BlockCausal
from dlmjax.models.transformer import Transformer, init_cache, init_params
from dlmjax.sampling import BlockSamplerSettings, Denoiser, SpecialTokens, filter_logits
from dlmjax.sampling import generate_blocks as _generate_blocks
from dlmjax.sampling import generate_blocks_uncached as _generate_blocks_uncached

# init_std well above the default so that random weights make peaked, varied predictions: near-uniform
# logits would make the token-exact comparisons hinge on float ties.
CFG = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48,
                  max_seq_len=32, init_std=0.3)
MASK_ID = 39
PARAMS = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


def generate_blocks(config, *args, **kwargs):
    return _generate_blocks(Denoiser(config), *args, **kwargs)


def generate_blocks_uncached(config, *args, **kwargs):
    return _generate_blocks_uncached(Denoiser(config), *args, **kwargs)


def make_settings(**kwargs) -> BlockSamplerSettings:
    kwargs.setdefault("mask_id", MASK_ID)
    return BlockSamplerSettings.bd3(**kwargs)


def make_prompt(lengths, seed=1):
    """Left-padded prompts int32[B, max(lengths)] and their mask; padding holds token 0."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    prompt = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), bool)
    for row, n in enumerate(lengths):
        prompt[row, width - n:] = rng.integers(0, MASK_ID, size=n)
        mask[row, width - n:] = True
    return prompt, mask


def bd3_clean_mask(key_mask: np.ndarray, block: int) -> np.ndarray:
    """bool[B, N, N] from the definition: query block >= key block (M_BC / M_OBC | M_BD), real keys only."""
    n = key_mask.shape[1]
    q, kv = np.arange(n)[:, None] // block, np.arange(n)[None, :] // block
    return (q >= kv)[None] & key_mask[:, None, :]


# ---------------------------------------------------------------------------------------------
# The cache at the model level


@functools.partial(jax.jit, static_argnums=0)
def dense_forward(cfg, params, tokens, positions, dense_mask):
    return Transformer(cfg).apply({"params": params}, tokens, positions=positions, dense_mask=dense_mask)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def cached_forwards(cfg, prompt_length, block, params, tokens, positions, prompt_mask):
    """PREFILL the prompt, COMMIT one clean block, DENOISE one noisy block: one program, so one compile."""
    model = Transformer(cfg)
    cache = init_cache(cfg, tokens.shape[0], tokens.shape[1])  # one block too many: unwritten slots stay unseen
    inner = BlockCausal(block).dense(prompt_length, prompt_length)[None]
    chunks = [slice(0, prompt_length), slice(prompt_length, prompt_length + block), slice(prompt_length + block, None)]
    run = lambda part, cache, **kw: model.apply(  # noqa: E731
        {"params": params}, tokens[:, part], positions=positions[:, part], cache=cache, **kw)
    prefill, cache = run(chunks[0], cache, key_mask=prompt_mask, dense_mask=inner, update_cache=True)
    committed, cache = run(chunks[1], cache, update_cache=True)
    noisy, after = run(chunks[2], cache)
    return jnp.concatenate([prefill, committed, noisy], axis=1), cache, after


def stack_layers(params, n_layers):
    """The unrolled model's parameters in the layout of `scan_layers=True` (layers stacked on axis 0)."""
    blocks = [params[f"blocks_{i}"] for i in range(n_layers)]
    rest = {name: value for name, value in params.items() if not name.startswith("blocks_")}
    return {**rest, "blocks": jax.tree.map(lambda *layers: jnp.stack(layers), *blocks)}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_logits_equal_one_dense_forward(scan_layers):
    block = 4
    prompt, prompt_mask = make_prompt([8, 5])  # row 1: 3 padding slots
    rng = np.random.default_rng(2)
    clean = rng.integers(0, MASK_ID, size=(2, block)).astype(np.int32)
    noisy = np.where(rng.random((2, block)) < 0.5, MASK_ID, rng.integers(0, MASK_ID, size=(2, block)))
    tokens = np.concatenate([prompt, clean, noisy.astype(np.int32)], axis=1)  # [2, 16]
    key_mask = np.concatenate([prompt_mask, np.ones((2, 2 * block), bool)], axis=1)
    positions = np.maximum(np.cumsum(key_mask, axis=1) - 1, 0).astype(np.int32)
    full = dense_forward(CFG, PARAMS, tokens, positions, bd3_clean_mask(key_mask, block))

    cfg, params = CFG, PARAMS
    if scan_layers:  # the same weights, scanned: the cache's leading axis is scanned with them
        cfg, params = dataclasses.replace(CFG, scan_layers=True), stack_layers(PARAMS, CFG.n_layers)
    logits, cache, after = cached_forwards(cfg, 8, block, params, tokens, positions, prompt_mask)

    real = key_mask.copy()
    real[:, :8] = prompt_mask  # padding queries are never read
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(full)[real], rtol=1e-5, atol=1e-5)
    assert int(cache["index"]) == 12
    np.testing.assert_array_equal(cache["key_mask"], np.concatenate([key_mask[:, :12], np.zeros((2, 4), bool)], 1))
    # DENOISE leaves the cache as it was.
    for name in cache:
        np.testing.assert_array_equal(after[name], cache[name])


def test_denoise_forward_sees_what_bd3_training_saw():
    """A prompt ending inside a block: the sampler's PREFILL + DENOISE logits for that block equal the noisy
    half of the BD3 training forward on [x_t ; x_0] (Bd3Training), i.e. sampling and training share one
    block grid counted from the row's first token."""
    length, block, prompt_length = 16, 4, 6  # the prompt fills block 0 and half of block 1
    rng = np.random.default_rng(5)
    x0 = rng.integers(0, MASK_ID, size=(2, length)).astype(np.int32)
    xt = x0.copy()
    xt[:, prompt_length:] = MASK_ID  # everything after the prompt is still to generate
    xt[1, 7] = x0[1, 7]  # row 1 already committed one slot of the block
    tokens, positions, key_mask = two_stream_inputs(jnp.asarray(xt), jnp.asarray(x0), jnp.ones((2, length), bool))
    train_logits = Transformer(CFG, Bd3Training(length, block)).apply(
        {"params": PARAMS}, tokens, positions=positions, key_mask=key_mask)[:, block:2 * block]

    model = Transformer(CFG)
    cache = init_cache(CFG, 2, length - block)
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), (2, length))
    _, cache = model.apply({"params": PARAMS}, x0[:, :block], positions=pos[:, :block], cache=cache,
                           update_cache=True, dense_mask=BlockCausal(block).dense(block, block)[None])
    logits, _ = model.apply({"params": PARAMS}, xt[:, block:2 * block], positions=pos[:, block:2 * block],
                            cache=cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(train_logits), rtol=1e-5, atol=1e-5)


def test_cached_call_errors():
    model = Transformer(CFG)
    tokens = jnp.zeros((1, 4), jnp.int32)
    cache = init_cache(CFG, 1, 8)
    with pytest.raises(ValueError, match="absolute `positions`"):
        model.apply({"params": PARAMS}, tokens, cache=cache)
    with pytest.raises(ValueError, match="update_cache=True needs a cache"):
        model.apply({"params": PARAMS}, tokens, update_cache=True)
    with pytest.raises(ValueError, match="cannot fit a cache of 2 slots"):
        model.apply({"params": PARAMS}, tokens, positions=tokens, cache=init_cache(CFG, 1, 2), update_cache=True)


# ---------------------------------------------------------------------------------------------
# Exactness: cached == uncached


def expected_steps(lengths, settings) -> int:
    """Denoising steps the samplers run, from the definition: every block from the one holding the shortest
    prompt's end takes min(S, most masked slots of a row), the front-loaded table's nonzero columns."""
    steps = 0
    for b in range(min(lengths) // settings.block_length, settings.num_blocks):
        lo = b * settings.block_length
        masked = [min(max(lo + settings.block_length - n, 0), settings.block_length) for n in lengths]
        steps += min(settings.steps_per_block, max(masked))
    return steps


# Shared with the naive AR test below so that it reuses the compiled samplers.
AR_CASE = ([6, 3], dict(block_length=1, steps_per_block=1))


@pytest.mark.parametrize("lengths, kwargs", [
    AR_CASE,
    ([6, 3], dict(block_length=2, steps_per_block=2, remasking="random")),
    # Both prompts end inside a block (6 = 4 + 2, 3): the first generated block holds the prompt's tail.
    ([6, 3], dict(block_length=4, steps_per_block=2, temperature=0.8, top_k=8, top_p=0.9)),
    ([5, 7], dict(block_length=4, steps_per_block=3)),
    # Block = max_length (MDLM): nothing is ever cached, so generate_blocks runs the plain forward; these
    # cases hold the NFE count and the prompt handling of a single block.
    ([0, 0], dict(block_length=16, steps_per_block=4, remasking="random", temperature=1.0, top_k=5)),
    ([3, 2], dict(block_length=16, steps_per_block=16)),
], ids=["ar", "bl2-random", "bl4-T-top_k-top_p", "bl4-prompts-mid-block", "mdlm-random-T-top_k-no_prompt",
        "mdlm-prompt"])
def test_cached_equals_uncached(lengths, kwargs):
    settings = make_settings(max_length=16, **kwargs)
    prompt, prompt_mask = make_prompt(lengths)
    rng = jax.random.key(7)
    tokens, nfe = generate_blocks(CFG, PARAMS, prompt, settings, rng, prompt_mask=prompt_mask)
    twin, twin_nfe = generate_blocks_uncached(CFG, PARAMS, prompt, settings, rng, prompt_mask=prompt_mask)
    tokens = np.asarray(tokens)
    np.testing.assert_array_equal(tokens, twin)
    assert not (tokens == MASK_ID).any()
    for row, n in enumerate(lengths):  # each row starts with its own prompt, padding removed
        np.testing.assert_array_equal(tokens[row, :n], prompt[row, prompt_mask[row]])
    # uncached: the denoising steps; cached adds the prefill (if the longest prompt has a full block) and a
    # commit after every block it visits but the last.
    steps = expected_steps(lengths, settings)
    first = min(lengths) // settings.block_length
    assert int(twin_nfe) == steps
    assert int(nfe) == steps + (max(lengths) >= settings.block_length) + settings.num_blocks - first - 1


def test_ar_with_cache_equals_ar_without_and_a_naive_loop():
    lengths, kwargs = AR_CASE
    settings = make_settings(max_length=16, **kwargs)
    prompt, prompt_mask = make_prompt(lengths)
    tokens, nfe = generate_blocks(CFG, PARAMS, prompt, settings, jax.random.key(0), prompt_mask=prompt_mask)
    twin, _ = generate_blocks_uncached(CFG, PARAMS, prompt, settings, jax.random.key(0), prompt_mask=prompt_mask)

    # Naive AR, one row at a time: for each new slot i, run the model on [clean prefix ; one mask at i]
    # under a causal mask and take the argmax at i. The buffer has a fixed width (one compile); the slots
    # after i are invisible to i.
    width = settings.max_length
    causal = np.tril(np.ones((width, width), bool))[None]
    positions = np.arange(width, dtype=np.int32)[None]
    for row, n in enumerate(lengths):
        seq = np.full((1, width), MASK_ID, np.int32)
        seq[0, :n] = prompt[row, prompt_mask[row]]
        for i in range(n, width):
            logits = np.array(dense_forward(CFG, PARAMS, seq, positions, causal))[0, i]
            logits[MASK_ID] = -np.inf
            seq[0, i] = logits.argmax()
        np.testing.assert_array_equal(np.asarray(tokens)[row], seq[0], err_msg=f"row {row}")
        np.testing.assert_array_equal(np.asarray(twin)[row], seq[0], err_msg=f"row {row}")
    # prefill of the longest prompt's 6 slots, then 13 one-token blocks from slot 3, committed but the last.
    assert int(nfe) == 1 + 13 + 12


def test_right_padding_is_the_same_request_as_left_padding():
    settings = make_settings(max_length=16, block_length=4, steps_per_block=2)
    prompt, prompt_mask = make_prompt([6, 3])
    right = np.zeros_like(prompt)
    for row in range(2):
        real = prompt[row, prompt_mask[row]]
        right[row, :len(real)] = real
    tokens, _ = generate_blocks(CFG, PARAMS, prompt, settings, jax.random.key(3), prompt_mask=prompt_mask)
    flipped, _ = generate_blocks(CFG, PARAMS, right, settings, jax.random.key(3), prompt_mask=prompt_mask[:, ::-1])
    np.testing.assert_array_equal(tokens, flipped)


# ---------------------------------------------------------------------------------------------
# Batches: unequal prompts, EOS

BATCH_SETTINGS = make_settings(max_length=12, block_length=4, steps_per_block=2)
BATCH_LENGTHS = [5, 2]  # row 0 starts generating in block 1, row 1 in block 0


def test_rows_of_different_prompt_lengths_equal_each_row_alone():
    prompt, prompt_mask = make_prompt(BATCH_LENGTHS)
    tokens, _ = generate_blocks(CFG, PARAMS, prompt, BATCH_SETTINGS, jax.random.key(0), prompt_mask=prompt_mask)
    for row, n in enumerate(BATCH_LENGTHS):
        alone, _ = generate_blocks(CFG, PARAMS, prompt[row:row + 1, -n:], BATCH_SETTINGS, jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(tokens)[row], np.asarray(alone)[0], err_msg=f"row {row}")


def test_eos_stops_a_row_and_freezes_it_while_others_continue():
    prompt, prompt_mask = make_prompt(BATCH_LENGTHS)
    base, base_nfe = generate_blocks(CFG, PARAMS, prompt, BATCH_SETTINGS, jax.random.key(0), prompt_mask=prompt_mask)
    base = np.asarray(base)
    # An EOS id that row 0 generates in its first block (slots 5..7) and row 1 never generates.
    candidates = [t for t in base[0, 5:8] if t not in base[1, 2:]]
    assert candidates, f"no usable EOS in this toy run: {base}"
    eos = int(candidates[0])
    pad = next(t for t in range(MASK_ID) if t != eos)
    settings = dataclasses.replace(BATCH_SETTINGS, tokens=SpecialTokens(mask_id=MASK_ID, eos_id=eos, pad_id=pad))

    tokens, nfe = generate_blocks(CFG, PARAMS, prompt, settings, jax.random.key(0), prompt_mask=prompt_mask)
    twin, _ = generate_blocks_uncached(CFG, PARAMS, prompt, settings, jax.random.key(0), prompt_mask=prompt_mask)
    got = np.asarray(tokens)
    np.testing.assert_array_equal(got, twin)
    np.testing.assert_array_equal(got[0], np.concatenate([base[0, :8], np.full(4, pad)]))  # done, then frozen
    np.testing.assert_array_equal(got[1], base[1])  # the other row did not notice
    # prefill 1; block 0: 2 steps (row 1 has 2 masked slots), commit; block 1: 2, commit; block 2: 2.
    assert int(nfe) == int(base_nfe) == 1 + 2 + 1 + 2 + 1 + 2

    # Alone, row 0 stops the whole loop after its first block, without a commit pass.
    alone, alone_nfe = generate_blocks(CFG, PARAMS, prompt[:1], settings, jax.random.key(0),
                                       prompt_mask=prompt_mask[:1])
    np.testing.assert_array_equal(np.asarray(alone)[0], got[0])
    assert int(alone_nfe) == 1 + 2


# ---------------------------------------------------------------------------------------------
# Top-k / nucleus filtering against a plain numpy reading of the definition


def naive_keep(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    keep = np.zeros(logits.shape, bool)
    for row in range(logits.shape[0]):
        scaled = logits[row] / temperature if temperature > 0 else logits[row]
        order = sorted(range(len(scaled)), key=lambda j: (-scaled[j], j))
        if top_k:
            order = order[:top_k]
        p = np.exp(scaled[order] - scaled[order].max())
        p = p / p.sum()
        mass = 0.0
        for j, pj in zip(order, p):
            if mass >= top_p:
                break
            keep[row, j] = True
            mass += pj
    return keep


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 3, 1.0), (0.7, 0, 0.5), (1.3, 6, 0.9), (0.0, 0, 0.3), (1.0, 1, 0.99)])
def test_filter_logits_matches_its_definition(temperature, top_k, top_p):
    logits = np.random.default_rng(4).normal(size=(5, 12)).astype(np.float32)
    logits[0, 3] = logits[0, 7] = logits[0].max() + 1  # a tie for the top: lower id first
    got = np.asarray(filter_logits(jnp.asarray(logits), temperature=temperature, top_k=top_k, top_p=top_p))
    keep = naive_keep(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(got), keep)
    np.testing.assert_array_equal(got[keep], logits[keep])


# ---------------------------------------------------------------------------------------------
# Errors and compilation


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="max_length=10 is not allowed; it must be a multiple of block_length=4"):
        make_settings(max_length=10, block_length=4)
    with pytest.raises(ValueError, match="top_p=0"):
        make_settings(max_length=8, block_length=4, top_p=0)
    with pytest.raises(ValueError, match="must differ from mask_id"):
        make_settings(max_length=8, block_length=4, eos_id=MASK_ID)
    with pytest.raises(ValueError, match="max_length=36 exceeds the model context model.max_seq_len=32"):
        generate_blocks(CFG, PARAMS, np.zeros((1, 6), np.int32), make_settings(max_length=36, block_length=4),
                        jax.random.key(0))
    settings = make_settings(max_length=16, block_length=4)
    with pytest.raises(ValueError, match=r"prompt \(16 tokens\) leaves nothing to generate"):
        generate_blocks(CFG, PARAMS, np.zeros((1, 16), np.int32), settings, jax.random.key(0))
    with pytest.raises(ValueError, match="KV cache would overflow: .*cache_length=11 < 12"):
        generate_blocks(CFG, PARAMS, np.zeros((1, 6), np.int32), dataclasses.replace(settings, cache_length=11),
                        jax.random.key(0))
    with pytest.raises(ValueError, match="mask_id=40 is not a token of the model"):
        generate_blocks(CFG, PARAMS, np.zeros((1, 6), np.int32),
                        dataclasses.replace(settings, tokens=SpecialTokens(mask_id=40)),
                        jax.random.key(0))
    with pytest.raises(ValueError, match=r"prompt_mask must have the prompt's shape \[1, 6\]"):
        generate_blocks(CFG, PARAMS, np.zeros((1, 6), np.int32), settings, jax.random.key(0),
                        prompt_mask=np.ones((1, 5), bool))


def test_generate_blocks_compiles_once_per_shape():
    settings = make_settings(max_length=8, block_length=2, steps_per_block=1)
    prompt_a, mask_a = make_prompt([3, 1, 2], seed=5)  # shapes no other test uses
    prompt_b, mask_b = make_prompt([2, 3, 3], seed=6)
    with compiles("generate_blocks") as counter:
        run = lambda p, m, s, seed: generate_blocks(  # noqa: E731
            CFG, jax.tree.map(lambda w: w * seed, PARAMS), p, s, jax.random.key(seed),
            prompt_mask=m)[0].block_until_ready()
        run(prompt_a, mask_a, settings, 1)
        first = counter.count
        run(prompt_b, mask_b, settings, 2)  # new prompt values, mask, key and params: no recompile
        second = counter.count - first
    assert (first, second) == (1, 0)
