"""dlmjax's lm-eval tasks (`dlmjax.lm_eval_tasks`): lm-eval 0.4.13 loads them offline from another working
directory, their documents are dlmjax's held-out problems, the multiple-choice file is what its generator writes
and holds one true sum per document, and lm-eval scores them as `Task.score` does (checked with oracle models
that solve the problems from the prompt alone)."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess

import numpy as np
import pytest
from conftest import PYTHON, REPO
from lm_eval.api.model import LM

from dlmjax.data.tasks import Problem, all_sudoku_grids, get_task, heldout
from dlmjax.errors import InputError
from dlmjax.lm_eval_tasks import TAG, TASK_NAMES, TASKS_DIR, addition_mc, docs

GENERATE = {"dlmjax_addition": ("addition", {"digits": 3, "pad_answer": True}, 100),
            "dlmjax_sudoku": ("sudoku", {}, 100)}
# The run config each generate task is written for: a request may fill the slots after the prompt in its rows.
ROW_CONFIGS = {"dlmjax_addition": "demo.yaml", "dlmjax_sudoku": "sudoku.yaml"}

# Loads the tag the way `lm_eval --include_path` does (lm-eval's own tasks indexed too, so a name clash would
# show), with the Hub and datasets offline, and prints each task's documents and first requests.
LOAD_SCRIPT = """
import json
import lm_eval.tasks
from dlmjax.lm_eval_tasks import TASKS_DIR
manager = lm_eval.tasks.TaskManager(include_path=str(TASKS_DIR))
loaded = manager.load([{tag!r}])["tasks"]
out = {{}}
for name, task in loaded.items():
    task.build_all_requests(limit=2, rank=0, world_size=1)
    out[name] = {{"output_type": task.OUTPUT_TYPE, "docs": list(task.test_docs()),
                 "requests": [[i.request_type, list(i.arguments)] for i in task.instances]}}
print("RESULT " + json.dumps(out))
"""


def true_sum(prompt: str) -> str:
    """The demo layout's answer computed from the prompt alone: "558+143=" -> "0701"."""
    a, b = prompt.rstrip("=").split("+")
    return str(int(a) + int(b)).zfill(4)


def sudoku_solution(prompt: str) -> str:
    """The one 4x4 grid that agrees with every clue of the prompt (".2..=" style)."""
    clues = prompt.rstrip("=")
    fits = [g for g in all_sudoku_grids() if all(c == "." or int(c) == v for c, v in zip(clues, g))]
    assert len(fits) == 1
    return "".join(map(str, fits[0]))


@pytest.fixture(scope="module")
def offline_load(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("elsewhere")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([PYTHON, "-c", LOAD_SCRIPT.format(tag=TAG)], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    import lm_eval.tasks

    return lm_eval.tasks.TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


@pytest.fixture(scope="module")
def tasks(manager, tmp_path_factory):
    with contextlib.chdir(tmp_path_factory.mktemp("cwd")):
        return manager.load(list(TASK_NAMES))["tasks"]


# ---------------------------------------------------------------------------------------------------------------
# Loading and documents


def test_the_tag_loads_every_task_offline_from_another_directory(offline_load):
    assert sorted(offline_load) == sorted(TASK_NAMES)
    assert offline_load["dlmjax_addition_mc"]["output_type"] == "multiple_choice"
    for name, (task_name, task_args, n) in GENERATE.items():
        got = offline_load[name]
        assert got["output_type"] == "generate_until"
        expected = heldout(get_task(task_name, **task_args), n, 0)
        assert [(d["prompt"], d["answer"]) for d in got["docs"]] == [(p.prompt, p.answer) for p in expected]
        from dlmjax.config import load_config

        rows = load_config(str(REPO / "configs" / ROW_CONFIGS[name])).data.seq_len
        budget = rows - 1 - get_task(task_name, **task_args).prompt_len  # all of a training row after BOS + prompt
        assert got["requests"][0] == ["generate_until", [expected[0].prompt,
                                                          {"until": ["\n"], "do_sample": False,
                                                           "max_gen_toks": budget}]]
    mc = offline_load["dlmjax_addition_mc"]
    # One loglikelihood request per choice: the prompt, then the choice with no delimiter.
    first = mc["docs"][0]
    assert mc["requests"][:4] == [["loglikelihood", [first["prompt"], c]] for c in first["choices"]]


def test_addition_docs_are_the_demo_layout():
    # Held-out problems are chosen by prompt, so the padded and unpadded tasks hold the same prompts.
    padded = heldout(get_task("addition", pad_answer=True), 100, 0)
    plain = heldout(get_task("addition"), 100, 0)
    assert [p.prompt for p in padded] == [p.prompt for p in plain]
    assert all(p.answer == true_sum(p.prompt) for p in padded)
    assert any(p.answer.startswith("0") for p in padded)


def test_sudoku_docs_are_solved_puzzles(tasks):
    for doc in tasks["dlmjax_sudoku"].test_docs():
        assert doc["answer"] == sudoku_solution(doc["prompt"])


def test_mc_file_is_what_its_generator_writes():
    text = (TASKS_DIR / "addition_mc.jsonl").read_text()
    assert text == "".join(json.dumps(d) + "\n" for d in addition_mc.build_docs())


def test_mc_docs_hold_the_true_sum_once_among_four_near_misses(tasks):
    mc_docs = list(tasks["dlmjax_addition_mc"].test_docs())
    problems = heldout(get_task("addition", pad_answer=True), 100, 0)
    assert [d["prompt"] for d in mc_docs] == [p.prompt for p in problems]
    for doc in mc_docs:
        choices, answer = doc["choices"], true_sum(doc["prompt"])
        assert len(choices) == 4 and len(set(choices)) == 4
        assert [c == answer for c in choices].count(True) == 1 and choices[doc["label"]] == answer
        assert all(len(c) == len(answer) and c.isdigit() for c in choices)
        # Each wrong choice is a dropped carry (off by a power of ten) or one digit off by one.
        for c in choices:
            if c != answer:
                diff = abs(int(c) - int(answer))
                off_by_one_digit = sum(x != y for x, y in zip(c, answer)) == 1 and diff in (1, 10, 100, 1000)
                assert off_by_one_digit or (int(c) < int(answer) and diff in (10, 100, 1000)), (doc, c)
    assert len({d["label"] for d in mc_docs}) == 4  # the answer is not always in one place


def test_near_misses_of_a_worked_example():
    task = get_task("addition", pad_answer=True)
    problem = Problem("372+859=", "1231")
    # Units 2+9 carries (1231-10), tens 7+5+1 carries (-100), hundreds 3+8+1 carries (-1000).
    assert addition_mc.dropped_carries(task, problem) == ["1221", "1131", "0231"]
    assert addition_mc.dropped_carries(task, Problem("100+200=", "0300")) == []
    assert addition_mc.digit_slips(task, Problem("100+209=", "0309")) == ["1309", "0209", "0409", "0319",
                                                                          "0308"]
    unpadded = get_task("addition")
    assert addition_mc.digit_slips(unpadded, Problem("100+200=", "300")) == ["200", "400", "310", "301"]


# ---------------------------------------------------------------------------------------------------------------
# Scoring


@pytest.mark.parametrize("name", sorted(GENERATE))
def test_exact_match_scores_as_task_score(tasks, name):
    task = tasks[name]
    scorer = get_task(GENERATE[name][0])
    for doc in list(task.test_docs())[:5]:
        answer = doc["answer"]
        cases = {answer: True, f" {answer}\n": True, answer[:-1]: False, answer + "0": False,
                 answer[::-1] if answer[::-1] != answer else answer + "1": False, "": False}
        for prediction, expected in cases.items():
            got = task.process_results(doc, [prediction])
            assert got == {"exact_match": float(expected)}
            assert expected == scorer.score(prediction, Problem(doc["prompt"], answer))


class OracleLM(LM):
    """An lm-eval model that knows arithmetic and Sudoku, and nothing of the documents' answers.

    pad: write sums as the demo does ("0701") or plainly ("701"); pick_first: score a choice by how small it is.
    """

    def __init__(self, pad: bool = True, pick_first: bool = False):
        super().__init__()
        self.pad, self.pick_first = pad, pick_first

    def _solve(self, prompt: str) -> str:
        if "+" not in prompt:
            return sudoku_solution(prompt)
        answer = true_sum(prompt)
        return answer if self.pad else str(int(answer))

    def generate_until(self, requests):
        return [self._solve(r.args[0]) + "\n" for r in requests]

    def loglikelihood(self, requests):
        out = []
        for r in requests:
            context, continuation = r.args
            if self.pick_first:
                ll = -float(int(continuation))
            else:
                ll = 0.0 if continuation == self._solve(context) else -1.0
            out.append((ll, False))
        return out

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def evaluate(manager, model, names, tmp_path) -> dict:
    import lm_eval

    with contextlib.chdir(tmp_path):
        results = lm_eval.simple_evaluate(model=model, tasks=list(names), task_manager=manager, bootstrap_iters=0,
                                          log_samples=False)
    return results["results"]


def test_oracles_score_as_expected_through_lm_eval(manager, tmp_path):
    results = evaluate(manager, OracleLM(), TASK_NAMES, tmp_path)
    assert results["dlmjax_addition"]["exact_match,none"] == 1.0
    assert results["dlmjax_sudoku"]["exact_match,none"] == 1.0
    assert results["dlmjax_addition_mc"]["acc,none"] == 1.0

    # Unpadded sums are right only when the sum has 4 digits; the smallest choice is right when the true sum is.
    problems = heldout(get_task("addition", pad_answer=True), 100, 0)
    results = evaluate(manager, OracleLM(pad=False, pick_first=True), ["dlmjax_addition", "dlmjax_addition_mc"],
                       tmp_path)
    assert results["dlmjax_addition"]["exact_match,none"] == pytest.approx(
        np.mean([int(p.answer) >= 1000 for p in problems]))
    mc_docs = addition_mc.build_docs()
    assert results["dlmjax_addition_mc"]["acc,none"] == pytest.approx(
        np.mean([min(d["choices"]) == d["answer"] for d in mc_docs]))


# ---------------------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("kwargs, named", [
    (dict(task_name="multiplication", num_docs=3), "dataset_kwargs.task_name='multiplication'"),
    (dict(task_name="addition", num_docs=0), "dataset_kwargs.num_docs=0"),
    (dict(task_name="addition", num_docs=3, docs_seed=-1), "dataset_kwargs.docs_seed=-1"),
    (dict(task_name="addition", task_args={"width": 3}, num_docs=3), "'width'"),
    (dict(task_name="addition", task_args={"digits": 1}, num_docs=5), "fewer than n=5"),
])
def test_bad_task_settings_are_refused_by_name(kwargs, named):
    with pytest.raises(InputError, match="dataset_kwargs") as err:
        docs.heldout_docs(**kwargs, version=1.0)  # metadata keys pass through
    assert named in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("line, named", [
    ('{"prompt": "1+2=", "answer": "3"', "is not valid JSON"),
    ('{"prompt": "1+2=", "answer": "3", "choices": ["3", "4"]}', "lacks field(s) ['label']"),
    ('{"prompt": "1+2=", "answer": "3", "choices": ["3", "4"], "label": 1}', "label=1"),
    ('{"prompt": "1+2=", "answer": "3", "choices": [], "label": 0}', "choices=[]"),
])
def test_bad_mc_lines_are_refused_with_file_and_line(tmp_path, line, named):
    path = tmp_path / "mc.jsonl"
    good = '{"prompt": "1+1=", "answer": "2", "choices": ["2", "3"], "label": 0}'
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(InputError) as err:
        docs.jsonl_docs(data_file=str(path))
    assert f"{path}:2" in str(err.value) and named in str(err.value)
    with pytest.raises(InputError, match="does not exist"):
        docs.jsonl_docs(data_file=str(tmp_path / "missing.jsonl"))


def test_the_package_data_ships_the_task_files():
    shipped = {p.name for p in TASKS_DIR.iterdir()}
    assert {f"{n}.yaml" for n in TASK_NAMES} | {"_heldout_yaml", "addition_mc.jsonl"} <= shipped
    text = (REPO / "pyproject.toml").read_text()
    assert '"dlmjax.lm_eval_tasks" = ["*.yaml", "_*_yaml", "*.jsonl"]' in text
