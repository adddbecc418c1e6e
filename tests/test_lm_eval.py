"""The lm-evaluation-harness model (`dlmjax.lm_eval`), held against independent references:

- the golden log-likelihoods and greedy checks of LLaDA's own `eval_llada.py` on `tests/golden/tiny_llada_chat`,
  through lm-eval itself (its task loading, request building, metrics and sample log);
- `_encode_pair` against a plain re-implementation of LLaDA's with `transformers`' tokenizer;
- generations against one-row calls of the sampler front door, with closed-form generation plans;
- the collectives in a real 2-process job.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, REPO, compiles, tiny_run_config
from lm_eval.api.instance import Instance

from dlmjax.errors import DlmjaxError, SettingsError
from dlmjax.lm_eval import (DlmjaxLM, ModelArgs, encode_pair, gather_objects, plan_generation, scores)

GOLDEN = REPO / "tests" / "golden" / "tiny_llada_chat"
LOGLIK = json.loads((GOLDEN / "golden_loglik.json").read_text())
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from dlmjax.interchange import convert_from_hf

    out = tmp_path_factory.mktemp("lm_eval") / "ckpt"
    convert_from_hf(GOLDEN, "llada", out)
    return out


@pytest.fixture(scope="module")
def lm(checkpoint) -> DlmjaxLM:
    return DlmjaxLM(str(checkpoint), batch_size=2, mc_num=2, gen_length=8, steps=8, block_length=4, temperature=0)


def _offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    import datasets.config  # read at import time: set it directly too (another test may have imported it)

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


# ---------------------------------------------------------------------------------------------------------------
# 1. LLaDA's golden log-likelihoods, through lm-eval


def test_golden_multiple_choice_through_lm_eval(checkpoint, lm, monkeypatch):
    """The golden MC task run by lm-eval (the model by its registered name, model args and batch size as strings,
    as lm-eval's command line hands them over): each request's log-likelihood equals LLaDA's eval_llada.py within
    1e-4, is_greedy equals it, and so does acc. One-token answers: the estimate is exact for any mc_num."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    _offline(monkeypatch)
    monkeypatch.chdir(GOLDEN / "tasks")  # the task's data_files path is relative to the working directory
    manager = TaskManager(include_path=str(GOLDEN / "tasks"), include_defaults=False)
    results = lm_eval.simple_evaluate(model="dlmjax", model_args=f"checkpoint={checkpoint},mc_num=4",
                                      batch_size="2", tasks=["dlmjax_shared_mc"], task_manager=manager,
                                      log_samples=True, bootstrap_iters=0)
    (sample,) = results["samples"]["dlmjax_shared_mc"]
    golden = sorted(LOGLIK["single_token"], key=lambda g: g["choice"])
    assert [tuple(a) for a in sample["arguments"]] == [(g["context"], g["continuation"]) for g in golden]
    for (resp,), g in zip(sample["resps"], golden):
        loglik, greedy = resp
        assert abs(loglik - g["loglik"]) < 1e-4, (g["continuation"], loglik, g["loglik"])
        assert greedy == g["is_greedy"]
    assert results["results"]["dlmjax_shared_mc"]["acc,none"] == LOGLIK["tasks"]["dlmjax_shared_mc"]["expected_acc"]
    assert scores(results) == {"dlmjax_shared_mc": {"sample_len": 1, "acc,none": 0.0}}
    # ... and the ids the golden requests were scored with are LLaDA's `_encode_pair`.
    for g in golden:
        assert lm.encode_pair(g["context"], g["continuation"]) == (g["context_ids"], g["continuation_ids"])


# ---------------------------------------------------------------------------------------------------------------
# 2. _encode_pair


def llada_encode_pair(tokenizer, context: str, continuation: str):
    """LLaDA's `_encode_pair`, written out plainly with a `transformers` tokenizer."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    return context_ids, whole[len(context_ids):]


EDGE_CASES = [
    ("Question: What can you do with the work?\nAnswer:", " copy"),
    ("Answer: ", "copy"),  # the trailing space moves to the continuation
    ("Answer:  \n ", "copy that"),  # several trailing spaces, a newline among them
    ("", " hello"),  # empty context
    ("", "hello"),
    ("   ", "x"),  # a context of spaces only
    ("The cat", "s sat"),  # a word split across the boundary: tokens may straddle it
    ("hello", ""),  # empty continuation
]


@pytest.mark.parametrize("context, continuation", EDGE_CASES)
def test_encode_pair_is_lladas(lm, context, continuation):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(GOLDEN))
    assert lm.encode_pair(context, continuation) == llada_encode_pair(tokenizer, context, continuation)


def test_encode_pair_with_a_bos_tokenizer():
    """A run trained here frames text with BOS: both encodings start with it and the continuation is the tail."""
    def encode(text):
        return [1] + list(text.encode())

    assert encode_pair(encode, "ab ", "c") == ([1, 97, 98], [32, 99])
    assert encode_pair(encode, "", "c") == ([1], [99])


def test_an_empty_continuation_scores_log_one_without_the_model(lm):
    assert lm.loglikelihood([Instance("loglikelihood", {}, ("hello", ""), 0)], disable_tqdm=True) == [(0.0, True)]


def test_rolling_rows_are_framed_with_the_bos(lm, monkeypatch):
    """loglikelihood_rolling hands `dlmjax.rolling` the text without a BOS and the checkpoint's BOS to frame each
    row (as training rows are framed), with `rolling_samples` noise draws; an empty text scores log 1."""
    import dataclasses

    import jax

    from dlmjax.rolling import rolling_log_likelihoods

    monkeypatch.setattr(lm, "args", dataclasses.replace(lm.args, rolling_samples=8))  # one draw may mask nothing
    short = dataclasses.replace(lm.run.config, data=dataclasses.replace(lm.run.config.data, seq_len=32))
    monkeypatch.setattr(lm, "run", dataclasses.replace(lm.run, config=short))  # rows of 32 tokens, not 1024
    texts = ["Question: What can you do with the work?", ""]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0) for t in texts],
                                   disable_tqdm=True)
    run = lm.run
    assert run.config.data.seq_len == 32 and run.tokens.bos_id == 480
    assert run.encode(texts[0])[0] != 480  # LLaDA's tokenizer adds no BOS: the rows get it from bos_id
    direct = rolling_log_likelihoods(run.config, run.params, [run.encode(texts[0])], rng=jax.random.PRNGKey(0),
                                     samples=8, batch_size=2, bos_id=480)
    assert got[1] == 0.0 and got[0] == pytest.approx(float(direct[0]), abs=1e-6) and got[0] < 0


# ---------------------------------------------------------------------------------------------------------------
# 3. generate_until


def plan_fields(plan):
    r = plan.request
    return r.gen_length, r.steps, r.block_length, plan.keep


def test_generation_plans_in_closed_form():
    demo = tiny_run_config()  # data.seq_len 16, sample.steps 7, no sample.gen_length / block_length
    args = ModelArgs(checkpoint="c", gen_length=8, block_length=4, steps=8)
    assert plan_fields(plan_generation(demo, args, 5, 8)) == (8, 8, 4, 8)  # the cap does not bind
    assert plan_fields(plan_generation(demo, args, 5, 3)) == (4, 4, 4, 3)  # one block of 4, 4 steps per block
    assert plan_fields(plan_generation(demo, args, 5, 5)) == (8, 8, 4, 5)  # two blocks still
    one_block = ModelArgs(checkpoint="c", gen_length=8, steps=4)
    assert plan_fields(plan_generation(demo, one_block, 5, 3)) == (3, 2, None, 3)  # ceil(4 * 3 / 8) steps
    # The run's defaults: the rest of the training row (16 - 9 = 7 slots), sample.steps = 7.
    assert plan_fields(plan_generation(demo, ModelArgs(checkpoint="c"), 9, 256)) == (7, None, None, 7)
    assert plan_fields(plan_generation(demo, ModelArgs(checkpoint="c"), 9, 4)) == (4, 4, None, 4)
    # The block sampler: up to the first block boundary past prompt + cap.
    bd3 = tiny_run_config("diffusion.objective=bd3", "diffusion.block_size=4", "diffusion.schedule=linear")
    assert plan_fields(plan_generation(bd3, ModelArgs(checkpoint="c"), 9, 4)) == (7, None, None, 4)
    assert plan_fields(plan_generation(bd3, ModelArgs(checkpoint="c"), 8, 4)) == (4, None, None, 4)
    with pytest.raises(SettingsError, match="model arg steps=3"):
        plan_generation(bd3, ModelArgs(checkpoint="c", steps=3), 8, 4)


def _request(context, **gen_kwargs):
    return Instance("generate_until", {}, (context, gen_kwargs), 0)


def test_generate_until_respects_max_gen_toks_and_stop_strings_and_compiles_once(lm):
    """Batched generations equal one-row calls of the sampler front door with the plan's settings (8 slots in two
    blocks of 4, 8 steps; max_gen_toks=3 makes one block of 4 slots and 4 steps), cut to max_gen_toks tokens, at
    EOS / end-of-turn and before the first stop string; a second call of the same shapes compiles nothing."""
    from dlmjax.inference import SampleRequest, sample_generation

    run = lm.run
    prompts = ["Question: What can you do?\nAnswer:", "Hello there", "Say it"]  # one width bucket (16)
    caps = [8, 3, 8]
    with compiles("generate_masked") as counter:
        first = lm.generate_ids([_request(p, until=[], max_gen_toks=c) for p, c in zip(prompts, caps)],
                                disable_tqdm=True)
        compiled = counter.count
        text0 = first[0][0]
        stop = text0[2:4]  # a stop string the first generation holds
        again = lm.generate_ids([_request("Question: What can you do?\nAnswer:", until=[stop], max_gen_toks=8),
                                 _request("Hi there", until=["\n"], max_gen_toks=3),
                                 _request("Say that", max_gen_toks=8, do_sample=False)], disable_tqdm=True)
        recompiled = counter.count - compiled
    assert compiled <= 2 and recompiled == 0  # one program per plan (8 slots, 4 slots); none again
    for prompt, cap, (text, ids) in zip(prompts, caps, first):
        gen, steps = (8, 8) if cap == 8 else (4, 4)
        alone = sample_generation(run, [run.encode(prompt)], SampleRequest(gen_length=gen, steps=steps,
                                                                           block_length=4, temperature=0.0))
        expected = alone.generated()[0][:cap]
        assert ids == expected and len(ids) <= cap
        assert text == run.generated_text(expected)
    assert len(stop) == 2 and stop in text0
    assert again[0][0] == text0[:text0.find(stop)]
    assert lm.totals.calls >= 2 and lm.totals.nfe > 0 and lm.totals.requests >= 6


def test_an_end_of_turn_token_cuts_the_text(lm):
    ids = [304, 338, 493, 371]  # " in", " copy", <|eot_id|>, " on"
    assert lm.run.generated_text(ids) == lm.run.decode(ids[:2])


# ---------------------------------------------------------------------------------------------------------------
# 4. Bad model args: one line naming the arg, before the checkpoint is read


@pytest.mark.parametrize("args, batch_size, named", [
    ("mc_num=100", "32", ["mc_num=100", "batch_size=32", "multiple"]),
    ("mc_num=8", "auto", ["batch_size='auto'", "number"]),
    ("mc_num=0", "1", ["mc_num=0"]),
    ("cfg_scale=-1", "1", ["cfg_scale=-1"]),
    ("threshold=1.5", "1", ["threshold=1.5", "(0, 1]"]),
    ("cache=full", "1", ["cache='full'", "dual"]),
    ("is_check_greedy=maybe", "1", ["is_check_greedy='maybe'"]),
    ("dtype=float16", "1", ["dtype='float16'", "bfloat16"]),
    ("remasking=best", "1", ["remasking='best'", "low_confidence"]),
    ("colour=red", "1", ["colour", "unknown", "mc_num"]),
])
def test_bad_model_args_are_one_line_naming_the_arg(args, batch_size, named):
    from lm_eval.api.registry import get_model

    with pytest.raises(DlmjaxError) as e:
        get_model("dlmjax").create_from_arg_string(f"checkpoint=/nonexistent/ckpt,{args}",
                                                   {"batch_size": batch_size, "device": "cuda:0"})
    message = str(e.value)
    assert "\n" not in message and "nonexistent" not in message
    for word in named:
        assert word in message


def test_a_checkpoint_is_required():
    with pytest.raises(SettingsError, match="model arg checkpoint is required"):
        DlmjaxLM(mc_num=4)


def test_the_command_line_refuses_bad_flags_in_one_line(capsys, tmp_path):
    from dlmjax.cli import main

    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    cases = [
        (["--lm-eval", "dlmjax_addition_mc", "--output", str(taken)], f"{taken} exists"),
        (["--lm-eval", "dlmjax_addition_mc", "--include-path", str(tmp_path / "nowhere")], "does not exist"),
        (["--lm-eval", "dlmjax_addition_mc", "--mc-num", "100", "--batch-size", "32"], "--mc-num=100 is not a multiple "
         "of --batch-size=32"),
        (["--mc-num", "8"], "argument --mc-num: applies to --lm-eval"),
        (["--lm-eval", "dlmjax_addition_mc", "sample.steps=2"], "takes no section.key=value overrides"),
        (["--lm-eval", "dlmjax_addition_mc", "--log-samples"], "give --output"),
        (["--lm-eval", "dlmjax_addition_mc", "--limit", "2.5"], "whole number"),
        (["--lm-eval", "dlmjax_addition_mc", "--threshold", "0"], "argument --threshold"),
        (["--lm-eval", ",", "--mc-num", "8"], "names no task"),
    ]
    for flags, words in cases:
        assert main(["eval", "--checkpoint", "/nonexistent/ckpt", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, (flags, err)


def test_world_size_needs_torch_for_lm_evals_multiprocess_path(monkeypatch):
    """rank / world size are JAX's; lm-eval's data-parallel path imports torch, so without it a multi-process job
    is refused before the checkpoint is read."""
    import jax

    import dlmjax.lm_eval as module

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(module, "_torch_installed", lambda: False)
    with pytest.raises(SettingsError) as e:
        DlmjaxLM("/nonexistent/ckpt")
    assert "2 processes" in str(e.value) and "torch" in str(e.value) and "\n" not in str(e.value)


def test_rank_and_world_size_come_from_jax(lm, monkeypatch):
    import jax

    import dlmjax.inference
    import dlmjax.lm_eval as module

    monkeypatch.setattr(jax, "process_index", lambda: 2)
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    monkeypatch.setattr(module, "_torch_installed", lambda: True)
    monkeypatch.setattr(dlmjax.inference, "open_run", lambda *a, **k: lm.run)  # the third of three hosts
    third = DlmjaxLM(str(lm.run.path))
    assert (lm.rank, lm.world_size) == (0, 1) and (third.rank, third.world_size) == (2, 3)


# ---------------------------------------------------------------------------------------------------------------
# Collectives


def test_gather_objects_unpickles_what_each_process_sent():
    """One process: the objects are gathered through `process_allgather` itself; three simulated processes: a
    fake allgather stacks the arrays each would send (their byte lengths differ, so padding is exercised)."""
    obj = {"rank": 0, "samples": [("a", 1.5)] * 3}
    assert gather_objects(obj) == [obj]
    sent = [{"rank": r, "data": list(range(r * 5))} for r in range(3)]
    calls = []

    def fake_allgather(value):  # process 1's view of the two collective calls
        import pickle

        arrays = [np.frombuffer(pickle.dumps(s), np.uint8) for s in sent]
        calls.append(value.shape)
        if len(calls) == 1:
            return np.array([a.size for a in arrays])
        width = max(a.size for a in arrays)
        assert value.shape == (width,)
        return np.stack([np.pad(a, (0, width - a.size)) for a in arrays])

    assert gather_objects(sent[1], index=1, dst=1, allgather=fake_allgather) == sent
    calls.clear()
    assert gather_objects(sent[1], index=1, dst=0, allgather=fake_allgather) is None


TWO_PROCESS_SCRIPT = """
import json, sys
import numpy as np
from dlmjax.distributed import maybe_initialize
maybe_initialize()
import jax
from dlmjax.lm_eval import all_gather_array, barrier, gather_objects
rank = jax.process_index()
gathered = all_gather_array(np.int64(5 + rank)).tolist()
objects = gather_objects({"rank": rank, "pad": "x" * (10 * rank)})
barrier()
print("RESULT " + json.dumps({"rank": rank, "count": jax.process_count(), "gathered": gathered,
                              "objects": objects}))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_collectives_in_a_real_two_process_job():
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "DLMJAX_COORDINATOR": f"127.0.0.1:{port}", "DLMJAX_NUM_PROCESSES": "2",
               "DLMJAX_PROCESS_ID": str(rank), "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([PYTHON, "-c", TWO_PROCESS_SCRIPT], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    for rank, out in enumerate(outs):
        assert out["rank"] == rank and out["count"] == 2 and out["gathered"] == [5, 6]
    assert outs[0]["objects"] == [{"rank": 0, "pad": ""}, {"rank": 1, "pad": "x" * 10}]
    assert outs[1]["objects"] is None


# ---------------------------------------------------------------------------------------------------------------
# 5. End to end


def test_python_dash_m_finds_the_real_lm_eval():
    """`python -m dlmjax.lm_eval --help` is lm-eval's own command line (the module does not shadow the package)."""
    run = subprocess.run([PYTHON, "-m", "dlmjax.lm_eval", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Language Model Evaluation Harness" in run.stdout


@pytest.mark.slow
def test_python_dash_m_on_the_golden_task(checkpoint, tmp_path):
    """lm-eval's command line, unchanged, with the model registered: the logged requests are the goldens."""
    out = tmp_path / "out"
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(REPO)}
    run = subprocess.run([PYTHON, "-m", "dlmjax.lm_eval", "--model", "dlmjax", "--model_args",
                          f"checkpoint={checkpoint},mc_num=2", "--batch_size", "2", "--tasks", "dlmjax_shared_mc",
                          "--include_path", ".", "--log_samples", "--output_path", str(out)],
                         cwd=GOLDEN / "tasks", env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "dlmjax_shared_mc" in run.stdout and "acc" in run.stdout
    (samples,) = out.rglob("samples_dlmjax_shared_mc_*.jsonl")
    (sample,) = [json.loads(line) for line in samples.read_text().splitlines()]
    golden = sorted(LOGLIK["single_token"], key=lambda g: g["choice"])
    for (resp,), g in zip(sample["resps"], golden):
        assert abs(float(resp[0]) - g["loglik"]) < 1e-4 and (resp[1] == "True") == g["is_greedy"]
    bad = subprocess.run([PYTHON, "-m", "dlmjax.lm_eval", "--model", "dlmjax", "--model_args",
                          f"checkpoint={checkpoint},mc_num=3", "--batch_size", "2", "--tasks", "dlmjax_shared_mc",
                          "--include_path", "."], cwd=GOLDEN / "tasks", env=env, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("dlmjax.lm_eval: error: model "
                                                                                  "arg mc_num=3")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A random demo-layout run (byte tokenizer, 16-token rows), saved as a params export."""
    import jax

    from dlmjax.checkpoint import save_params
    from dlmjax.models.transformer import init_params

    cfg = tiny_run_config()
    out = tmp_path_factory.mktemp("tiny_run") / "export"
    save_params(out, cfg, init_params(cfg.model, jax.random.PRNGKey(0)))
    return out


@pytest.mark.slow
def test_dlmjax_eval_runs_the_shipped_tasks_offline(tiny_run, tmp_path, monkeypatch, capsys):
    """`dlmjax eval --lm-eval` on the shipped tasks, offline, from another directory: lm-eval's table, one JSON line
    of scores, the results file; answers of at most max_gen_toks (7) byte tokens, and acc recomputed from the logged
    log-likelihoods."""
    from dlmjax.cli import main

    _offline(monkeypatch)
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "results.json"
    status = main(["eval", "--checkpoint", str(tiny_run), "--lm-eval", "dlmjax_addition_mc,dlmjax_addition",
                   "--limit", "6", "--batch-size", "4", "--mc-num", "8", "--no-greedy-check", "--output",
                   str(output), "--log-samples"])
    out = capsys.readouterr().out.strip().splitlines()
    assert status == 0
    line = json.loads(out[-1])
    assert set(line) == {"dlmjax_addition_mc", "dlmjax_addition"}
    assert "|dlmjax_addition_mc" in "\n".join(out[:-1]).replace(" ", "")
    results = json.loads(output.read_text())
    mc = results["samples"]["dlmjax_addition_mc"]
    assert len(mc) == 6
    picks = [int(np.argmax([float(r[0][0]) for r in s["resps"]])) == s["target"] for s in mc]
    assert line["dlmjax_addition_mc"]["acc,none"] == pytest.approx(np.mean(picks))
    generated = results["samples"]["dlmjax_addition"]
    assert len(generated) == 6 and all(len(s["resps"][0][0]) <= 7 for s in generated)
    assert 0.0 <= line["dlmjax_addition"]["exact_match,none"] <= 1.0


def test_an_autoregressive_run_is_scored_exactly_with_its_own_attention(tmp_path):
    """A bd3 run with block size 1 answers loglikelihood requests with its exact next-token log-probabilities
    (summed over the continuation), not with LLaDA's full-attention estimator; greedy = the argmax chain."""
    import jax
    from lm_eval.api.instance import Instance

    from dlmjax.checkpoint import save_params
    from dlmjax.models.transformer import init_params
    from dlmjax.rolling import ar_token_log_probs

    cfg = tiny_run_config("diffusion.objective=bd3", "diffusion.block_size=1", "diffusion.clip_min=1.0",
                          "diffusion.clip_max=1.0", "model.init_std=0.3")
    params = init_params(cfg.model, jax.random.PRNGKey(1))
    save_params(tmp_path / "ar", cfg, params)
    model = DlmjaxLM(str(tmp_path / "ar"), batch_size=2, mc_num=2)
    requests = [Instance("loglikelihood", {}, ("12+34=", "0046"), 0), Instance("loglikelihood", {}, ("5+", "5"), 1)]
    got = model.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (loglik, greedy) in zip([r.args for r in requests], got):
        ctx, cont = model.encode_pair(context, continuation)
        row = np.array([ctx + cont], np.int32)
        logp = np.asarray(ar_token_log_probs(cfg, params, row, np.ones_like(row, bool)))[0]
        np.testing.assert_allclose(loglik, logp[len(ctx):].sum(), rtol=1e-5)
        assert isinstance(greedy, bool)
