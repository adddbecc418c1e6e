"""Token shift under bd3 for shifted models (Dream: raw logit row i predicts slot i + 1): block size 1 at t = 1 is a
causal LM's next-token cross-entropy, and at block size 4 every slot's term equals a per-block recomputation (the
first slot of a block from the clean prefix, or the noisy one in the noisy context)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from dlmjax.config import DiffusionConfig
from dlmjax.diffusion import block
from dlmjax.models.transformer import build_model, init_params
from dlmjax.sampling.denoiser import Denoiser
from dlmjax.train.objective import bd3_loss_terms as _bd3_loss_terms
from kernels_pallas.masks import BlockCausal, Causal

V, L = 40, 12
MASK_ID = V - 1
DREAM = tiny_model_config(arch="dream", qkv_bias=True, vocab_size=V)


@functools.lru_cache(maxsize=None)
def _jitted_terms(diff_cfg):
    return jax.jit(functools.partial(_bd3_loss_terms, model_cfg=DREAM, diff_cfg=diff_cfg))


def bd3_loss_terms(params, batch, t, u, *, model_cfg, diff_cfg):
    """`dlmjax.train.objective.bd3_loss_terms`, jitted once per diffusion config (eager dispatch is slower)."""
    assert model_cfg == DREAM
    return _jitted_terms(diff_cfg)(params, batch, t, u)


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(DREAM, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def batch():
    """Row 0 has a 3-token prompt (clean context, never scored); row 1 ends with 2 padding slots."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, MASK_ID, (2, L)).astype(np.int32)
    prompt = np.zeros((2, L), bool)
    prompt[0, :3] = True
    valid = np.ones((2, L), bool)
    valid[1, -2:] = False
    return {"tokens": jnp.asarray(tokens), "prompt_mask": jnp.asarray(prompt), "valid_mask": jnp.asarray(valid)}


def cfg(block_size, context="clean", clip_min=1e-3, clip_max=1.0):
    return DiffusionConfig(objective="bd3", mask_id=MASK_ID, block_size=block_size, clip_min=clip_min,
                           clip_max=clip_max, context=context)


def subs_log_softmax(logits):
    """float64 log-probabilities over the vocabulary without the mask id (SUBS never gives it mass)."""
    logits = np.asarray(logits, np.float64).copy()
    logits[..., MASK_ID] = -np.inf
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


@functools.lru_cache(maxsize=None)
def _raw_model(mask):
    model = build_model(DREAM, mask)
    return jax.jit(lambda params, tokens, key_mask: model.apply({"params": params}, tokens, key_mask=key_mask))


def raw_alone(params, mask, tokens, valid):
    """Raw (unshifted) logits [B, n, V] of the model on `tokens` [B, n] alone, right-padded to L with the padding
    keys masked out (they lie after every query under causal and block-causal masks)."""
    b, n = tokens.shape
    padded = np.concatenate([tokens, np.zeros((b, L - n), np.int32)], axis=1)
    key_mask = np.concatenate([valid[:, :n], np.zeros((b, L - n), bool)], axis=1)
    return np.asarray(_raw_model(mask)(params, jnp.asarray(padded), jnp.asarray(key_mask)))[:, :n]


def expected_scored(batch):
    valid, prompt = np.asarray(batch["valid_mask"]), np.asarray(batch["prompt_mask"])
    scored = valid & ~prompt
    scored[:, 0] = False  # slot 0 has no row before it
    return scored


def test_dream_is_the_shifted_architecture():
    assert Denoiser(DREAM).lead == 1


def test_block_size_1_at_t_1_is_the_causal_next_token_cross_entropy(params, batch):
    ones = jnp.ones((2, L), jnp.float32)
    loss, aux = bd3_loss_terms(params, batch, ones, jnp.zeros_like(ones), model_cfg=DREAM,
                               diff_cfg=cfg(1, clip_min=1.0, clip_max=1.0))
    x0, valid = np.asarray(batch["tokens"]), np.asarray(batch["valid_mask"])
    scored = expected_scored(batch)
    raw = np.asarray(_raw_model(Causal())(params, batch["tokens"], batch["valid_mask"]))  # one causal forward
    logp = subs_log_softmax(raw[:, :-1])  # row i - 1 predicts slot i
    ce = -np.take_along_axis(logp, x0[:, 1:, None], -1)[..., 0]
    expected = np.where(scored, np.concatenate([np.zeros((2, 1)), ce], axis=1), 0.0)
    np.testing.assert_array_equal(np.asarray(aux["scored"]), scored)
    np.testing.assert_array_equal(np.asarray(aux["is_masked"]), scored)
    assert valid[1, -3] and scored[1, -3] and not scored[1, -2]  # the last real token is scored, padding is not
    np.testing.assert_allclose(np.asarray(aux["nll"]), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss), expected.sum() / scored.sum(), rtol=1e-5)


def naive_shifted_terms(params, batch, t, u, block_size, context):
    """For each block b: the model on [prefix blocks < b ; x_t block b] alone under the block-causal mask, where the
    prefix is x_0 (clean context) or x_t (noisy context); slot i of block b is scored from raw row i - 1 of that
    forward. Returns (nll f32[B, L], xt)."""
    x0, valid = np.asarray(batch["tokens"]), np.asarray(batch["valid_mask"])
    scored = expected_scored(batch)
    t, u = np.asarray(t), np.asarray(u)
    xt = np.where((u <= t) & scored, MASK_ID, x0)
    nll = np.zeros(x0.shape)
    for b in range(L // block_size):
        lo, hi = b * block_size, (b + 1) * block_size
        prefix = x0 if context == "clean" else xt
        raw = raw_alone(params, BlockCausal(block_size), np.concatenate([prefix[:, :lo], xt[:, lo:hi]], axis=1),
                        valid)
        for i in range(max(lo, 1), hi):
            logp = subs_log_softmax(raw[:, i - 1])
            term = -np.take_along_axis(logp, x0[:, i, None], -1)[:, 0] / t[:, i]
            nll[:, i] = np.where(xt[:, i] == MASK_ID, term, 0.0)
    return np.where(scored, nll, 0.0), xt


def injected(seed=2):
    rng = np.random.default_rng(seed)
    t = block.block_times(rng.random((2, L // 4)).astype(np.float32), 4, 1e-3, 1.0)
    return jnp.asarray(t), jnp.asarray(rng.random((2, L)).astype(np.float32))


@pytest.mark.parametrize("context", ["clean", "noisy"])
def test_block_size_4_equals_a_per_block_recomputation(params, batch, context):
    t, u = injected()
    loss, aux = bd3_loss_terms(params, batch, t, u, model_cfg=DREAM, diff_cfg=cfg(4, context))
    expected, xt = naive_shifted_terms(params, batch, t, u, 4, context)
    first = np.arange(L) % 4 == 0
    assert (xt[:, first] == MASK_ID).sum() >= 2, "some first slots of blocks must be targets"
    np.testing.assert_array_equal(np.asarray(aux["is_masked"]), xt == MASK_ID)
    np.testing.assert_allclose(np.asarray(aux["nll"]), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss), expected.sum() / expected_scored(batch).sum(), rtol=1e-5)


def test_first_slots_of_blocks_read_the_clean_prefix(params, batch):
    """Clean context: the aligned logits at a block's first slot are the model's prediction under the block-causal
    mask on x_0 alone (raw row i - 1), whatever x_t holds; the noisy context differs there when the prefix is
    masked (the power check of the test above)."""
    t, u = injected()
    _, clean = bd3_loss_terms(params, batch, t, u, model_cfg=DREAM, diff_cfg=cfg(4, "clean"))
    _, noisy = bd3_loss_terms(params, batch, t, u, model_cfg=DREAM, diff_cfg=cfg(4, "noisy"))
    raw = np.asarray(_raw_model(BlockCausal(4))(params, batch["tokens"], batch["valid_mask"]))
    for i in (4, 8):
        np.testing.assert_allclose(np.asarray(clean["logits"])[:, i], raw[:, i - 1], rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(clean["logits"])[:, 4:] - np.asarray(noisy["logits"])[:, 4:]).max() > 1e-2


def test_align_block_logits_reads_the_right_row_of_the_right_stream():
    noisy = np.arange(6, dtype=np.float32)[None, :, None] + 100.0  # row i holds 100 + i
    clean = np.arange(6, dtype=np.float32)[None, :, None] + 200.0
    got = np.asarray(block.align_block_logits(jnp.asarray(noisy), jnp.asarray(clean), 3, 1))[0, :, 0]
    np.testing.assert_array_equal(got, [100, 100, 101, 202, 103, 104])  # slot 3 opens a block: clean row 2
    same = np.asarray(block.align_block_logits(jnp.asarray(noisy), jnp.asarray(clean), 3, 0))
    np.testing.assert_array_equal(same, noisy)
    with pytest.raises(ValueError, match="lead=2 is not supported"):
        block.align_block_logits(jnp.asarray(noisy), jnp.asarray(clean), 3, 2)


def test_has_predecessor_skips_row_starts_padding_and_new_documents():
    valid = np.array([[True] * 6, [False, True, True, True, True, False]])
    segments = np.array([[1, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 0]])
    got = np.asarray(block.has_predecessor(jnp.asarray(valid), jnp.asarray(segments)))
    np.testing.assert_array_equal(got, [[False, True, True, False, True, True],
                                        [False, False, True, True, True, False]])
    np.testing.assert_array_equal(np.asarray(block.has_predecessor(jnp.asarray(valid)))[0], [False] + [True] * 5)


def test_packed_shifted_rows_never_score_a_document_start(params):
    """A packed row: the first slot of the second document has no prediction of its own (row i - 1 is the
    previous document's), so it is not scored."""
    rng = np.random.default_rng(3)
    seg = np.array([[1] * 4 + [2] * 8])
    batch = {"tokens": jnp.asarray(rng.integers(0, MASK_ID, (1, L)), jnp.int32),
             "prompt_mask": jnp.zeros((1, L), bool), "valid_mask": jnp.ones((1, L), bool),
             "segment_ids": jnp.asarray(seg, jnp.int32),
             "positions": jnp.asarray(np.concatenate([np.arange(4), np.arange(8)])[None], jnp.int32)}
    ones = jnp.ones((1, L), jnp.float32)
    for context in ("clean", "noisy"):
        _, aux = bd3_loss_terms(params, batch, ones, jnp.zeros_like(ones), model_cfg=DREAM, diff_cfg=cfg(4, context))
        scored = np.asarray(aux["scored"])[0]
        assert not scored[0] and not scored[4] and scored[1:4].all() and scored[5:].all(), context
