"""The README demo and its block-diffusion sibling end to end (slow: ~5 and ~7 minutes on 2 CPU cores): each
must reach >= 95% exact match on 500 held-out addition problems with its jitted sampler. Wall time is reported,
not asserted (speed lives in bench/); the README records the measured numbers."""
from pathlib import Path

import pytest

from dlmjax.config import load_config
from dlmjax.train.loop import train_and_evaluate

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.mark.slow
def test_demo_reaches_95_percent_exact_match(tmp_path):
    cfg = load_config(DEMO, ["train.progress=false", "train.seed=7", "data.seed=7"])
    result = train_and_evaluate(cfg, tmp_path, show_examples=3)
    print(f"demo: {result}")
    assert result["eval_problems"] == 500
    assert result["exact_match"] >= 0.95, result


@pytest.mark.slow
def test_block_diffusion_bd4_reaches_95_percent_exact_match(tmp_path):
    """configs/addition_bd4.yaml (BD3-LM, blocks of 4) on the demo's data, sampled with the KV-cache block
    sampler on the training grid, commits fused: 7 NFE per batch (3 steps in the block the prompt half fills, the
    first of them in the prompt's prefill pass, then 4 steps in the last block, the first of them also committing
    the block before)."""
    cfg = load_config(DEMO.with_name("addition_bd4.yaml"), ["train.progress=false", "train.seed=7", "data.seed=7"])
    result = train_and_evaluate(cfg, tmp_path, show_examples=3)
    print(f"addition_bd4: {result}")
    assert result["sampler"] == "block" and result["eval_problems"] == 500
    assert result["sample_nfe"] == 7, result
    assert result["exact_match"] >= 0.95, result
