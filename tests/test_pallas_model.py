"""The model with `model.attention_impl=pallas_interpret`: the Pallas kernels (Triton kernel in interpret mode on
CPU) inside the transformer give the dense XLA path's logits, gradients, training losses and samples."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlmjax
from dlmjax.config import ModelConfig
from kernels_pallas.masks import Bd3Training, BlockCausal, Full
from dlmjax.models.transformer import Transformer, init_params
from dlmjax.sampling import BlockSamplerSettings, Denoiser, SamplerSettings, generate_blocks_uncached

MODEL = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=64, max_seq_len=64)
KERNEL = dataclasses.replace(MODEL, attention_impl="pallas_interpret")


@pytest.fixture(scope="module")
def params():
    return init_params(MODEL, jax.random.PRNGKey(0))


@pytest.mark.parametrize("mask, length", [(Full(), 24), (BlockCausal(4), 24), (Bd3Training(12, 4), 24)],
                         ids=["full", "block_causal", "bd3"])
def test_kernel_logits_and_gradients_equal_the_dense_path(params, mask, length):
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 39, (2, length)), jnp.int32)
    key_mask = jnp.ones((2, length), bool).at[1, :5].set(False)  # left padding in row 1
    positions = jnp.broadcast_to(jnp.arange(length) % 12 if isinstance(mask, Bd3Training) else
                                 jnp.arange(length), (2, length))

    def loss(p, config):
        logits = Transformer(config, mask).apply({"params": p}, tokens, key_mask=key_mask, positions=positions)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * key_mask), logits

    (dense_loss, dense), dense_grad = jax.jit(jax.value_and_grad(lambda p: loss(p, MODEL), has_aux=True))(params)
    (kern_loss, kern), kern_grad = jax.jit(jax.value_and_grad(lambda p: loss(p, KERNEL), has_aux=True))(params)
    # Padding queries (row 1, first 5 slots) see no key: the kernel returns 0 there, the dense path a mean.
    np.testing.assert_allclose(np.asarray(kern)[0], np.asarray(dense)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(kern)[1, 5:], np.asarray(dense)[1, 5:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(kern_loss), float(dense_loss), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(kern_grad), jax.tree_util.tree_leaves(dense_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # ~25 s on 2 cores; CI runs it with the slow tests
def test_training_with_kernels_matches_the_dense_path(tmp_path):
    from dlmjax.train.loop import train_and_evaluate

    overrides = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.mlp_hidden=64", "train.steps=3",
                 "train.log_every=1", "data.batch_size=8", "data.eval_size=8", "sample.batch_size=8",
                 "train.progress=false", "checkpoint.every_steps=3"]
    losses = {}
    for impl in ("xla", "pallas_interpret"):
        cfg = dlmjax.load_config("configs/demo.yaml", overrides + [f"model.attention_impl={impl}"])
        train_and_evaluate(cfg, tmp_path / impl, log=lambda s: None)
        records = [line for line in (tmp_path / impl / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        losses[impl] = [float(__import__("json").loads(r)["loss"]) for r in records]
    assert len(losses["xla"]) == 3
    np.testing.assert_allclose(losses["pallas_interpret"], losses["xla"], rtol=1e-5)


def test_sampling_with_kernels_matches_the_dense_path(params):
    prompts = [[5, 9, 11], [7, 8, 20, 21, 22]]
    base = dict(gen_length=8, steps=8, block_length=4, mask_id=39)
    dense = dlmjax.generate(MODEL, params, prompts, SamplerSettings.llada(**base))
    kern = dlmjax.generate(KERNEL, params, prompts, SamplerSettings.llada(**base))
    assert kern.rows() == dense.rows()
    settings = BlockSamplerSettings.bd3(max_length=16, block_length=4, mask_id=39)
    prompt = jnp.asarray([[5, 9, 11, 13, 2]], jnp.int32)
    a, _ = generate_blocks_uncached(Denoiser(MODEL), params, prompt, settings, jax.random.PRNGKey(0))
    b, _ = generate_blocks_uncached(Denoiser(KERNEL), params, prompt, settings, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
