"""D2F-style training on the bd3 code path: monotonic block times held to their closed-form distribution, and the
noisy-context loss (x_t alone under the block-causal mask) held to a naive per-block loop and to a dense-mask twin."""
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlmjax.config import ConfigError, DiffusionConfig, ModelConfig, load_config
from dlmjax.diffusion import block
from dlmjax.models.transformer import Transformer, init_params
from dlmjax.train.objective import bd3_loss_terms as _bd3_loss_terms, nelbo_terms
from kernels_pallas.masks import BlockCausal, Full

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# ------------------------------------------------------------------------------------------ monotonic times

LO, HI = 0.2, 0.7


def test_monotonic_times_rise_along_the_row_and_stay_in_range():
    t = np.asarray(block.sample_block_times(jax.random.PRNGKey(0), 64, 24, 4, LO, HI,
                                            times=block.MonotonicTimes()))
    per_block = t[:, ::4]
    assert t.shape == (64, 24)
    np.testing.assert_array_equal(t, np.repeat(per_block, 4, axis=1))  # constant within a block
    assert (np.diff(per_block, axis=1) >= 0).all()
    assert (t >= LO).all() and (t <= HI).all()
    assert (np.diff(per_block, axis=1) > 0).mean() > 0.99  # it does rise (not a constant row)


def test_monotonic_times_follow_their_closed_form():
    """t_0 ~ U[lo, hi]; increment k ~ U[0, (hi - t_0) / (n - 1)], so the increment divided by its bound is
    U[0, 1] (mean 1/2, variance 1/12) and E[t_k] = (lo + hi) / 2 + k (hi - lo) / (4 (n - 1)). Checked within 5
    standard errors over 40000 rows."""
    rows, n = 40000, 5
    t = np.asarray(block.sample_block_times(jax.random.PRNGKey(1), rows, 2 * n, 2, LO, HI, antithetic=False,
                                            times=block.MonotonicTimes()), np.float64)[:, ::2]
    t0 = t[:, 0]
    assert abs(t0.mean() - (LO + HI) / 2) < 5 * (HI - LO) / np.sqrt(12 * rows)
    assert abs(t0.var() - (HI - LO) ** 2 / 12) < 5 * (HI - LO) ** 2 * np.sqrt(1 / 180 / rows)
    bound = (HI - t0) / (n - 1)
    ratio = np.diff(t, axis=1) / bound[:, None]
    assert (ratio >= -1e-5).all() and (ratio <= 1 + 1e-5).all()
    for k in range(n - 1):
        assert abs(ratio[:, k].mean() - 0.5) < 5 * np.sqrt(1 / 12 / rows), k
        assert abs(ratio[:, k].var() - 1 / 12) < 5 * np.sqrt(1 / 180 / rows), k
    expected = (LO + HI) / 2 + np.arange(n) * (HI - LO) / (4 * (n - 1))
    se = t.std(axis=0) / np.sqrt(rows)
    assert (np.abs(t.mean(axis=0) - expected) < 5 * se).all(), (t.mean(axis=0), expected)
    # Increments of one row are independent of each other given t_0: their correlation is ~ 0.
    assert abs(np.corrcoef(ratio[:, 0], ratio[:, 1])[0, 1]) < 5 / np.sqrt(rows)


def test_monotonic_times_from_given_uniforms():
    u = np.random.default_rng(0).random((3, 4)).astype(np.float32)
    t = np.asarray(block.monotonic_block_times(u, 2, LO, HI, antithetic=False), np.float64)
    t0 = LO + (HI - LO) * u[:, 0].astype(np.float64)
    expected = t0[:, None] + np.concatenate([np.zeros((3, 1)), np.cumsum(u[:, 1:], axis=1)], axis=1) * (
        (HI - t0) / 3)[:, None]
    np.testing.assert_allclose(t, np.repeat(expected, 2, axis=1), rtol=1e-6)
    # Antithetic: the first-block uniforms of the B rows fall one in each stratum [j/B, (j+1)/B).
    first = np.asarray(block.monotonic_block_times(u, 1, 0.0, 1.0, antithetic=True))[:, 0]
    assert (np.floor(first * 3) == np.arange(3)).all()
    # One block is t_0 alone; clip_min = clip_max = 1 is t = 1 (the AR check), as for independent times.
    np.testing.assert_allclose(np.asarray(block.monotonic_block_times(u[:, :1], 3, LO, HI, False)),
                               np.repeat(t0[:, None], 3, axis=1), rtol=1e-6)
    np.testing.assert_array_equal(block.monotonic_block_times(u, 2, 1.0, 1.0), np.ones((3, 8)))


# ------------------------------------------------------------------------------------------ noisy context

V, MASK_ID, L = 32, 31, 12
MODEL = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=32, init_std=0.3)


@functools.lru_cache(maxsize=None)
def _jitted_terms(diff_cfg):
    return jax.jit(functools.partial(_bd3_loss_terms, model_cfg=MODEL, diff_cfg=diff_cfg))


def bd3_loss_terms(params, batch, t, u, *, model_cfg, diff_cfg):
    """`dlmjax.train.objective.bd3_loss_terms`, jitted once per diffusion config (eager dispatch is slower)."""
    assert model_cfg == MODEL
    return _jitted_terms(diff_cfg)(params, batch, t, u)


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(MODEL, jax.random.PRNGKey(0))


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


def d2f_cfg(block_size, context="noisy", block_times="monotonic", clip_min=LO, clip_max=HI):
    return DiffusionConfig(objective="bd3", mask_id=MASK_ID, block_size=block_size, clip_min=clip_min,
                           clip_max=clip_max, context=context, block_times=block_times)


def injected(block_size, seed=2):
    """(t f32[2, L] monotonic, u f32[2, L]) as numpy-drawn uniforms (no jax sampler to compile)."""
    rng = np.random.default_rng(seed)
    t = block.monotonic_block_times(rng.random((2, L // block_size)).astype(np.float32), block_size, LO, HI)
    return jnp.asarray(t), jnp.asarray(rng.random((2, L)).astype(np.float32))


def subs_nll(logits, x0, masked, weight):
    """-log p(x0) * weight at masked slots, over the vocabulary without the mask id (float64 numpy)."""
    logits = np.asarray(logits, np.float64).copy()
    logits[..., MASK_ID] = -np.inf
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    target = np.take_along_axis(logp, np.asarray(x0)[..., None], -1)[..., 0]
    return np.where(masked, -target * weight, 0.0)


@functools.lru_cache(maxsize=None)
def _jitted_model(mask):
    model = Transformer(MODEL, mask)
    return jax.jit(lambda params, tokens, key_mask, dense: model.apply({"params": params}, tokens, key_mask=key_mask,
                                                                        dense_mask=dense))


def run_alone(params, mask, tokens, valid, dense=None):
    """Logits f32[B, n] of the model on `tokens` [B, n] alone, right-padded to L with the padding keys masked out
    (one compile per mask; under a block-causal mask padding keys lie after every query anyway)."""
    b, n = tokens.shape
    padded = np.concatenate([tokens, np.zeros((b, L - n), np.int32)], axis=1)
    key_mask = np.concatenate([valid[:, :n], np.zeros((b, L - n), bool)], axis=1)
    dense = np.ones((1, L, L), bool) if dense is None else dense
    logits = _jitted_model(mask)(params, jnp.asarray(padded), jnp.asarray(key_mask), jnp.asarray(dense))
    return np.asarray(logits)[:, :n]


def noised(batch, t, u):
    x0, valid = np.asarray(batch["tokens"]), np.asarray(batch["valid_mask"])
    protect = ~valid | np.asarray(batch["prompt_mask"])
    xt = np.where((np.asarray(u) <= np.asarray(t)) & ~protect, MASK_ID, x0)
    return x0, xt, valid, protect


def naive_noisy_loss(params, batch, t, u, block_size):
    """For each block b: the model on x_t's blocks 0..b alone (nothing later exists), block-causal, block b scored."""
    x0, xt, valid, protect = noised(batch, t, u)
    t = np.asarray(t)
    nll = np.zeros(x0.shape)
    for b in range(L // block_size):
        lo, hi = b * block_size, (b + 1) * block_size
        logits = run_alone(params, BlockCausal(block_size), xt[:, :hi], valid)
        nll[:, lo:hi] = subs_nll(logits[:, lo:hi], x0[:, lo:hi], xt[:, lo:hi] == MASK_ID, 1.0 / t[:, lo:hi])
    return np.where(~protect, nll, 0.0)


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_noisy_context_equals_a_loop_over_blocks_and_a_dense_mask_twin(params, batch, block_size):
    t, u = injected(block_size)
    loss, aux = bd3_loss_terms(params, batch, t, u, model_cfg=MODEL, diff_cfg=d2f_cfg(block_size))
    expected = naive_noisy_loss(params, batch, t, u, block_size)
    x0, xt, valid, protect = noised(batch, t, u)
    np.testing.assert_array_equal(np.asarray(aux["is_masked"]), xt == MASK_ID)
    assert (xt[:, block_size:] == MASK_ID).any(), "the prefix must hold masks for the test to mean something"
    np.testing.assert_allclose(np.asarray(aux["nll"]), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss), expected.sum() / (~protect).sum(), rtol=1e-5)
    # Dense twin: the full-attention model with the block-causal rule written out pair by pair.
    dense = np.array([[q // block_size >= k // block_size for k in range(L)] for q in range(L)])[None]
    logits = run_alone(params, Full(), xt, valid, dense)
    twin = np.where(~protect, subs_nll(logits, x0, xt == MASK_ID, 1.0 / np.asarray(t)), 0.0)
    np.testing.assert_allclose(np.asarray(aux["nll"]), twin, rtol=1e-5, atol=1e-5)


def test_noisy_and_clean_context_differ_when_the_prefix_is_masked(params, batch):
    """Power check of the loop above: the clean context conditions on x_0 and gives other terms."""
    t, u = injected(4)
    _, noisy = bd3_loss_terms(params, batch, t, u, model_cfg=MODEL, diff_cfg=d2f_cfg(4))
    _, clean = bd3_loss_terms(params, batch, t, u, model_cfg=MODEL, diff_cfg=d2f_cfg(4, context="clean"))
    first_block = np.asarray(noisy["nll"])[:, :4]
    np.testing.assert_allclose(first_block, np.asarray(clean["nll"])[:, :4], rtol=1e-5, atol=1e-5)  # no prefix
    assert np.abs(np.asarray(noisy["nll"]) - np.asarray(clean["nll"]))[:, 4:].max() > 1e-2


def test_one_block_noisy_context_is_the_bd3_loss(params, batch):
    """With one block the clean stream is never read, so both contexts compute the same terms."""
    rng = np.random.default_rng(5)
    t = jnp.asarray(block.block_times(rng.random((2, 1)).astype(np.float32), L, 1e-3, 1.0))
    u = jnp.asarray(rng.random((2, L)).astype(np.float32))
    cfgs = [d2f_cfg(0, context, "independent", 1e-3, 1.0) for context in ("noisy", "clean")]
    (noisy_loss, noisy), (clean_loss, clean) = [bd3_loss_terms(params, batch, t, u, model_cfg=MODEL, diff_cfg=c)
                                                for c in cfgs]
    assert int(noisy["is_masked"].sum()) >= 4
    np.testing.assert_allclose(np.asarray(noisy["nll"]), np.asarray(clean["nll"]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(noisy_loss), float(clean_loss), rtol=1e-6)


def test_nelbo_of_a_d2f_run_is_the_clean_context_bd3_bound(params, batch):
    """The held-out NELBO ignores the training context and times: a D2F run reports BD3's bound."""
    key = jax.random.PRNGKey(4)
    d2f, _ = nelbo_terms(params, batch, key, model_cfg=MODEL, diff_cfg=d2f_cfg(4))
    bd3, _ = nelbo_terms(params, batch, key, model_cfg=MODEL, diff_cfg=d2f_cfg(4, "clean", "independent", 1e-3, 1.0))
    assert float(jnp.sum(bd3)) > 0
    np.testing.assert_array_equal(np.asarray(d2f), np.asarray(bd3))


# ------------------------------------------------------------------------------------ training and configs


@pytest.mark.slow  # ~20 s: 30 jitted steps (the default suite's bd3 twin is in test_block_diffusion.py)
def test_a_jitted_d2f_train_step_reduces_the_loss_of_a_fixed_batch():
    from dlmjax.sharding import batch_sharding, make_mesh
    from dlmjax.train.loop import load_data
    from dlmjax.train.objective import diffusion_loss
    from dlmjax.train.state import init_train_state, make_optimizer
    from dlmjax.train.step import as_batch, make_train_step

    cfg = load_config(None, ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.mlp_hidden=64",
                             "model.max_seq_len=16", "data.batch_size=8", "data.eval_size=8", "optim.warmup_steps=2",
                             "optim.lr=3e-3", "diffusion.objective=bd3", "diffusion.block_size=4",
                             "diffusion.block_times=monotonic", "diffusion.context=noisy", "diffusion.clip_min=0.2",
                             "diffusion.clip_max=0.7"])
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.optim, 30)
    state, shardings = init_train_state(cfg.model, tx, 0, mesh)
    step = make_train_step(tx, cfg.model, cfg.diffusion, shardings, batch_sharding(mesh))
    batch = as_batch(next(iter(load_data(cfg)[0])))
    probe = jax.jit(lambda p: diffusion_loss(p, batch, jax.random.PRNGKey(9), model_cfg=cfg.model,
                                             diff_cfg=cfg.diffusion)[0])
    before = float(probe(state.params))
    for _ in range(30):
        state, metrics = step(state, batch)
    after = float(probe(state.params))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 30
    assert after < 0.6 * before, (before, after)


@pytest.mark.parametrize("overrides, pattern", [
    (["diffusion.objective=bd3", "diffusion.block_times=rising"],
     r"^diffusion.block_times='rising' is not allowed; choose one of \['independent', 'monotonic'\]$"),
    (["diffusion.objective=bd3", "diffusion.context=dirty"],
     r"^diffusion.context='dirty' is not allowed; choose one of \['clean', 'noisy'\]$"),
    (["diffusion.context=noisy"], r"^diffusion.context='noisy' applies to diffusion.objective=bd3, not 'llada_sft'"),
    (["diffusion.objective=mdlm", "diffusion.schedule=linear", "diffusion.block_times=monotonic"],
     r"^diffusion.block_times='monotonic' applies to diffusion.objective=bd3, not 'mdlm'"),
])
def test_config_errors_name_the_new_fields(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(CONFIGS / "demo.yaml", overrides)
    assert "\n" not in str(err.value)


def test_a_d2f_config_loads():
    d = load_config(CONFIGS / "addition_bd4.yaml", ["diffusion.block_times=monotonic", "diffusion.context=noisy",
                                                    "diffusion.clip_min=0.2", "diffusion.clip_max=0.7"]).diffusion
    assert (d.objective, d.block_times, d.context, d.clip_min, d.clip_max) == ("bd3", "monotonic", "noisy", 0.2, 0.7)
    assert DiffusionConfig().block_times == "independent" and DiffusionConfig().context == "clean"
