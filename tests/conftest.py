"""Shared test fixtures: the tiny configs, model settings and toy denoiser the test files would otherwise each rebuild.

Plain module-level helpers (importable as `from conftest import ...`, pytest puts this folder on the path) for
values, and pytest fixtures for things that cost time to build (trained runs, converted checkpoints).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
DEMO_CONFIG = str(REPO / "configs" / "demo.yaml")
PYTHON = sys.executable

# A demo run small enough to train a few steps in seconds (1 layer, d_model 32) with every periodic output on.
TINY_RUN = ("model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.mlp_hidden=64", "data.batch_size=8",
            "data.eval_size=8", "sample.batch_size=8", "train.progress=false", "train.log_every=1")


def tiny_run_config(*extra: str, base: str | None = DEMO_CONFIG):
    """The demo config (or `base`; None for the defaults) with `TINY_RUN` and `extra` overrides applied."""
    from dlmjax.config import load_config

    return load_config(base, list(TINY_RUN) + list(extra))


def tiny_model_config(**changes):
    """A 2-layer d_model 32 LLaDA-style `ModelConfig` with peaked random predictions (init_std 0.3), so that
    token-exact comparisons of two samplers do not hinge on float ties; `changes` override fields."""
    from dlmjax.config import ModelConfig

    fields = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48, max_seq_len=32,
                  init_std=0.3)
    fields.update(changes)
    return ModelConfig(**fields)


@dataclasses.dataclass(frozen=True)
class ContextToy:
    """A hashable toy denoiser whose prediction at each slot depends on the whole sequence (no model, no cache).

    logits = tanh(E[token] + P[position] + mean of (E + P) over attended keys) @ W + b. Positions count attended
    tokens only, so a left-padded row behaves like the unpadded prompt. Its parameters: `toy_params`.
    """

    def __call__(self, params, tokens, key_mask):
        import jax.numpy as jnp

        position = jnp.clip(jnp.cumsum(key_mask, axis=1) - 1, 0)
        h = params["embed"][tokens] + params["pos"][position]  # [B, N, D]
        weight = key_mask[..., None].astype(jnp.float32)
        context = (h * weight).sum(1, keepdims=True) / jnp.maximum(weight.sum(1, keepdims=True), 1.0)
        return jnp.tanh(h + context) @ params["out"] + params["bias"]  # [B, N, V]


def toy_params(seed: int = 0, *, eos_bias: float = 0.0, vocab: int = 32, eos_id: int = 3, embed: int = 16,
               max_len: int = 64):
    """`ContextToy` parameters for a vocabulary of `vocab` logits (+1 embedding row: the mask id `vocab`)."""
    import jax.numpy as jnp

    # numpy draws: jax.random would compile a sampler per shape (and again under x64).
    rng = np.random.default_rng(seed)
    bias = np.zeros(vocab, np.float32)
    bias[eos_id] = eos_bias
    return {
        "embed": jnp.asarray(rng.standard_normal((vocab + 1, embed)), jnp.float32),
        "pos": jnp.asarray(rng.standard_normal((max_len, embed)), jnp.float32),
        "out": jnp.asarray(0.6 * rng.standard_normal((embed, vocab)), jnp.float32),
        "bias": jnp.asarray(bias),
    }


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


class CompileCount:
    """How many times jax compiled a jitted function named `name` (`compiles`)."""

    def __init__(self, name: str):
        self.name, self.count = name, 0


@contextlib.contextmanager
def compiles(name: str):
    """Counts compilations of the jitted function `name` inside the block, from `jax.log_compiles` records:
    `with compiles("generate_masked") as c: ...; c.count`. Use settings no other test uses so that the first call
    of the block must compile (jax caches programs across tests)."""
    import logging

    import jax

    count = CompileCount(name)

    class Handler(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith(f"Compiling jit({name})"):
                count.count += 1

    handler = Handler(level=logging.DEBUG)
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield count
    finally:
        logger.removeHandler(handler)


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Drops jax's compiled programs after each test file: a full run holds thousands of them otherwise, and the
    process grew until an XLA compile late in the suite died (segfault / abort) while every file passed alone."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
