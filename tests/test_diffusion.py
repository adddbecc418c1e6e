"""Tests for dlmjax.diffusion: schedules, the forward process, and the MDLM / LLaDA losses.

Golden values come from the PyTorch originals (tests/golden/tiny_mdlm/, see tests/golden/README.md);
the rest are held against closed forms or naive float64 numpy loops written from the papers' definitions.

About the tiny_mdlm fixture: `golden_logits.npy` is `DiT(x_t, sigma)` with sigma = (0.7, 2.3), but the
reference's SUBS log-probs and loss were computed from `DiT(x_t, 0)` (time conditioning is off, so the
wrapper zeroes sigma). Those sigma = 0 logits are not stored, so `_sigma0_logits` computes them with dlmjax's
own DiT on the fixture's `model.safetensors` (tests/test_dit.py holds that DiT to `golden_logits.npy`).
"""
from __future__ import annotations

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlmjax.diffusion import (
    NEG_INF,
    CosineSchedule,
    LinearSchedule,
    LLaDASchedule,
    LogLinearSchedule,
    forward_sample,
    get_schedule,
    llada_pretrain_loss,
    llada_sft_loss,
    mask_tokens,
    mdlm_loss,
    sample_t,
    subs_log_probs,
    t_from_uniform,
)

GOLDEN = pathlib.Path(__file__).parent / "golden" / "tiny_mdlm"
MASK_ID = json.loads((GOLDEN / "config.json").read_text())["mask_index"]  # 127, the last id


def _load(name: str) -> np.ndarray:
    return np.load(GOLDEN / f"{name}.npy")


@functools.cache
def _sigma0_logits(name: str) -> np.ndarray:
    """float32 [B, L, V]: dlmjax's DiT with the fixture's weights on `name` (x_t) at sigma = 0, as the wrapper
    runs it."""
    from safetensors.numpy import load_file

    from dlmjax.interchange import dit as dit_io
    from dlmjax.models.dit import DiT

    cfg, _ = dit_io.model_config(json.loads((GOLDEN / "config.json").read_text()), "mdlm")
    tensors = load_file(GOLDEN / "model.safetensors")
    params, _ = dit_io.to_params(tensors.__getitem__, tensors.keys(), cfg, "mdlm")
    return np.asarray(jax.jit(DiT(cfg).apply)({"params": params}, _load(name)))


def _log_softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------------------------
# SUBS and the MDLM loss against the reference's outputs.


def test_subs_log_probs_match_golden():
    xt = _load("golden_xt")
    want = _load("golden_subs_logprobs")
    subs = jax.jit(subs_log_probs, static_argnums=2)
    got = np.asarray(subs(_sigma0_logits("golden_xt"), xt, MASK_ID))
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-5
    # Carry-over slots: NEG_INF everywhere except 0 at the observed token, bit for bit.
    np.testing.assert_array_equal(got == NEG_INF, want == NEG_INF)
    np.testing.assert_array_equal(got == 0.0, want == 0.0)
    assert np.count_nonzero(want == NEG_INF) == 127 * np.count_nonzero(xt != MASK_ID)


def test_subs_log_probs_match_float64_twin_on_raw_golden_logits():
    """The same three SUBS steps in float64 numpy on the stored (sigma != 0) backbone logits."""
    logits, xt = _load("golden_logits"), _load("golden_xt")
    shifted = logits.astype(np.float64)
    shifted[..., MASK_ID] += NEG_INF
    want = _log_softmax64(shifted)
    unmasked = xt != MASK_ID
    want[unmasked] = NEG_INF
    b, i = np.nonzero(unmasked)
    want[b, i, xt[unmasked]] = 0.0
    got = np.asarray(subs_log_probs(jnp.asarray(logits), jnp.asarray(xt), MASK_ID), np.float64)
    non_mask = np.arange(logits.shape[-1]) != MASK_ID
    assert np.max(np.abs(got - want)[..., non_mask]) <= 1e-5
    # The mask column sits at -1e6 + O(10), where float32 spacing is 0.0625: one rounding step at most.
    assert np.max(np.abs(got - want)[..., MASK_ID]) <= 0.0625
    np.testing.assert_allclose(np.exp(got[~unmasked]).sum(-1), 1.0, rtol=1e-5)


def test_mdlm_loss_matches_golden():
    x0, xt = _load("golden_loss_x0"), _load("golden_loss_xt")
    t, valid = _load("golden_loss_t"), _load("golden_loss_attention_mask")
    want_nll = _load("golden_loss_nlls")
    want_loss = json.loads((GOLDEN / "golden.json").read_text())["loss"]["loss"]
    fn = jax.jit(mdlm_loss, static_argnames=("schedule", "mask_id"))
    logits = _sigma0_logits("golden_loss_xt")
    loss, nll = fn(logits, x0, xt, t, valid, LogLinearSchedule(), mask_id=MASK_ID)
    np.testing.assert_allclose(np.asarray(nll), want_nll, rtol=1e-5, atol=0)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    # Unmasked slots and padding contribute exactly zero (row 1 has masked padding slots).
    assert np.all(np.asarray(nll)[(xt != MASK_ID) | (valid == 0)] == 0.0)
    # mask_id=None means the last logit index, which is the fixture's mask id.
    loss_default, _ = mdlm_loss(logits, x0, xt, t, valid, LogLinearSchedule())
    assert float(loss_default) == float(loss)


def test_mdlm_loss_weighting_and_reduction_from_golden_nlls_alone():
    """Without any derived file: logits built so that -log p(x0) = golden_nll * t at masked slots.

    The analytic weight is 1/t (float64), so our nll must give back golden_nll; wrong weights
    (e.g. dsigma alone), a missing mask-logit suppression (the mask logit is set high), scoring
    unmasked or padded slots (their logits are random), or dividing by the masked count all fail.
    """
    x0, xt = _load("golden_loss_x0"), _load("golden_loss_xt")
    t, valid = _load("golden_loss_t"), _load("golden_loss_attention_mask")
    golden_nll = _load("golden_loss_nlls").astype(np.float64)
    b_size, length = x0.shape
    vocab = MASK_ID + 1
    logits = np.random.default_rng(0).normal(size=(b_size, length, vocab))
    scored = (xt == MASK_ID) & (valid == 1)
    for b, i in zip(*np.nonzero(scored)):
        neg_log_p = golden_nll[b, i] * np.float64(t[b])
        p = math.exp(-neg_log_p)
        logits[b, i] = 0.0
        logits[b, i, MASK_ID] = 8.0  # would take most of the mass without SUBS
        # p = e^c / (e^c + (V - 2)) over the V - 1 non-mask ids.
        logits[b, i, x0[b, i]] = math.log(p * (vocab - 2) / (1.0 - p))
    loss, nll = mdlm_loss(logits.astype(np.float32), x0, xt, t, valid, LogLinearSchedule(), mask_id=MASK_ID)
    np.testing.assert_allclose(np.asarray(nll), golden_nll, rtol=1e-5, atol=0)
    want_loss = json.loads((GOLDEN / "golden.json").read_text())["loss"]["loss"]
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)


def test_loglinear_mask_prob_follows_reference_float_path():
    golden = json.loads((GOLDEN / "golden.json").read_text())["loss"]
    got = np.asarray(LogLinearSchedule().mask_prob(jnp.asarray(golden["t"], jnp.float32)))
    np.testing.assert_array_max_ulp(got, np.asarray(golden["move_chance"], np.float32), maxulp=1)


# ----------------------------------------------------------------------------------------------
# Schedules.

ALL_SCHEDULES = [
    LinearSchedule(),
    LinearSchedule(eps=1e-4),
    CosineSchedule(),
    CosineSchedule(eps=1e-4),
    LogLinearSchedule(),
    LLaDASchedule(),
]


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=repr)
def test_schedule_derivative_and_shape(schedule):
    t = np.linspace(0.01, 0.99, 99)
    h = 1e-6
    with jax.enable_x64(True):
        def f64(fn, x):
            return np.asarray(fn(jnp.asarray(x, jnp.float64)))

        alpha = f64(schedule.alpha, t)
        assert alpha.dtype == np.float64
        fd = (f64(schedule.alpha, t + h) - f64(schedule.alpha, t - h)) / (2 * h)
        np.testing.assert_allclose(f64(schedule.dalpha, t), fd, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(f64(schedule.mask_prob, t), 1.0 - alpha, rtol=1e-12, atol=1e-15)
        ends = f64(schedule.alpha, [0.0, 1.0])
    assert np.all(np.diff(alpha) < 0), "alpha must decrease strictly in t"
    # Within eps of the ideal ends (LLaDA keeps alpha(0) = 1 - eps by design).
    assert abs(ends[0] - 1.0) <= 1e-3 + 1e-12 and abs(ends[1]) <= 1e-3 + 1e-12
    t32 = jnp.full((2, 3), 0.5, jnp.float32)
    for fn in (schedule.alpha, schedule.dalpha, schedule.mask_prob, schedule.weight):
        out = jax.jit(fn)(t32)
        assert out.shape == (2, 3) and out.dtype == jnp.float32


def _closed_form_weight(schedule, t):
    """-alpha'/(1 - alpha) worked out by hand for the eps = 0 md4 schedules and the others."""
    if isinstance(schedule, (LinearSchedule, LogLinearSchedule)):
        return 1.0 / t
    if isinstance(schedule, CosineSchedule):
        return (math.pi / 2) / np.tan(math.pi * t / 2)
    return (1.0 - schedule.eps) / ((1.0 - schedule.eps) * t + schedule.eps)


@pytest.mark.parametrize(
    "schedule", [LinearSchedule(), CosineSchedule(), LogLinearSchedule(), LLaDASchedule()], ids=repr
)
def test_schedule_weight_closed_form(schedule):
    t = np.linspace(1e-3, 1.0, 257)
    with jax.enable_x64(True):
        got64 = np.asarray(schedule.weight(jnp.asarray(t)))
        np.testing.assert_allclose(got64, _closed_form_weight(schedule, t), rtol=1e-9, atol=1e-12)
    # float32, the training dtype: the reference's dsigma / expm1(sigma) path for log-linear.
    got32 = np.asarray(schedule.weight(jnp.asarray(t, jnp.float32)))
    t32 = t.astype(np.float32).astype(np.float64)
    # atol only matters at t = 1, where the cosine weight is 0 and numpy's cot(pi/2) is 6e-17.
    np.testing.assert_allclose(got32, _closed_form_weight(schedule, t32), rtol=1e-5, atol=1e-6)


def test_loglinear_sigma_and_rate():
    s = LogLinearSchedule()
    t = np.linspace(0.0, 1.0, 11)
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(s.sigma(jnp.asarray(t))), -np.log(1 - 0.999 * t), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(s.dsigma(jnp.asarray(t))), 0.999 / (1 - 0.999 * t), rtol=1e-12)
    assert abs(float(s.sigma(jnp.float32(1.0))) - (-math.log(1e-3))) < 1e-4


def test_get_schedule_registry_and_errors():
    assert get_schedule("loglinear") == LogLinearSchedule()
    assert get_schedule("llada", eps=0.01) == LLaDASchedule(eps=0.01)
    assert get_schedule("cosine") == CosineSchedule() and get_schedule("linear") == LinearSchedule()
    with pytest.raises(ValueError, match="allowed: cosine, linear, llada, loglinear"):
        get_schedule("geometric")
    with pytest.raises(ValueError, match="no field"):
        get_schedule("loglinear", sigma_max=20.0)
    with pytest.raises(ValueError, match=r"LogLinearSchedule.eps=1.5"):
        LogLinearSchedule(eps=1.5)
    hash(LogLinearSchedule())  # static jit argument


# ----------------------------------------------------------------------------------------------
# Forward process.


def test_masking_statistics_per_row():
    b, length = 32, 8192
    p = np.linspace(0.02, 0.98, b, dtype=np.float32)
    x0 = jnp.zeros((b, length), jnp.int32)
    xt, is_masked = jax.jit(mask_tokens, static_argnums=3)(jax.random.key(0), x0, jnp.asarray(p)[:, None], 7)
    frac = np.asarray(is_masked).mean(1)
    stderr = np.sqrt(p * (1 - p) / length)
    assert np.all(np.abs(frac - p) < 5 * stderr), np.max(np.abs(frac - p) / stderr)
    np.testing.assert_array_equal(np.asarray(xt), np.where(np.asarray(is_masked), 7, 0))


def test_protect_slots_are_never_masked():
    rng = np.random.default_rng(1)
    x0 = rng.integers(0, 50, size=(4, 64)).astype(np.int32)
    protect = rng.random((4, 64)) < 0.3
    # p = 1 masks every unprotected slot, since u < 1 always.
    u = jnp.asarray(rng.random((4, 64)), jnp.float32)
    xt, is_masked = forward_sample(x0, jnp.ones((4, 1)), u, 99, protect=protect)
    np.testing.assert_array_equal(np.asarray(is_masked), ~protect)
    np.testing.assert_array_equal(np.asarray(xt), np.where(protect, x0, 99))
    assert xt.dtype == jnp.int32


def test_strict_and_inclusive_comparison_at_the_edge():
    x0 = jnp.full((1, 5), 3, jnp.int32)
    u = jnp.asarray([[0.25, 0.5, 0.75, 0.0, 0.5]], jnp.float32)
    p = jnp.asarray([[0.5, 0.5, 0.5, 0.0, 0.49999997]], jnp.float32)
    _, strict = forward_sample(x0, p, u, 9)
    xt, inclusive = forward_sample(x0, p, u, 9, inclusive=True)
    np.testing.assert_array_equal(np.asarray(strict), [[True, False, False, False, False]])
    np.testing.assert_array_equal(np.asarray(inclusive), [[True, True, False, True, False]])
    np.testing.assert_array_equal(np.asarray(xt), [[9, 9, 3, 9, 3]])


def test_forward_sample_rejects_mismatched_uniforms():
    with pytest.raises(ValueError, match="u has shape"):
        forward_sample(jnp.zeros((2, 4), jnp.int32), 0.5, jnp.zeros((2, 3)), 1)


# ----------------------------------------------------------------------------------------------
# Diffusion times.


def test_antithetic_t_from_injected_uniforms():
    u = np.asarray([0.0, 0.5, 0.999999, 0.25, 0.1], np.float32)
    eps = 1e-3
    n = len(u)
    want = (1 - eps) * np.mod((u.astype(np.float64) + np.arange(n)) / n, 1.0) + eps
    got = jax.jit(t_from_uniform, static_argnums=(1, 2))(u, eps, True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    plain = (1 - eps) * u.astype(np.float64) + eps
    np.testing.assert_allclose(np.asarray(t_from_uniform(u, eps, False)), plain, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(t_from_uniform(u, 0.0, False)), u, rtol=0)


def test_sample_t_is_stratified_and_in_range():
    n, eps = 16, 1e-3
    t = np.asarray(sample_t(jax.random.key(3), n, eps=eps))
    assert t.shape == (n,) and t.dtype == np.float32
    u = (t.astype(np.float64) - eps) / (1 - eps)
    np.testing.assert_array_equal(np.floor(u * n), np.arange(n))  # time i lies in stratum i
    many = np.asarray(sample_t(jax.random.key(4), 4096, eps=eps, antithetic=False))
    assert many.min() >= np.float32(eps) and many.max() <= 1.0
    assert np.floor(((many - eps) / (1 - eps)) * 4096).astype(int).tolist() != list(range(4096))


# ----------------------------------------------------------------------------------------------
# LLaDA losses against naive float64 loops.


def _random_case(seed, b=3, length=9, vocab=11):
    rng = np.random.default_rng(seed)
    logits = (3.0 * rng.normal(size=(b, length, vocab))).astype(np.float32)
    x0 = rng.integers(0, vocab, size=(b, length))
    is_masked = rng.random((b, length)) < 0.5
    p = ((1 - 1e-3) * rng.random(b) + 1e-3).astype(np.float32)
    return logits, x0, is_masked, p


def _ce64(logits, x0, b, i):
    return -_log_softmax64(logits[b, i])[x0[b, i]]


def test_llada_pretrain_loss_matches_naive_loop():
    logits, x0, is_masked, p = _random_case(5)
    b_size, length = x0.shape
    total = 0.0
    for b in range(b_size):
        for i in range(length):
            if is_masked[b, i]:
                total += _ce64(logits, x0, b, i) / np.float64(p[b])
    want = total / (b_size * length)
    fn = jax.jit(llada_pretrain_loss)
    np.testing.assert_allclose(float(fn(logits, x0, is_masked, p)), want, rtol=1e-5)
    np.testing.assert_allclose(float(fn(logits, x0, is_masked, p[:, None])), want, rtol=1e-5)


def test_llada_sft_loss_matches_naive_loop_and_skips_prompt():
    logits, x0, is_masked, p = _random_case(6)
    b_size, length = x0.shape
    prompt_len = [2, 5, 0]
    prompt = np.arange(length)[None, :] < np.asarray(prompt_len)[:, None]
    # Also mark some prompt slots masked: they must still not count.
    is_masked = is_masked | (prompt & (np.arange(length)[None, :] % 2 == 0))
    total = 0.0
    for b in range(b_size):
        answer_length = length - prompt_len[b]
        for i in range(prompt_len[b], length):
            if is_masked[b, i]:
                total += _ce64(logits, x0, b, i) / (np.float64(p[b]) * answer_length)
    want = total / b_size
    got = float(jax.jit(llada_sft_loss)(logits, x0, is_masked, p, prompt))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_llada_sft_normaliser_is_answer_length():
    """Uniform logits: CE = log V at every slot; one row, 3 prompt + 5 answer slots, all masked, p = 1/2."""
    vocab = 16
    logits = jnp.zeros((1, 8, vocab))
    x0 = jnp.arange(8)[None, :]
    prompt = jnp.arange(8)[None, :] < 3
    loss = llada_sft_loss(logits, x0, jnp.ones((1, 8), bool), jnp.asarray([0.5]), prompt)
    np.testing.assert_allclose(float(loss), 5 * math.log(vocab) / (0.5 * 5), rtol=1e-6)


def test_llada_sft_all_prompt_row_has_finite_gradient():
    logits, x0, is_masked, p = _random_case(7, b=2, length=4, vocab=5)
    prompt = np.asarray([[True] * 4, [True, False, False, False]])
    grad = jax.jit(jax.grad(llada_sft_loss))(jnp.asarray(logits), x0, is_masked, p, prompt)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[0] == 0.0)


def test_masked_ce_loss_matches_naive_loop():
    from dlmjax.diffusion.losses import masked_ce_loss

    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 6, 11)).astype(np.float32)
    x0 = rng.integers(0, 11, size=(3, 6))
    is_masked = rng.random((3, 6)) < 0.4
    total, count = 0.0, 0
    for b in range(3):
        for i in range(6):
            if is_masked[b, i]:
                total -= _log_softmax64(logits[b, i])[x0[b, i]]
                count += 1
    got = float(masked_ce_loss(jnp.asarray(logits), jnp.asarray(x0), jnp.asarray(is_masked)))
    assert got == pytest.approx(total / count, rel=1e-5)
    assert float(masked_ce_loss(jnp.asarray(logits), jnp.asarray(x0), jnp.zeros((3, 6), bool))) == 0.0
