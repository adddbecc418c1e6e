"""Fused commit passes in the block sampler (issue 16, item 1): `generate_blocks(..., fuse_commits=True)`.

The finished block's COMMIT forward is folded into the first DENOISE forward of the next block. The references:
the unfused cached sampler (the same program with a COMMIT forward of its own), the uncached twin (the whole
canvas under the block-causal mask at every step), one dense forward under the block-causal mask (for the fused
pass's logits) and, for the NFE, the pass accounting replayed from its definition on the returned tokens. Random
draws use the same keys on every side, never compared as streams.
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
from dlmjax.models.transformer import Transformer, init_params
from dlmjax.sampling import BlockSamplerSettings, Denoiser, generate_blocks, generate_blocks_uncached
from dlmjax.sampling.block import commit_and_denoise
from kernels_pallas.masks import BlockCausal

# init_std well above the default: random weights with peaked, varied predictions, so that token-exact
# comparisons do not hinge on float ties. Two layers, not one: a single layer's K/V come from the embeddings alone,
# so a mask that let the finished block see the block after it would leave the cached K/V unchanged.
CFG = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48,
                  max_seq_len=32, init_std=0.3)
MASK_ID = 39
PARAMS = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


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


@dataclasses.dataclass
class Accounting:
    """The forward passes of a run, replayed from the definition on its tokens (TransferTable rule)."""

    prefill: int  # 1 if some prompt has a full block
    steps: dict  # visited block -> denoising steps it took
    stopped: list  # per row: the block after which it was done (EOS), or None

    @property
    def zero_step_blocks(self) -> int:  # Z: visited blocks after the first that took no step
        return sum(1 for b, k in list(self.steps.items())[1:] if k == 0)

    def unfused_nfe(self) -> int:
        return self.prefill + sum(self.steps.values()) + len(self.steps) - 1

    @property
    def seeded(self) -> int:  # E: the fused prefill ran the first visited block's first step
        return int(self.prefill == 1 and self.steps[min(self.steps)] > 0)

    def fused_nfe(self) -> int:
        return self.prefill + sum(self.steps.values()) + self.zero_step_blocks - self.seeded

    def saved_before(self, block: int) -> int:
        """Passes the fused run saved before `block`'s steps: the seeded first step (it rode on the prefill), the
        commit of the block before it (its first step is that commit), and one per earlier visited block after the
        first that took a step."""
        first = min(self.steps)
        if block == first:
            return self.seeded
        return self.seeded + 1 + sum(1 for b, k in self.steps.items() if first < b < block and k > 0)


def replay(tokens: np.ndarray, lengths, settings: BlockSamplerSettings) -> Accounting:
    """Walks the blocks as the definition says: from the block holding the shortest prompt's end, each block takes
    min(S, most masked slots of a row not yet done) steps (the transfer table's nonzero columns); a row is done
    after the block in which one of its generated slots holds EOS; the walk ends after the last block or once
    every row is done."""
    length, eos = settings.block_length, settings.tokens.eos_id
    done = [False] * len(lengths)
    stopped = [None] * len(lengths)
    steps = {}
    for b in range(min(lengths) // length, settings.num_blocks):
        if all(done):
            break
        lo, hi = b * length, (b + 1) * length
        masked = [0 if done[r] else len(range(max(lo, n), hi)) for r, n in enumerate(lengths)]
        steps[b] = min(settings.steps_per_block, max(masked))
        for r, n in enumerate(lengths):
            if not done[r] and eos is not None and (tokens[r, max(lo, n):hi] == eos).any():
                done[r], stopped[r] = True, b
    return Accounting(prefill=int(max(lengths) >= length), steps=steps, stopped=stopped)


# ---------------------------------------------------------------------------------------------
# The fused pass itself


@functools.partial(jax.jit, static_argnums=(0, 1))
def passes(cfg, prefix_length, params, tokens):
    """tokens int32[B, P + 2L'] = [prefix ; finished ; block] (P a multiple of L'): the unfused sequence (PREFILL,
    COMMIT of `finished`, DENOISE of `block`) and the fused one (PREFILL, FUSED pass), each on a cache sized as
    its sampler sizes it (the fused one a block larger)."""
    batch, total = tokens.shape
    length = (total - prefix_length) // 2
    denoiser = Denoiser(cfg)
    positions = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), tokens.shape)
    prefix, finished, block = (tokens[:, :prefix_length], tokens[:, prefix_length:prefix_length + length],
                               tokens[:, prefix_length + length:])
    seen = lambda cache: jnp.broadcast_to(jnp.stack([jnp.int32(0), cache["index"]]), (batch, 1, 2))  # noqa: E731

    def prefill(slots):
        _, cache = denoiser.forward_cached(
            params, prefix, positions=positions[:, :prefix_length], cache=denoiser.init_cache(batch, slots),
            update_cache=True, dense_mask=BlockCausal(length).dense(prefix_length, prefix_length)[None],
            cache_ranges=jnp.zeros((batch, 0, 2), jnp.int32))
        return cache

    cache = prefill(prefix_length + length)
    _, cache = denoiser.forward_cached(params, finished, positions=positions[:, prefix_length:prefix_length + length],
                                       cache=cache, update_cache=True, cache_ranges=seen(cache))
    logits, _ = denoiser.forward_cached(params, block, positions=positions[:, prefix_length + length:], cache=cache,
                                        cache_ranges=seen(cache))
    fused_logits, fused_cache = commit_and_denoise(denoiser, params, prefill(prefix_length + 2 * length), finished,
                                                   block)
    return (logits, cache), (fused_logits, fused_cache)


@functools.partial(jax.jit, static_argnums=(0, 1))
def block_causal_forward(cfg, length, params, tokens):
    return Transformer(cfg, BlockCausal(length)).apply({"params": params}, tokens)


def test_fused_pass_equals_commit_then_denoise_and_one_block_causal_forward():
    length, prefix_length = 4, 8
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, MASK_ID, size=(2, prefix_length + 2 * length)).astype(np.int32)
    tokens[:, -length:] = np.where(rng.random((2, length)) < 0.6, MASK_ID, tokens[:, -length:])  # a noisy block
    (logits, cache), (fused_logits, fused_cache) = passes(CFG, prefix_length, PARAMS, tokens)

    # The block's logits: what the unfused DENOISE sees, and what one forward of the row under BD3's mask gives.
    np.testing.assert_allclose(fused_logits, logits, rtol=1e-5, atol=1e-5)
    full = block_causal_forward(CFG, length, PARAMS, tokens)[:, -length:]
    np.testing.assert_allclose(fused_logits, full, rtol=1e-5, atol=1e-5)
    # The cache: the finished block's K/V as COMMIT wrote them, the same index and committed slots; the scratch
    # block after them is hidden.
    committed = prefix_length + length
    assert int(fused_cache["index"]) == int(cache["index"]) == committed
    np.testing.assert_array_equal(fused_cache["key_mask"][:, :committed], cache["key_mask"])
    assert not np.asarray(fused_cache["key_mask"][:, committed:]).any()
    for name in ("k", "v"):
        np.testing.assert_allclose(fused_cache[name][:, :, :committed], cache[name], rtol=1e-5, atol=1e-5)


def test_finished_block_does_not_see_the_block_after_it():
    """Its K/V and the cache are the same whatever the next block holds: the mask hides that block from it."""
    length, prefix_length = 4, 8
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, MASK_ID, size=(2, prefix_length + 2 * length)).astype(np.int32)
    other = tokens.copy()
    other[:, -length:] = MASK_ID
    (_, _), (logits_a, cache_a) = passes(CFG, prefix_length, PARAMS, tokens)
    (_, _), (logits_b, cache_b) = passes(CFG, prefix_length, PARAMS, other)
    committed = prefix_length + length
    for name in ("k", "v"):
        np.testing.assert_array_equal(cache_a[name][:, :, :committed], cache_b[name][:, :, :committed])
    assert not np.allclose(logits_a, logits_b)  # while the next block's own logits do depend on it


# ---------------------------------------------------------------------------------------------
# The sampler: fused == unfused == uncached, and the NFE


def settings_for(max_length, block_length, steps, temperature=0.0, eos_id=None, **kw):
    return BlockSamplerSettings.bd3(max_length=max_length, block_length=block_length, steps_per_block=steps,
                                    temperature=temperature, mask_id=MASK_ID, eos_id=eos_id,
                                    pad_id=None if eos_id is None else 0, **kw)


# EOS ids are tokens one row generates early and the other does not (checked below: a row stops, another goes on).
CASES = {
    "ar-greedy": ([6, 3], settings_for(16, 1, 1)),
    # Row 1 stops after block 0; block 1 is row 0's prompt: a visited block with no step (Z = 1).
    "bl4-T-top_k-eos-zero_step_block": ([9, 2], settings_for(16, 4, 2, temperature=0.8, eos_id=15, top_k=8)),
    "bl16-greedy-eos": ([20, 5], settings_for(32, 16, 8, eos_id=30)),
}
SLOW_CASES = {
    "ar-T-eos-zero_step_blocks": ([9, 2], settings_for(16, 1, 1, temperature=1.0, eos_id=10)),
    "bl4-greedy-random": ([6, 3], settings_for(16, 4, 3, remasking="random")),
    "bl16-T": ([20, 5], settings_for(32, 16, 8, temperature=1.0, top_p=0.9)),
}
# Cases run with trace=True: the forward pass that committed each slot is checked too.
TRACED = {"bl4-T-top_k-eos-zero_step_block", "ar-T-eos-zero_step_blocks"}


def check_fused_equals_unfused_and_uncached(name, lengths, settings, denoiser=Denoiser(CFG), params=PARAMS):
    prompt, prompt_mask = make_prompt(lengths)
    rng = jax.random.key(7)
    trace = name in TRACED
    run = functools.partial(generate_blocks, denoiser, params, prompt, settings, rng, prompt_mask=prompt_mask,
                            trace=trace)
    fused, fused_nfe, *fused_trace = run(fuse_commits=True)
    unfused, unfused_nfe, *unfused_trace = run(fuse_commits=False)
    twin, twin_nfe = generate_blocks_uncached(denoiser, params, prompt, settings, rng, prompt_mask=prompt_mask)
    fused = np.asarray(fused)
    np.testing.assert_array_equal(fused, unfused)
    np.testing.assert_array_equal(fused, twin)
    assert not (fused == MASK_ID).any()
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(fused[row, :n], prompt[row, prompt_mask[row]])

    acc = replay(fused, lengths, settings)
    assert int(twin_nfe) == sum(acc.steps.values())
    assert int(unfused_nfe) == acc.unfused_nfe()
    assert int(fused_nfe) == acc.fused_nfe()
    # One commit pass saved per visited block after the first, except those that took no step, and the prefill's
    # when it also ran the first block's first step.
    assert int(unfused_nfe) - int(fused_nfe) == len(acc.steps) - 1 - acc.zero_step_blocks + acc.seeded
    if settings.tokens.eos_id is not None:  # the case does what it is named for: one row stops, another goes on
        assert any(s is not None and s < settings.num_blocks - 1 for s in acc.stopped), acc
        assert any(s is None or s > min(x for x in acc.stopped if x is not None) for s in acc.stopped), acc
    if "zero_step" in name:
        assert acc.zero_step_blocks > 0, acc
    if trace:
        # Every generated slot was committed by a pass of the run; the fused pass numbers are the unfused ones
        # minus the commit passes saved before the slot's block.
        got, want = np.asarray(fused_trace[0]), np.asarray(unfused_trace[0]).copy()
        slots = np.arange(settings.max_length)
        for b in acc.steps:
            in_block = (slots >= b * settings.block_length) & (slots < (b + 1) * settings.block_length)
            want[:, in_block] = np.where(want[:, in_block] >= 0, want[:, in_block] - acc.saved_before(b), -1)
        np.testing.assert_array_equal(got, want)
        assert got.max() < int(fused_nfe) and (got >= 0).sum() > 0
    return acc, int(fused_nfe)


@pytest.mark.parametrize("name", list(CASES))
def test_fused_equals_unfused_and_uncached(name):
    lengths, settings = CASES[name]
    acc, nfe = check_fused_equals_unfused_and_uncached(name, lengths, settings)
    if settings.block_length == 1 and settings.tokens.eos_id is None:
        # Autoregressive decoding: one forward per generated slot of the row with the shortest prompt (the
        # prompts' prefill runs the first one).
        assert acc.seeded and nfe == settings.max_length - min(lengths)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_fused_equals_unfused_and_uncached_more(name):
    lengths, settings = SLOW_CASES[name]
    check_fused_equals_unfused_and_uncached(name, lengths, settings)


@pytest.mark.slow
def test_fused_dit_equals_unfused():
    """The DiT backbone takes the same cache calls (its own forward): one case with temperature."""
    cfg = ModelConfig(arch="dit", vocab_size=40, d_model=32, n_layers=2, n_heads=4, mlp_hidden=64, max_seq_len=16,
                      cond_dim=16)
    # DiT zero-initialises its modulation and output layers (constant logits): draw every leaf instead, norm gains
    # near 1, the rest with unit fan-in variance.
    params = init_params(cfg, jax.random.key(2))
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree_util.tree_unflatten(tree, [
        1.0 + 0.1 * jax.random.normal(k, x.shape) if path[-1].key == "weight"
        else jax.random.normal(k, x.shape) / np.sqrt(x.shape[0] if x.ndim > 1 else 10.0)
        for k, (path, x) in zip(keys, leaves)])
    check_fused_equals_unfused_and_uncached("dit", [6, 3], settings_for(16, 4, 2, temperature=1.0), Denoiser(cfg),
                                            params)


def test_fused_with_the_cache_kernel_in_interpret_mode():
    """`attention_impl=pallas_interpret`: DENOISE steps run the cache kernel (per-row cache ranges), the fused
    pass its dense-masked path; the tokens are the uncached twin's (on the XLA path: an independent program)."""
    lengths, settings = [7, 2], settings_for(12, 4, 2)
    prompt, prompt_mask = make_prompt(lengths, seed=2)
    kernel = Denoiser(dataclasses.replace(CFG, attention_impl="pallas_interpret"))
    args = (PARAMS, prompt, settings, jax.random.key(1))
    fused, nfe = generate_blocks(kernel, *args, prompt_mask=prompt_mask, fuse_commits=True)
    twin, _ = generate_blocks_uncached(Denoiser(CFG), *args, prompt_mask=prompt_mask)
    np.testing.assert_array_equal(fused, twin)
    acc = replay(np.asarray(fused), lengths, settings)
    assert int(nfe) == acc.fused_nfe() < acc.unfused_nfe()
    text = str(jax.make_jaxpr(lambda p: generate_blocks.__wrapped__(
        kernel, p, prompt, settings, jax.random.key(1), prompt_mask=prompt_mask, fuse_commits=True))(PARAMS))
    # The DENOISE call site runs the kernel (once a layer); the fused pass has a dense mask inside its chunk,
    # which the kernel does not take, and the prefill reads no cache: both take the dense path.
    assert text.count("name=cached_attention") == CFG.n_layers


# ---------------------------------------------------------------------------------------------
# Compilation


def test_fused_sampler_compiles_once_per_shape():
    settings = settings_for(8, 2, 1)
    prompt_a, mask_a = make_prompt([3, 1, 2, 1], seed=5)  # shapes no other test uses
    prompt_b, mask_b = make_prompt([2, 3, 3, 2], seed=6)
    with compiles("generate_blocks") as counter:
        run = lambda p, m, seed: generate_blocks(  # noqa: E731
            Denoiser(CFG), jax.tree.map(lambda w: w * seed, PARAMS), p, settings, jax.random.key(seed),
            prompt_mask=m, fuse_commits=True)[0].block_until_ready()
        run(prompt_a, mask_a, 1)
        first = counter.count
        run(prompt_b, mask_b, 2)  # new prompt values, mask, key and params: no recompile
        second = counter.count - first
    assert (first, second) == (1, 0)
