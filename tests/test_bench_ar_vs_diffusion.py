"""bench/ar_vs_diffusion.py: its pure summaries against hand-worked cases, and one measurement of a tiny random
model against an independent recount of the same sampler's outputs."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import compiles

BENCH = Path(__file__).resolve().parent.parent / "bench" / "ar_vs_diffusion.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ar_vs_diffusion", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def naive_frontier(points):
    keep = []
    for i, (e, s) in enumerate(points):
        beaten = False
        for j, (e2, s2) in enumerate(points):
            if j != i and e2 >= e and s2 >= s and (e2 > e or s2 > s):
                beaten = True
        keep.append(not beaten)
    return keep


def test_frontier(bench):
    pts = [(0.9, 100.0), (0.95, 50.0), (0.9, 200.0), (0.5, 400.0), (0.95, 50.0), (0.4, 300.0)]
    assert bench.frontier(pts) == [False, True, True, True, True, False]
    rng = np.random.default_rng(0)
    for _ in range(50):
        pts = [tuple(map(float, p)) for p in rng.integers(0, 4, size=(7, 2))]  # many ties
        assert bench.frontier(pts) == naive_frontier(pts)


def test_summaries(bench):
    gen = np.asarray([[5, 6, 9, 9], [5, 5, 5, 5], [9, 1, 9, 1]])
    assert bench.tokens_before_eos_per_row(gen, 9).tolist() == [2, 4, 0]
    s = bench.summarize(correct=[True, False, True, True], tokens=48, nfe_per_request=[4, 6, 5, 5], seconds=0.5,
                        rows=4)
    assert s["exact_match"] == 0.75 and s["nfe"] == 5.0 and s["tokens_per_row"] == 12.0
    assert s["tokens_per_forward"] == 2.4 and s["tokens_per_s"] == 96.0 and s["ms_per_forward"] == 25.0


def row(setting, run, batch, exact, tps, tpf=4.0):
    return {"setting": setting, "run": run, "batch": batch, "exact_match": exact, "tokens_per_s": tps,
            "tokens_per_forward": tpf}


def test_mark_and_target(bench):
    rows = [row("ar", "ar", 1, 0.98, 100.0, 0.96), row("b t=0.9", "block", 1, 0.975, 300.0),
            row("b t=0.5", "block", 1, 0.90, 900.0), row("b one", "block", 1, 0.97, 90.0, 1.0),
            row("ar", "ar", 64, 0.98, 1000.0), row("b t=0.9", "block", 64, 0.975, 2000.0)]
    bench.mark(rows)
    assert [r["frontier"] for r in rows] == [True, True, True, False, True, True]
    assert [r["speedup"] for r in rows] == [1.0, 3.0, 9.0, 0.9, 1.0, 2.0]
    t = bench.target(rows)
    # t=0.5 is faster but 8 points below AR; t=0.9 is within a point, 3x AR, 4 tokens per forward.
    assert t["best"] == "b t=0.9" and t["met"] and t["at_batch"] == {
        64: {"exact_match": 0.975, "tokens_per_s": 2000.0, "speedup": 2.0, "tokens_per_forward": 4.0}}
    rows[1]["tokens_per_forward"] = 2.9
    assert not bench.target(rows)["met"]
    rows[1]["exact_match"] = 0.96
    t = bench.target(rows)
    assert t["best"] == "b one" and not t["met"]


def test_refuses_existing_outputs(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("{}")
    assert bench.main(["--ar", "x", "--block", "y", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "exists" in err[0]
    assert out.read_text() == "{}"
    assert bench.refuse_existing([None, str(tmp_path / "new.png")]) is None


def test_settings_sweep(bench):
    settings = bench.default_settings(with_d2f=False)
    assert settings[0].run == "ar" and settings[0].decoding.rule == "one_per_step"
    assert len({s.name for s in settings}) == len(settings)
    assert {s.run for s in settings} == {"ar", "block"}
    with_d2f = bench.default_settings(with_d2f=True)
    assert sum(s.run == "d2f" for s in with_d2f) == len(bench.D2F_WINDOWS) * len(bench.D2F_SKIP_THRESHOLDS)


@pytest.mark.slow  # two sampler compiles: ~10 s on a quiet 2-core machine, 40 s on a busy one
def test_measure_counts_what_the_sampler_returns(bench):
    """A tiny random model on the sort task: `measure` at batch 1 and batch 3 against a recount of the same
    greedy calls (tokens before EOS, NFE per request, exact match), with no compile while timing."""
    import jax

    from dlmjax.config import load_config
    from dlmjax.data.tasks import get_task, heldout
    from dlmjax.inference import Run, checkpoint_text, special_tokens
    from dlmjax.models.transformer import init_params
    from dlmjax.sampling import Denoiser, generate_blocks

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "sort_bd.yaml"),
                      ["model.d_model=16", "model.n_layers=1", "model.mlp_hidden=32", "data.items=5",
                       "data.seq_len=16", "model.max_seq_len=16", "diffusion.block_size=4", "model.init_std=0.3"])
    params = init_params(cfg.model, jax.random.PRNGKey(0))
    text = checkpoint_text(cfg)
    run = Run(path=Path("tiny"), config=cfg, params=params, tokens=special_tokens(cfg, text=text), text=text)
    task = get_task("sort", items=5)
    problems = heldout(task, 4, seed=0)
    setting = bench.Setting("block", bench.BlockDecoding("threshold", 0.5))
    settings = setting.decoding.settings(16, 4, run.tokens)
    with compiles("generate_blocks") as c:
        one = bench.measure(setting, run, task, problems, batch=1, repeats=2)
    assert c.count == 1 and one["compiles_while_timing"] == 0  # one shape, compiled once, before timing
    three = bench.measure(setting, run, task, problems, batch=3, repeats=1)
    prompts = np.asarray([run.encode(p.prompt) for p in problems], np.int32)
    tokens, nfes, correct = 0, [], []
    for i in range(len(problems)):
        out, nfe = generate_blocks(Denoiser(cfg.model), params, prompts[i:i + 1], settings, jax.random.PRNGKey(0))
        gen = np.asarray(out)[0, prompts.shape[1]:].tolist()
        n = gen.index(run.tokens.eos_id) if run.tokens.eos_id in gen else len(gen)
        tokens += n
        nfes.append(int(nfe))
        correct.append(run.decode(gen[:n]).strip() == problems[i].answer)
    assert one["tokens"] == tokens and one["nfe"] == pytest.approx(np.mean(nfes), abs=1e-3)
    assert one["exact_match"] == np.mean(correct) and one["problems"] == 4 and one["requests"] == 4
    assert one["tokens_per_forward"] == pytest.approx(tokens / 4 / np.mean(nfes), abs=1e-3)
    # Batched: the padded request decodes the same rows (greedy, rows independent), counted once each.
    assert three["requests"] == 2 and three["tokens"] == tokens and three["exact_match"] == one["exact_match"]
