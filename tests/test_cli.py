"""The `dlmjax` command line, run in-process: train -> sample -> eval on a tiny model, and its errors."""
import json
from pathlib import Path

import pytest

from dlmjax.cli import main

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.mlp_hidden=64", "train.steps=4",
        "data.batch_size=8", "data.eval_size=8", "sample.batch_size=8", "train.progress=false",
        "checkpoint.every_steps=2"]


def last_json(text):
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--config", DEMO, "--workdir", str(workdir), *TINY]) == 0
    return workdir


def test_train_prints_final_metrics_and_writes_the_workdir(run_dir, capsys):
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "checkpoints" / "4").is_dir()
    main(["eval", "--checkpoint", str(run_dir), "--show", "2"])
    out = last_json(capsys.readouterr().out)
    assert {"exact_match", "nelbo_per_token", "ppl", "eval_problems"} <= set(out)
    assert out["eval_problems"] == 8
    main(["eval", "--checkpoint", str(run_dir), "--show", "0", "data.eval_size=4"])  # overrides reach eval
    assert last_json(capsys.readouterr().out)["eval_problems"] == 4


def test_sample_text_and_json(run_dir, capsys):
    assert main(["sample", "--checkpoint", str(run_dir), "--prompt", "123+456="]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1  # one row of text (possibly empty if EOS comes first)
    assert main(["sample", "--checkpoint", str(run_dir), "--json", "--prompt-ids", "257,49,50;257,51,52",
                 "--gen-length", "4", "--steps", "2"]) == 0
    out = last_json(capsys.readouterr().out)
    assert out["nfe"] == 2
    assert [row[:3] for row in out["tokens"]] == [[257, 49, 50], [257, 51, 52]]
    assert all(len(row) == 7 and 259 not in row for row in out["tokens"])


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", DEMO, "train.stepz=1"], "unknown key train.stepz"),
    (["train", "--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["sample", "--checkpoint", "/nonexistent/run", "--prompt", "1+1="], "does not exist"),
])
def test_errors_are_reported_without_a_traceback(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_sample_rejects_prompts_longer_than_the_context(run_dir, capsys):
    with pytest.raises(SystemExit, match="exceeds the model's context"):
        main(["sample", "--checkpoint", str(run_dir), "--prompt", "1" * 20, "--gen-length", "4"])
