"""Block diffusion (BD3-LM): the [x_t ; x_0] training mask, and the vectorised objective held equal to naive
loops (per block, left-to-right AR) and to the plain masked-diffusion loss, with injected t and u."""
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlmjax.config import ConfigError, DiffusionConfig, ModelConfig, load_config
from dlmjax.diffusion import block, forward, losses
from dlmjax.diffusion.masks import bd3_training_mask
from dlmjax.diffusion.schedules import LinearSchedule
from kernels_pallas.masks import Bd3Training, BlockCausal, Causal, Full
from dlmjax.models.transformer import Transformer, init_params
from dlmjax.train.objective import bd3_loss_terms, diffusion_loss, nelbo_sums

GOLDEN = Path(__file__).parent / "golden" / "tiny_bd3lm"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# ---------------------------------------------------------------------------------------------------- the mask


def naive_mask(length, block_size):
    """The BD3 training mask by its definition (M_BD | M_OBC | M_BC), one (query, key) pair at a time."""
    n = 2 * length
    mask = np.zeros((n, n), bool)
    for q in range(n):
        for kv in range(n):
            q_clean, kv_clean = q >= length, kv >= length
            q_block = (q - length if q_clean else q) // block_size
            kv_block = (kv - length if kv_clean else kv) // block_size
            block_diagonal = q_block == kv_block and q_clean == kv_clean
            offset_block_causal = q_block > kv_block and kv_clean and not q_clean
            block_causal = q_block >= kv_block and kv_clean and q_clean
            mask[q, kv] = block_diagonal or offset_block_causal or block_causal
    return mask


def test_mask_equals_the_reference_golden_mask():
    golden = np.load(GOLDEN / "attn_mask_L16_block4.npy")
    mask = bd3_training_mask(16, 4)
    assert mask.dtype == bool and mask.shape == (32, 32)
    np.testing.assert_array_equal(mask, golden)
    assert mask.sum() == 320


def test_mask_equals_the_worked_example():
    rows = ["11000000", "11000000", "00111100", "00111100", "00001100", "00001100", "00001111", "00001111"]
    expected = np.array([[c == "1" for c in r] for r in rows])
    np.testing.assert_array_equal(bd3_training_mask(4, 2), expected)


@pytest.mark.parametrize("length, block_size", [(16, 4), (12, 3), (8, 8), (8, 1), (6, 2), (10, 5)])
def test_mask_equals_its_definition_and_the_mask_spec(length, block_size):
    expected = naive_mask(length, block_size)
    np.testing.assert_array_equal(bd3_training_mask(length, block_size), expected)
    spec = Bd3Training(length, block_size)
    np.testing.assert_array_equal(np.asarray(spec.dense(2 * length, 2 * length, jnp)), expected)  # jnp indices
    np.testing.assert_array_equal(spec.dense(2 * length, 2 * length, np), expected)
    assert bool(spec.allowed(length - 1, length)) == expected[length - 1, length]  # plain ints too
    assert hash(spec) == hash(Bd3Training(length, block_size))


def test_block_size_1_and_length_are_the_ar_and_mdlm_layouts():
    length = 6
    ar = bd3_training_mask(length, 1)
    causal = np.tril(np.ones((length, length), bool))
    np.testing.assert_array_equal(ar[length:, length:], causal)  # clean half: causal
    np.testing.assert_array_equal(ar[:length, length:], np.tril(causal, -1))  # noisy i sees clean < i
    np.testing.assert_array_equal(ar[:length, :length], np.eye(length, dtype=bool))  # and itself
    one = bd3_training_mask(length, length)
    assert one[:length, :length].all() and not one[:length, length:].any() and not one[length:, :length].any()


@pytest.mark.parametrize("length, block_size, pattern", [
    (10, 4, r"block_size=4 must divide length=10"),
    (8, 0, r"block_size=0 must be a positive int"),
    (0, 4, r"length=0 must be a positive int"),
])
def test_bad_lengths_raise(length, block_size, pattern):
    with pytest.raises(ValueError, match=pattern):
        bd3_training_mask(length, block_size)
    with pytest.raises(ValueError, match=pattern):
        Bd3Training(length, block_size)


# ------------------------------------------------------------------------------------------- times and masking


def test_block_times_stratify_repeat_and_clip():
    u = np.random.default_rng(0).random((2, 3)).astype(np.float32)
    t = np.asarray(block.block_times(u, 2, 0.2, 0.8))
    strat = np.mod(u / 6 + np.arange(6, dtype=np.float32).reshape(2, 3) / 6, 1.0)
    np.testing.assert_allclose(t, np.repeat(strat, 2, axis=1) * 0.6 + 0.2, rtol=1e-6)
    assert t.shape == (2, 6) and (t[:, ::2] == t[:, 1::2]).all()
    # One sample per stratum of [0, 1): sorted, entry j lies in [j/6, (j+1)/6).
    assert (np.floor(strat.ravel() * 6) == np.arange(6)).all()
    np.testing.assert_array_equal(block.block_times(u, 2, 1.0, 1.0), np.ones((2, 6)))
    np.testing.assert_allclose(block.block_times(u, 1, 0.0, 1.0, antithetic=False), u)


# ------------------------------------------------------------------------------- the objective vs naive loops

V, MASK_ID, L = 32, 31, 12
MODEL = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=32, init_std=0.3)


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


def bd3_cfg(block_size, clip_min=1e-3, clip_max=1.0):
    return DiffusionConfig(objective="bd3", mask_id=MASK_ID, block_size=block_size, clip_min=clip_min,
                           clip_max=clip_max)


def injected(block_size, clip_min, clip_max, seed=2):
    """(t f32[2, L], u f32[2, L]); u equals t at one scored slot to pin the inclusive `u <= t`."""
    rng = np.random.default_rng(seed)
    u_blocks = rng.random((2, L // block_size)).astype(np.float32)
    t = np.asarray(block.block_times(u_blocks, block_size, clip_min, clip_max))
    u = rng.random((2, L)).astype(np.float32)
    u[1, 4] = t[1, 4]
    return jnp.asarray(t), jnp.asarray(u)


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
    return jax.jit(lambda params, tokens, key_mask: model.apply({"params": params}, tokens, key_mask=key_mask))


def run_alone(params, mask, tokens, valid):
    """Logits f32[B, n] of the model on `tokens` [B, n] alone (plain positions 0..n-1).

    Right-padded to L with the padding keys masked out, so one compile serves every n: a masked key gets an
    exactly zero attention weight (and under causal or block-causal masks it lies after every query anyway).
    """
    b, n = tokens.shape
    padded = np.concatenate([tokens, np.zeros((b, L - n), np.int32)], axis=1)
    key_mask = np.concatenate([valid[:, :n], np.zeros((b, L - n), bool)], axis=1)
    return np.asarray(_jitted_model(mask)(params, jnp.asarray(padded), jnp.asarray(key_mask)))[:, :n]


def naive_block_loss(params, batch, t, u, block_size, clip_min, prefix_mask=None):
    """For each block b: the model on [x_0 blocks < b ; x_t block b] alone, block b scored.

    Inside that shorter sequence the attention is block-causal (clean blocks see clean blocks <= theirs, the
    noisy block sees all of them and itself), which is the BD3 factorisation; full attention would let the
    clean prefix see later clean blocks and the noisy block.
    """
    x0, t, u = np.asarray(batch["tokens"]), np.asarray(t), np.asarray(u)
    valid = np.asarray(batch["valid_mask"])
    protect = ~valid | np.asarray(batch["prompt_mask"])
    xt = np.where((u <= t) & ~protect, MASK_ID, x0)
    mask = prefix_mask or BlockCausal(block_size)
    nll = np.zeros(x0.shape)
    for b in range(L // block_size):
        lo, hi = b * block_size, (b + 1) * block_size
        logits = run_alone(params, mask, np.concatenate([x0[:, :lo], xt[:, lo:hi]], axis=1), valid)
        weight = 1.0 if clip_min > 0.5 else 1.0 / t[:, lo:hi]
        nll[:, lo:hi] = subs_nll(logits[:, lo:hi], x0[:, lo:hi], xt[:, lo:hi] == MASK_ID, weight)
    nll = np.where(~protect, nll, 0.0)
    return nll.sum() / (~protect).sum(), nll


@pytest.mark.parametrize("block_size, clip_min, clip_max", [
    (1, 1e-3, 1.0), (3, 1e-3, 1.0), (4, 1e-3, 1.0), (12, 1e-3, 1.0),
    (4, 0.6, 0.9),  # the reference quirk: weight 1 instead of 1/t when clip_min > 0.5
])
def test_vectorised_loss_equals_a_loop_over_blocks(params, batch, block_size, clip_min, clip_max):
    t, u = injected(block_size, clip_min, clip_max)
    loss, aux = bd3_loss_terms(params, batch, t, u, model_cfg=MODEL, diff_cfg=bd3_cfg(block_size, clip_min, clip_max))
    expected_loss, expected_nll = naive_block_loss(params, batch, t, u, block_size, clip_min)
    assert bool(aux["is_masked"][1, 4]), "u == t must mask (BD3 compares u <= p)"
    assert not aux["is_masked"][0, :3].any() and not aux["is_masked"][1, -2:].any(), "prompt/padding stay clean"
    assert int(aux["is_masked"].sum()) >= 4 and float(loss) > 0
    np.testing.assert_allclose(np.asarray(aux["nll"]), expected_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)


def test_the_clean_prefix_must_not_see_later_blocks(params, batch):
    """Power check of the loop above: with full attention over [x_0 < b ; x_t b] the losses differ."""
    t, u = injected(4, 1e-3, 1.0)
    loss, _ = bd3_loss_terms(params, batch, t, u, model_cfg=MODEL, diff_cfg=bd3_cfg(4))
    full, _ = naive_block_loss(params, batch, t, u, 4, 1e-3, prefix_mask=Full())
    assert abs(float(loss) - full) > 1e-3 * abs(full)


def test_block_size_1_with_t_1_is_a_left_to_right_ar_loop(params, batch):
    t, u = injected(1, 1.0, 1.0)
    assert (np.asarray(t) == 1.0).all()
    loss, aux = bd3_loss_terms(params, batch, t, u, model_cfg=MODEL, diff_cfg=bd3_cfg(1, 1.0, 1.0))
    x0, valid = np.asarray(batch["tokens"]), np.asarray(batch["valid_mask"])
    scored = valid & ~np.asarray(batch["prompt_mask"])
    ar = np.zeros(x0.shape)
    for i in range(L):  # x_0[< i] then one mask token, causal attention; score x_0[i]
        tokens = np.concatenate([x0[:, :i], np.full((2, 1), MASK_ID, np.int32)], axis=1)
        ar[:, i] = subs_nll(run_alone(params, Causal(), tokens, valid)[:, i], x0[:, i], True, 1.0)
    ar = np.where(scored, ar, 0.0)
    np.testing.assert_array_equal(np.asarray(aux["is_masked"]), scored)
    np.testing.assert_allclose(np.asarray(aux["nll"]), ar, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss), ar.sum() / scored.sum(), rtol=1e-5)


def test_block_size_length_is_the_masked_diffusion_loss(params, batch):
    t, u = injected(L, 1e-3, 1.0)
    loss, aux = bd3_loss_terms(params, batch, t, u, model_cfg=MODEL, diff_cfg=bd3_cfg(0))  # 0 means L
    scored = batch["valid_mask"] & ~batch["prompt_mask"]
    xt, _ = forward.forward_sample(batch["tokens"], t, u, MASK_ID, protect=~scored, inclusive=True)
    logits = Transformer(MODEL, Full()).apply({"params": params}, xt, key_mask=batch["valid_mask"])
    mdlm, nll = losses.mdlm_loss(logits, batch["tokens"], xt, t[:, 0], scored, LinearSchedule(), mask_id=MASK_ID)
    np.testing.assert_allclose(np.asarray(aux["nll"]), np.asarray(nll), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss), float(mdlm), rtol=1e-5)


def test_nelbo_uses_the_unbiased_schedule_whatever_the_training_clip(params):
    """All-zero head: -log p = log(V - 1) at every masked slot (SUBS), and E[1{u <= t} / t] = 1 for
    t ~ U[1e-3, 1], so NELBO/token = log(V - 1); the training clip (0.6, 0.9) would give 0.75 of it."""
    zero = dict(params, ff_out=jnp.zeros_like(params["ff_out"]))
    tokens = jax.random.randint(jax.random.PRNGKey(3), (128, L), 0, MASK_ID)
    batch = {"tokens": tokens, "prompt_mask": jnp.zeros((128, L), bool), "valid_mask": jnp.ones((128, L), bool)}
    step = jax.jit(lambda p, b, k: nelbo_sums(p, b, k, model_cfg=MODEL, diff_cfg=bd3_cfg(4, 0.6, 0.9)))
    sums = [step(zero, batch, jax.random.PRNGKey(i)) for i in range(32)]
    nelbo = sum(float(s) for s, _ in sums) / sum(int(n) for _, n in sums)
    assert nelbo == pytest.approx(np.log(V - 1), rel=0.05)


# ------------------------------------------------------------------------------------ training and configs

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.mlp_hidden=64", "model.max_seq_len=16",
        "data.batch_size=8", "data.eval_size=8", "optim.warmup_steps=2", "optim.lr=3e-3",
        "diffusion.objective=bd3", "diffusion.block_size=4"]


def test_jitted_train_step_on_bd3_reduces_the_loss_of_a_fixed_batch():
    from dlmjax.sharding import batch_sharding, make_mesh
    from dlmjax.train.loop import load_data
    from dlmjax.train.state import init_train_state, make_optimizer
    from dlmjax.train.step import as_batch, make_train_step

    cfg = load_config(None, TINY)
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.optim, 30)
    state, shardings = init_train_state(cfg.model, tx, 0, mesh)
    step = make_train_step(tx, cfg.model, cfg.diffusion, shardings, batch_sharding(mesh))
    batch = as_batch(next(iter(load_data(cfg)[0])))
    # The same t and u before and after training, so the comparison is not noise.
    probe = jax.jit(lambda p: diffusion_loss(p, batch, jax.random.PRNGKey(9), model_cfg=cfg.model,
                                             diff_cfg=cfg.diffusion)[0])
    before = float(probe(state.params))
    for _ in range(30):
        state, metrics = step(state, batch)
    after = float(probe(state.params))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 30
    assert after < 0.6 * before, (before, after)  # measured: 5.75 -> 2.78


@pytest.mark.parametrize("overrides, pattern", [
    (["diffusion.block_size=5"], r"diffusion.block_size=5 must divide data.seq_len=16"),
    (["diffusion.block_size=32"], r"diffusion.block_size=32 must divide data.seq_len=16"),
    (["diffusion.block_size=-1"], r"diffusion.block_size=-1 must be >= 0"),
    (["diffusion.clip_min=0.9", "diffusion.clip_max=0.5"],
     r"diffusion.clip_min=0.9 and diffusion.clip_max=0.5 must satisfy 0 <= clip_min <= clip_max <= 1"),
    (["diffusion.clip_max=1.5"], r"diffusion.clip_min=0.001 and diffusion.clip_max=1.5 must satisfy"),
    (["diffusion.clip_min=-0.1"], r"diffusion.clip_min=-0.1 and diffusion.clip_max=1.0 must satisfy"),
])
def test_config_errors_name_the_fields(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(CONFIGS / "demo.yaml", ["diffusion.objective=bd3"] + overrides)


@pytest.mark.parametrize("name, block_size, clip", [
    ("addition_ar.yaml", 1, (1.0, 1.0)), ("addition_bd4.yaml", 4, (1e-3, 1.0)), ("addition_bd16.yaml", 16, (1e-3, 1.0)),
])
def test_addition_configs_compare_ar_block_and_full_diffusion(name, block_size, clip):
    cfg = load_config(CONFIGS / name)
    d = cfg.diffusion
    assert d.objective == "bd3" and d.block_size == block_size and (d.clip_min, d.clip_max) == clip
    assert cfg.data.task == "addition" and cfg.data.seq_len == 16
