"""Shared test fixtures: the tiny configs and model settings the test files would otherwise each rebuild.

Plain module-level helpers (importable as `from conftest import ...`, pytest puts this folder on the path) for
values, and pytest fixtures for things that cost time to build (trained runs, converted checkpoints).
"""
from __future__ import annotations

import sys
from pathlib import Path

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


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN
