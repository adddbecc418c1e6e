"""The MDLM / BD3-LM DiT (`model.arch=dit`) and its checkpoint interchange, against the PyTorch originals.

Golden values are the originals' own outputs on tiny random-weight models (tests/golden/tiny_mdlm, tiny_bd3lm; see
tests/golden/README.md), loaded through `dlmjax.interchange.dit`. The rest: the KV cache against the uncached
block sampler, a jitted train step, and the errors of the converter and the module.
"""
from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from dlmjax.config import ConfigError, DiffusionConfig, ModelConfig, load_config
from dlmjax.diffusion import NEG_INF, LogLinearSchedule, mdlm_loss, subs_log_probs
from dlmjax.interchange import dit as dit_io
from dlmjax.interchange.errors import InterchangeError
from kernels_pallas.masks import Bd3Training, BlockCausal, Full
from dlmjax.models.dit import DiT
from dlmjax.models.transformer import build_model, init_cache, init_params
from dlmjax.sampling import BlockSamplerSettings, Denoiser, generate_blocks, generate_blocks_uncached
from dlmjax.train.objective import bd3_loss_terms

GOLDEN = pathlib.Path(__file__).parent / "golden"
FULL = Full()


def _npy(fixture: str, name: str) -> np.ndarray:
    return np.load(GOLDEN / fixture / f"{name}.npy")


@functools.cache
def _fixture(fixture: str):
    """(ModelConfig, meta, params, tensors) of a golden checkpoint, through the converter."""
    arch = {"tiny_mdlm": "mdlm", "tiny_bd3lm": "bd3lm"}[fixture]
    cfg, meta = dit_io.model_config(json.loads((GOLDEN / fixture / "config.json").read_text()), arch)
    tensors = load_file(GOLDEN / fixture / "model.safetensors")
    params, _ = dit_io.to_params(tensors.__getitem__, tensors.keys(), cfg, arch)
    return cfg, meta, params, tensors


@functools.partial(jax.jit, static_argnames=("cfg", "mask"))
def _forward(cfg, mask, params, tokens, positions=None, key_mask=None, sigma=None):
    return DiT(cfg, mask).apply({"params": params}, tokens, positions=positions, key_mask=key_mask, sigma=sigma)


def _bd3_forward(sigma=None):
    """The x_t half of the BD3 fixture's logits on golden `[x_t ; x_0]`, positions 0..L-1 on both halves."""
    cfg, meta, params, _ = _fixture("tiny_bd3lm")
    x_input = _npy("tiny_bd3lm", "golden_x_input")
    length = x_input.shape[1] // 2
    positions = np.tile(np.arange(length, dtype=np.int32), (x_input.shape[0], 2))
    mask = Bd3Training(length, meta["block_size"])
    return np.asarray(_forward(cfg, mask, params, x_input, positions, sigma=sigma))[:, :length]


def _max_err(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))


# ---------------------------------------------------------------------------------------------------------------
# MDLM golden parity


def test_mdlm_logits_match_golden():
    cfg, _, params, _ = _fixture("tiny_mdlm")
    xt, sigma = _npy("tiny_mdlm", "golden_xt"), _npy("tiny_mdlm", "golden_sigma")
    want = _npy("tiny_mdlm", "golden_logits")
    got = _forward(cfg, FULL, params, xt, sigma=sigma)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    assert _max_err(got, want) <= 1e-4
    # sigma really conditions the output (a port that ignored it would pass only at sigma = 0).
    assert _max_err(_forward(cfg, FULL, params, xt), want) > 1e-2


def test_mdlm_subs_log_probs_match_golden():
    """The wrapper zeroes sigma (time conditioning off): SUBS of DiT(x_t, 0), -1e6 entries included."""
    cfg, meta, params, _ = _fixture("tiny_mdlm")
    xt = _npy("tiny_mdlm", "golden_xt")
    want = _npy("tiny_mdlm", "golden_subs_logprobs")
    got = np.asarray(subs_log_probs(_forward(cfg, FULL, params, xt), xt, meta["mask_id"]))
    assert _max_err(got, want) <= 1e-4
    np.testing.assert_array_equal(got == NEG_INF, want == NEG_INF)
    np.testing.assert_array_equal(got == 0.0, want == 0.0)


def test_mdlm_loss_matches_golden():
    """The original's DiT attends to padding (flash varlen over whole rows): the mask only enters the reduction."""
    cfg, meta, params, _ = _fixture("tiny_mdlm")
    x0, xt = _npy("tiny_mdlm", "golden_loss_x0"), _npy("tiny_mdlm", "golden_loss_xt")
    t, valid = _npy("tiny_mdlm", "golden_loss_t"), _npy("tiny_mdlm", "golden_loss_attention_mask")
    logits = _forward(cfg, FULL, params, xt)
    loss, nll = mdlm_loss(logits, x0, xt, t, valid, LogLinearSchedule(), mask_id=meta["mask_id"])
    np.testing.assert_allclose(np.asarray(nll), _npy("tiny_mdlm", "golden_loss_nlls"), rtol=1e-5, atol=1e-6)
    want = json.loads((GOLDEN / "tiny_mdlm" / "golden.json").read_text())["loss"]["loss"]
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# BD3-LM golden parity


def test_bd3_logits_match_golden_on_two_stream_input():
    want = _npy("tiny_bd3lm", "golden_logits")
    got = _bd3_forward(sigma=_npy("tiny_bd3lm", "golden_sigma"))
    assert got.shape == want.shape
    assert _max_err(got, want) <= 1e-4


def test_bd3_training_mask_is_the_golden_mask():
    length, block = 16, 4
    np.testing.assert_array_equal(np.asarray(Bd3Training(length, block).dense(2 * length, 2 * length)),
                                  _npy("tiny_bd3lm", "attn_mask_L16_block4"))


def test_bd3_subs_log_probs_match_golden():
    _, meta, _, _ = _fixture("tiny_bd3lm")
    xt = _npy("tiny_bd3lm", "golden_x_input")[:, :16]
    want = _npy("tiny_bd3lm", "golden_subs_logprobs")
    got = np.asarray(subs_log_probs(_bd3_forward(), xt, meta["mask_id"]))
    assert _max_err(got, want) <= 1e-4
    np.testing.assert_array_equal(got == NEG_INF, want == NEG_INF)


def test_bd3_loss_terms_match_golden():
    """dlmjax's bd3 objective fed the golden t and masking: the original's `ignore_bos` (column 0 clean, unscored)
    is a one-token prompt here (prompts stay clean and are not scored), and u = 0 / 1 reproduces golden x_t."""
    cfg, meta, params, _ = _fixture("tiny_bd3lm")
    x0, xt = _npy("tiny_bd3lm", "golden_loss_x0"), _npy("tiny_bd3lm", "golden_loss_xt")
    t = _npy("tiny_bd3lm", "golden_loss_t")
    mask_id = meta["mask_id"]
    u = np.where(xt == mask_id, 0.0, 1.0).astype(np.float32)
    assert t.max() < 1.0  # so u = 1 never masks under BD3's inclusive u <= t
    prompt = np.zeros(x0.shape, bool)
    prompt[:, 0] = True
    batch = {"tokens": jnp.asarray(x0, jnp.int32), "prompt_mask": jnp.asarray(prompt),
             "valid_mask": jnp.ones(x0.shape, bool)}
    diff_cfg = DiffusionConfig(objective="bd3", mask_id=mask_id, block_size=meta["block_size"],
                               clip_min=meta["clip_min"], clip_max=meta["clip_max"])
    fn = jax.jit(functools.partial(bd3_loss_terms, model_cfg=cfg, diff_cfg=diff_cfg))
    loss, aux = fn(params, batch, jnp.asarray(t), jnp.asarray(u))
    want_xt = xt.copy()
    want_xt[:, 0] = x0[:, 0]
    np.testing.assert_array_equal(np.asarray(aux["is_masked"]), want_xt == mask_id)
    np.testing.assert_array_equal(np.asarray(aux["scored"]), _npy("tiny_bd3lm", "golden_loss_token_mask") == 1)
    np.testing.assert_allclose(np.asarray(aux["nll"]), _npy("tiny_bd3lm", "golden_loss_nlls"), rtol=1e-5, atol=1e-5)
    want = json.loads((GOLDEN / "tiny_bd3lm" / "golden.json").read_text())["loss"]["loss"]
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Interchange


@pytest.mark.parametrize("fixture", ["tiny_mdlm", "tiny_bd3lm"])
@pytest.mark.parametrize("prefix", ["", "backbone."])
def test_import_export_round_trips_bit_for_bit(fixture, prefix):
    cfg, _, _, tensors = _fixture(fixture)
    arch = {"tiny_mdlm": "mdlm", "tiny_bd3lm": "bd3lm"}[fixture]
    named = {prefix + k: v for k, v in tensors.items()}
    if prefix:
        named["sampling_eps_min"] = np.asarray(0.05, np.float32)  # HF BD3LM buffers sit outside `backbone.`
    params, passthrough = dit_io.to_params(named.__getitem__, list(named), cfg, arch)
    assert set(passthrough) == {prefix + "rotary_emb.inv_freq"} | ({"sampling_eps_min"} if prefix else set())
    exported = dict(dit_io.to_hf(params, cfg, arch, prefix=prefix), **passthrough)
    assert set(exported) == set(named)
    for name, array in named.items():
        assert exported[name].dtype == array.dtype and exported[name].shape == array.shape, name
        np.testing.assert_array_equal(exported[name], array, err_msg=name)
    # The converted tree is exactly the tree DiT(cfg) initialises: same paths, shapes and dtypes.
    fresh = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(fresh), jax.tree_util.tree_leaves(params)):
        assert a.shape == b.shape


def test_attn_qkv_layout_splits_q_k_v_as_the_original():
    """HF rows [0, D) are q, [D, 2D) k, [2D, 3D) v: kernel[:, j] must be row block j transposed."""
    cfg, _, params, tensors = _fixture("tiny_mdlm")
    d = cfg.d_model
    w = tensors["blocks.1.attn_qkv.weight"]
    kernel = params["blocks_1"]["attn_qkv"]["kernel"]
    for j in range(3):
        np.testing.assert_array_equal(kernel[:, j], w[j * d:(j + 1) * d].T)


def test_model_config_reads_both_layouts():
    cfg, meta = _fixture("tiny_bd3lm")[:2]
    # bd3lms DIT: a bidirectional model keeps adaLN whatever `model.adaln` says (the fixture says false).
    assert cfg.adaln and cfg.max_seq_len == 16 and cfg.mlp_hidden == 4 * cfg.d_model and cfg.cond_dim == 32
    assert meta["block_size"] == 4 and meta["mask_id"] == 127 and meta["prefix"] == ""
    assert (meta["clip_min"], meta["clip_max"]) == (1e-3, 1.0)
    hf = {"model_type": "bd3lm", "block_size": 16, "vocab_size": 50258, "model_length": 1024, "cross_attn": True,
          "adaln": True, "attn_backend": "flex", "causal": False, "hidden_dim": 768, "cond_dim": 128, "n_blocks": 12,
          "n_heads": 12, "dropout": 0.1, "time_conditioning": False, "var_min": True, "sampling_eps_min": 1e-3,
          "sampling_eps_max": 0.999}
    cfg, meta = dit_io.model_config(hf, "bd3lm")
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.cond_dim, cfg.vocab_size) == (768, 12, 12, 128, 50258)
    assert meta == dict(meta, prefix="backbone.", mask_id=50257, eos_id=50256, bos_id=50256, block_size=16,
                        clip_max=0.999)
    # The HF wrapper's flag is literal: no modulation, no sigma_map.
    assert not dit_io.model_config(dict(hf, adaln=False), "bd3lm")[0].adaln
    with pytest.raises(InterchangeError, match="causal=True"):
        dit_io.model_config(dict(hf, causal=True), "bd3lm")
    with pytest.raises(InterchangeError, match="block_size=5 must be a positive divisor"):
        dit_io.model_config(dict(hf, block_size=5), "bd3lm")
    with pytest.raises(InterchangeError, match="key 'n_heads' is missing"):
        dit_io.model_config({k: v for k, v in hf.items() if k != "n_heads"}, "mdlm")
    with pytest.raises(InterchangeError, match=r"--arch 'llada' is not handled"):
        dit_io.model_config(hf, "llada")


def test_to_params_names_missing_misshapen_and_unknown_tensors():
    cfg, _, _, tensors = _fixture("tiny_mdlm")
    missing = {k: v for k, v in tensors.items() if k != "blocks.1.mlp.0.bias"}
    with pytest.raises(InterchangeError, match=r"tensor 'blocks.1.mlp.0.bias' is missing \(expected shape \[512\]\)"):
        dit_io.to_params(missing.__getitem__, missing, cfg, "mdlm")
    bad = dict(tensors, **{"output_layer.linear.weight": np.zeros((128, 64), np.float32)})
    with pytest.raises(InterchangeError, match=r"tensor 'output_layer.linear.weight' has shape \[128, 64\]; "
                                               r"expected \[128, 128\]"):
        dit_io.to_params(bad.__getitem__, bad, cfg, "mdlm")
    extra = dict(tensors, **{"blocks.2.norm1.weight": np.ones(128, np.float32)})
    with pytest.raises(InterchangeError, match=r"unexpected tensor 'blocks.2.norm1.weight' with shape \[128\]"):
        dit_io.to_params(extra.__getitem__, extra, cfg, "mdlm")
    # adaln=False (HF flag) expects no modulation: a checkpoint that has it is refused, not silently truncated.
    no_adaln = ModelConfig(**dict(vars(cfg), adaln=False))
    with pytest.raises(InterchangeError, match="adaLN_modulation"):
        dit_io.to_params(tensors.__getitem__, tensors, no_adaln, "mdlm")
    theta = ModelConfig(**dict(vars(cfg), rope_theta=500000.0))
    with pytest.raises(InterchangeError, match=r"tensor 'rotary_emb.inv_freq' is not 1 / 500000"):
        dit_io.to_params(tensors.__getitem__, tensors, theta, "mdlm")


# ---------------------------------------------------------------------------------------------------------------
# The module: options, errors, cache


TINY = ModelConfig(arch="dit", vocab_size=40, d_model=32, n_layers=2, n_heads=4, mlp_hidden=64, max_seq_len=16,
                   cond_dim=16, init_std=0.3)
MASK_ID = 39


@functools.partial(jax.jit, static_argnums=(0, 1))
def _random_params(cfg: ModelConfig, seed: int = 0):
    """Every leaf random, scaled like a trained net (unit embeddings, fan-in kernels, small biases, gains near 1):
    the zero-initialised modulation and output layer would make the logits constant."""
    params = init_params(cfg, jax.random.key(seed))
    flat, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(flat))
    leaves = []
    for key, (path, x) in zip(keys, flat):
        z = jax.random.normal(key, x.shape, x.dtype)
        scale = {"embedding": 1.0, "bias": 0.1, "weight": 0.1}.get(path[-1].key, 1.0 / np.sqrt(x.shape[0]))
        leaves.append(1.0 + scale * z if path[-1].key == "weight" else scale * z)
    return jax.tree_util.tree_unflatten(tree, leaves)


@functools.cache
def _tiny_params():
    return _random_params(TINY)


def test_adaln_false_has_no_conditioning_and_remat_is_exact():
    cfg = ModelConfig(**dict(vars(TINY), adaln=False))
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    assert "sigma_map" not in params and "adaLN_modulation" not in params["blocks_0"]
    assert "adaLN_modulation" not in params["output_layer"]
    params = _random_params(cfg)
    assert set(dit_io.to_hf(params, cfg, "bd3lm")) == {e.hf_name for e in dit_io._entries(cfg, "")}
    tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, 40)
    plain = _forward(cfg, FULL, params, tokens)
    # sigma is ignored without adaLN; remat recomputes the same function.
    np.testing.assert_array_equal(plain, _forward(cfg, FULL, params, tokens, sigma=jnp.ones(2)))
    remat = ModelConfig(**dict(vars(cfg), remat=True))
    np.testing.assert_allclose(_forward(remat, FULL, params, tokens), plain, rtol=0, atol=1e-6)


def test_intermediates_and_config_errors():
    params = _tiny_params()
    tokens = jnp.zeros((1, 8), jnp.int32)
    _, state = jax.jit(lambda p: DiT(TINY).apply({"params": p}, tokens, mutable=["intermediates"]))(params)
    inter = state["intermediates"]
    assert inter["embedding"][0].shape == (1, 8, 32)
    assert [inter[f"blocks_{i}"]["hidden"][0].dtype for i in range(2)] == [jnp.float32] * 2
    assert inter["output_layer"]["final_norm"][0].shape == (1, 8, 32)
    assert isinstance(build_model(TINY), DiT)
    with pytest.raises(ConfigError, match="model.scan_layers=true is not implemented for arch dit"):
        DiT(ModelConfig(**dict(vars(TINY), scan_layers=True))).init(jax.random.key(0), tokens)
    with pytest.raises(ConfigError, match="model.n_kv_heads=2 is not allowed for arch dit"):
        DiT(ModelConfig(**dict(vars(TINY), n_kv_heads=2))).init(jax.random.key(0), tokens)
    with pytest.raises(ConfigError, match="model.tie_embeddings=true is not allowed for arch dit"):
        DiT(ModelConfig(**dict(vars(TINY), tie_embeddings=True))).init(jax.random.key(0), tokens)
    timed = ModelConfig(**dict(vars(TINY), time_conditioning=True))
    with pytest.raises(ValueError, match="time_conditioning=true: the DiT needs sigma"):
        DiT(timed).apply({"params": params}, tokens)
    with pytest.raises(ValueError, match=r"sigma must have shape \[batch\] = \[1\]"):
        DiT(TINY).apply({"params": params}, tokens, sigma=jnp.zeros((1, 1)))


def test_cached_chunks_match_the_block_causal_forward():
    """PREFILL 8 slots, COMMIT a block of 4, DENOISE the last 4 against the cache == one block-causal forward."""
    params = _tiny_params()
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 40)
    positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
    full = _forward(TINY, BlockCausal(4), params, tokens, positions)

    @jax.jit
    def cached(params):
        model = DiT(TINY)
        cache = init_cache(TINY, 2, 12)
        run = lambda s, cache, **kw: model.apply(  # noqa: E731
            {"params": params}, tokens[:, s], positions=positions[:, s], cache=cache, **kw)
        a, cache = run(slice(0, 8), cache, dense_mask=BlockCausal(4).dense(8, 8)[None], update_cache=True)
        b, cache = run(slice(8, 12), cache, update_cache=True)
        c, after = run(slice(12, 16), cache)
        return jnp.concatenate([a, b, c], axis=1), cache, after

    got, cache, after = cached(params)
    np.testing.assert_allclose(got, full, rtol=0, atol=2e-5)
    assert int(cache["index"]) == 12 and bool(cache["key_mask"].all())
    assert int(after["index"]) == 12  # DENOISE leaves the cache alone


def test_cached_block_sampling_equals_uncached_token_for_token():
    cfg = TINY
    params = _tiny_params()
    prompt = jax.random.randint(jax.random.key(4), (2, 5), 0, MASK_ID)
    # Sampled (temperature 1, the same keys on both sides) rather than greedy, so the tokens vary.
    settings = BlockSamplerSettings.bd3(max_length=16, block_length=4, steps_per_block=2, temperature=1.0,
                                    mask_id=MASK_ID)
    tokens, nfe = generate_blocks(Denoiser(cfg), params, prompt, settings, jax.random.key(5))
    twin, twin_nfe = generate_blocks_uncached(Denoiser(cfg), params, prompt, settings, jax.random.key(5))
    tokens = np.asarray(tokens)
    np.testing.assert_array_equal(tokens, np.asarray(twin))
    assert not (tokens == MASK_ID).any() and np.array_equal(tokens[:, :5], np.asarray(prompt))
    assert len(np.unique(tokens[:, 5:])) > 2  # random weights give varied tokens, not one repeated id
    # 1 prefill (the prompt's full block) + 2 steps x 3 blocks + 2 commits; the twin runs the 6 steps only.
    assert (int(nfe), int(twin_nfe)) == (9, 6)


@pytest.mark.slow  # ~25 s on 2 cores; CI runs it with the slow tests
def test_jitted_train_step_runs_with_arch_dit_for_mdlm_and_bd3():
    """One state (its init does not depend on the objective), trained one step with each objective in turn."""
    from dlmjax.config import replace
    from dlmjax.sharding import batch_sharding, make_mesh
    from dlmjax.train.loop import load_data
    from dlmjax.train.state import init_train_state, make_optimizer
    from dlmjax.train.step import as_batch, make_train_step

    cfg = load_config(None, ["model.arch=dit", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                             "model.mlp_hidden=64", "model.cond_dim=16", "model.max_seq_len=16", "data.seq_len=16",
                             "data.batch_size=4", "data.eval_size=4", "diffusion.objective=mdlm",
                             "diffusion.schedule=loglinear", "optim.warmup_steps=0", "optim.lr=1e-2"])
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.optim, 10)
    state, shardings = init_train_state(cfg.model, tx, 0, mesh)
    batch = as_batch(next(iter(load_data(cfg)[0])))
    bd3 = replace(cfg, diffusion={"objective": "bd3", "block_size": 4}).diffusion
    for diff_cfg in (cfg.diffusion, bd3):
        step = make_train_step(tx, cfg.model, diff_cfg, shardings, batch_sharding(mesh))
        before = np.asarray(state.params["output_layer"]["linear"]["kernel"])
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0, diff_cfg.objective
        assert float(metrics["grad_norm"]) > 0
        # The zero-initialised output layer is the first to move (all other gradients start at 0 through it).
        assert not np.array_equal(np.asarray(state.params["output_layer"]["linear"]["kernel"]), before)
