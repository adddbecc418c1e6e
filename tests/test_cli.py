"""The `dlmjax` command line, run in-process: train -> sample -> eval on a tiny model, and its errors."""
import json
import re
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
    assert main(["sample", "--checkpoint", str(run_dir), "--prompt", "1" * 20, "--gen-length", "4"]) == 2
    assert "exceeds the model's context model.max_seq_len=16" in capsys.readouterr().err


def test_sample_rows_of_different_lengths(run_dir, capsys):
    """Unequal --prompt-ids rows are left-padded with a key mask: each row comes back as prompt + generation,
    equal to the row sampled alone."""
    common = ["sample", "--checkpoint", str(run_dir), "--json", "--gen-length", "4", "--steps", "4"]
    assert main([*common, "--prompt-ids", "257,49,50,43;257,51"]) == 0
    batch = last_json(capsys.readouterr().out)["tokens"]
    assert [len(row) for row in batch] == [8, 6] and batch[1][:2] == [257, 51]
    assert main([*common, "--prompt-ids", "257,51"]) == 0
    assert last_json(capsys.readouterr().out)["tokens"] == [batch[1]]


@pytest.fixture(scope="module")
def bd3_run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cli") / "bd4"
    config = str(Path(DEMO).with_name("addition_bd4.yaml"))
    assert main(["train", "--config", config, "--workdir", str(workdir), *TINY]) == 0
    return workdir


def test_block_diffusion_run_samples_with_the_block_sampler(bd3_run_dir, capsys):
    main(["eval", "--checkpoint", str(bd3_run_dir), "--show", "0"])
    out = last_json(capsys.readouterr().out)
    assert out["sampler"] == "block" and out["eval_problems"] == 8
    # 9-token prompts on a 16-slot row with blocks of 4: the prompt ends inside block 2, so the row takes
    # 3 + 4 steps unless EOS stops it, plus the prefill and the commit of block 2.
    assert main(["sample", "--checkpoint", str(bd3_run_dir), "--json", "--prompt-ids",
                 "257,49,50,51,43,52,53,54,61;257,49,43,50,61"]) == 0
    out = last_json(capsys.readouterr().out)
    assert [len(row) for row in out["tokens"]] == [16, 16]
    assert out["tokens"][1][:5] == [257, 49, 43, 50, 61] and all(259 not in row for row in out["tokens"])
    assert main(["sample", "--checkpoint", str(bd3_run_dir), "--prompt-ids", "257,49", "--gen-length", "5"]) == 2
    assert "is not a multiple of the block length 4" in capsys.readouterr().err
    for flags in (["--cfg-scale", "1"], ["--cache", "dual"], ["--alg", "entropy"]):
        assert main(["sample", "--checkpoint", str(bd3_run_dir), "--prompt-ids", "257,49", *flags]) == 2
        err = capsys.readouterr().err
        assert re.search(f"{flags[0]}.*belong to the masked sampler", err) and len(err.strip().splitlines()) == 1
    # The parallel rules work in the block sampler too.
    assert main(["sample", "--checkpoint", str(bd3_run_dir), "--prompt-ids", "257,49", "--threshold", "0.9"]) == 0
