"""The README demo end to end (slow: ~5 minutes on 2 CPU cores): configs/demo.yaml must reach >= 95% exact
match on 500 held-out addition problems with the jitted sampler. Wall time is reported, not asserted
(speed lives in bench/); the README records the measured numbers."""
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
