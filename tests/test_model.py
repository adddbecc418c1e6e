"""The transformer and its attention dispatch against plain numpy references."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlmjax.config import ModelConfig
from dlmjax.models import BlockCausal, Causal, Full, Transformer, attention, init_params
from dlmjax.sampling import Denoiser
from dlmjax.models.layers import RMSNorm, apply_rotary, rotary_tables

TINY = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, mlp_hidden=48, max_seq_len=32)


def naive_attention(q, k, v, allowed):
    """Loop over batch, heads and queries in float64: the obviously correct twin."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, lq, h, dh = q.shape
    groups = h // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            kh = hi // groups
            for i in range(lq):
                s = k[bi, :, kh] @ q[bi, i, hi] / np.sqrt(dh)
                s = np.where(allowed[bi, i], s, -np.inf)
                p = np.exp(s - s.max())
                out[bi, i, hi] = (p / p.sum()) @ v[bi, :, kh]
    return out


@pytest.mark.parametrize("mask", [Full(), Causal(), BlockCausal(3)])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_naive(mask, kv_heads):
    rng = np.random.default_rng(0)
    b, length, h, dh = 2, 7, 4, 8
    q = rng.normal(size=(b, length, h, dh)).astype(np.float32)
    k = rng.normal(size=(b, length, kv_heads, dh)).astype(np.float32)
    v = rng.normal(size=(b, length, kv_heads, dh)).astype(np.float32)
    key_mask = np.ones((b, length), bool)
    key_mask[1, :2] = False  # left padding in row 1
    allowed = mask.dense(length, length, np)[None] & key_mask[:, None, :]
    allowed = allowed | ~allowed.any(-1, keepdims=True)  # rows with no key are undefined; skip them below
    got = np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=mask,
                               key_mask=jnp.asarray(key_mask)))
    want = naive_attention(q, k, v, allowed)
    rows = (mask.dense(length, length, np)[None] & key_mask[:, None, :]).any(-1)  # [b, q]
    np.testing.assert_allclose(got[rows], want[rows], rtol=1e-5, atol=1e-5)


def test_mask_specs_match_their_definitions():
    q, kv = np.arange(10)[:, None], np.arange(10)[None, :]
    np.testing.assert_array_equal(BlockCausal(4).dense(10, 10, np), (q // 4) >= (kv // 4))
    np.testing.assert_array_equal(Causal().dense(10, 10, np), kv <= q)
    assert Full().dense(3, 5, np).all()
    with pytest.raises(ValueError, match="block_size=0"):
        BlockCausal(0)
    with pytest.raises(ValueError, match="impl='flash' is not available"):
        attention(jnp.zeros((1, 2, 1, 2)), jnp.zeros((1, 2, 1, 2)), jnp.zeros((1, 2, 1, 2)), impl="flash")


def test_rmsnorm_matches_formula_and_casts_before_scaling():
    x = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
    module = RMSNorm(eps=1e-5)
    params = {"params": {"weight": jnp.linspace(0.5, 1.5, 16)}}
    got = module.apply(params, jnp.asarray(x))
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * np.linspace(0.5, 1.5, 16)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    got16 = module.apply(params, jnp.asarray(x, jnp.bfloat16))
    assert got16.dtype == jnp.bfloat16


def test_rotary_is_a_rotation_that_encodes_relative_position():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)

    def rot(x, pos):
        cos, sin = rotary_tables(jnp.array([[pos]]), 8, 10000.0)
        return apply_rotary(x, cos, sin)

    np.testing.assert_allclose(jnp.linalg.norm(rot(q, 5)), jnp.linalg.norm(q), rtol=1e-6)
    dot = lambda a, b: float(jnp.sum(rot(q, a) * rot(k, b)))  # noqa: E731
    assert dot(3, 1) == pytest.approx(dot(12, 10), rel=1e-5)
    assert dot(3, 1) != pytest.approx(dot(3, 2), rel=1e-3)


def test_every_parameter_has_logical_axis_names():
    boxed = Transformer(TINY).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    specs = nn.get_partition_spec(boxed)
    leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert leaves and all(len(s) >= 1 and all(a is not None for a in s) for s in leaves)


def _stack_layers(params, n_layers):
    blocks = [params[f"blocks_{i}"] for i in range(n_layers)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    rest = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    return dict(rest, blocks=stacked)


@pytest.mark.slow  # ~25 s on 2 cores; CI runs it with the slow tests
def test_scan_and_remat_give_the_same_logits_as_the_unrolled_model():
    params = init_params(TINY, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, TINY.vocab_size)
    want = Denoiser(TINY)(params, tokens)
    for scan, remat in [(True, False), (True, True), (False, True)]:
        cfg = ModelConfig(**{**TINY.__dict__, "scan_layers": scan, "remat": remat})
        p = _stack_layers(params, TINY.n_layers) if scan else params
        np.testing.assert_allclose(Denoiser(cfg)(p, tokens), want, rtol=1e-5, atol=1e-5)
        grad = jax.grad(lambda p: jnp.sum(Denoiser(cfg)(p, tokens) ** 2))(p)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grad))


def test_left_padding_with_key_mask_equals_unpadded():
    """RoPE-only bidirectional attention is translation invariant, so left padding + key mask is exact."""
    params = init_params(TINY, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 6), 0, TINY.vocab_size)
    padded = jnp.concatenate([jnp.full((1, 3), 7), tokens], axis=1)
    key_mask = jnp.arange(9)[None] >= 3
    want = Denoiser(TINY)(params, tokens)
    got = Denoiser(TINY)(params, padded, key_mask)[:, 3:]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    leaky = Denoiser(TINY)(params, padded)[:, 3:]  # without the mask the padding leaks in
    assert float(jnp.max(jnp.abs(leaky - want))) > 1e-3


def test_gqa_tied_and_bf16_variants_run_with_float32_logits():
    tokens = jnp.zeros((2, 5), jnp.int32)
    for kw in ({"n_kv_heads": 2}, {"n_kv_heads": 1}, {"tie_embeddings": True}, {"dtype": "bfloat16"}):
        cfg = ModelConfig(**{**TINY.__dict__, **kw})
        params = init_params(cfg, jax.random.PRNGKey(0))
        logits = Denoiser(cfg)(params, tokens)
        assert logits.shape == (2, 5, cfg.vocab_size) and logits.dtype == jnp.float32
        if kw.get("tie_embeddings"):
            assert "ff_out" not in params
        if "n_kv_heads" in kw:
            assert params["blocks_0"]["k_proj"]["kernel"].shape == (32, kw["n_kv_heads"] * cfg.head_dim)
