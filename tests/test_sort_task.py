"""The sort task (dlmjax.data.tasks.SortTask) and the configs of the AR-vs-diffusion benchmark built on it."""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections import Counter

import numpy as np
import pytest

from dlmjax.data import ByteTokenizer, encode_problem, get_task, heldout, in_eval_split, min_seq_len
from dlmjax.data import problem_from_record
from dlmjax.data.tasks import SortTask

TOK = ByteTokenizer()
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def counted_answer(prompt: str) -> str:
    """The answer as the task's docstring defines each slot: slot j holds the smallest digit d with more than j
    prompt digits <= d (a count over the prompt; no sorting routine)."""
    digits = prompt.rstrip("=")
    counts = Counter(digits)
    out = []
    for j in range(len(digits)):
        below = 0
        for d in "0123456789":
            below += counts[d]
            if below > j:
                out.append(d)
                break
    return "".join(out)


@pytest.mark.parametrize("items", [3, 5, 24])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_answers_are_the_prompt_digits_sorted(items, split):
    task = SortTask(items=items)
    for index in range(40 if split == "train" else 10):
        p = task.example(7, index, split)
        assert re.fullmatch(rf"\d{{{items}}}=", p.prompt), p
        assert len(p.prompt) == task.prompt_len == items + 1
        assert len(p.answer) == task.answer_len == items
        assert sorted(p.answer) == sorted(p.prompt[:-1])  # a permutation of the prompt's digits
        assert all(a <= b for a, b in zip(p.answer, p.answer[1:]))  # ascending
        assert p.answer == counted_answer(p.prompt)
        assert task.score(f" {p.answer}\n", p) and not task.score(p.answer[::-1] + "0", p)


def test_one_item_has_no_held_out_problems():
    # 10 prompts: no problem hashes into the 1/64 bucket, and the task says so instead of looping.
    task = SortTask(items=1)
    assert task.example(0, 0).answer == task.example(0, 0).prompt[0]
    with pytest.raises(ValueError, match="problem space is too small"):
        task.example(0, 0, "eval")


def test_digits_cover_all_values_and_streams_are_reproducible():
    task = SortTask()
    draws = "".join(task.example(0, i).prompt[:-1] for i in range(200))
    assert set(draws) == set("0123456789")
    assert [task.example(3, i) for i in range(5)] == [task.example(3, i) for i in range(5)]
    assert [task.example(3, i) for i in range(5)] != [task.example(4, i) for i in range(5)]


def test_heldout_is_disjoint_from_training():
    task = get_task("sort", items=24)
    held = heldout(task, 64, seed=0)
    assert len({p.prompt for p in held}) == 64 and all(in_eval_split(p) for p in held)
    train = [task.example(0, i, "train") for i in range(2000)]
    assert not any(in_eval_split(p) for p in train)
    assert not {p.prompt for p in held} & {p.prompt for p in train}
    # With few items the 1/64 bucket is still reachable (10^3 prompts, ~16 held out), and stays disjoint.
    small = SortTask(items=3)
    small_held = {p.prompt for p in heldout(small, 10, seed=1)}
    assert not small_held & {small.example(1, i).prompt for i in range(500)}


def test_row_layout():
    task = SortTask(items=24)
    assert min_seq_len(task) == 1 + 25 + 24 + 1 == 51
    p = task.example(0, 0)
    row = encode_problem(p, task, TOK, 64)
    tokens = row["tokens"]
    assert tokens.shape == (64,) and tokens[0] == TOK.bos_id
    assert TOK.decode(tokens[1:26]) == p.prompt and TOK.decode(tokens[26:50]) == p.answer
    assert np.all(tokens[50:] == TOK.eos_id)  # the answer ends at slot 49 in every row: a fixed layout
    assert row["prompt_mask"].sum() == 26 and row["prompt_mask"][:26].all() and row["valid_mask"].all()
    assert problem_from_record(row, TOK) == p
    with pytest.raises(ValueError, match="seq_len=50 is too short"):
        encode_problem(p, task, TOK, 50)


def test_bad_items_are_refused():
    for items in (0, -3, 2.5, "24"):
        with pytest.raises(ValueError, match="SortTask items="):
            SortTask(items=items)
    with pytest.raises(ValueError, match=r"takes no argument\(s\) \['digits'\]"):
        get_task("sort", digits=3)


def test_benchmark_configs_differ_only_in_the_objective():
    from dlmjax.config import ConfigError, load_config

    paths = sorted(glob.glob(os.path.join(CONFIGS, "sort_*.yaml")))
    names = [os.path.basename(p) for p in paths]
    assert {"sort_ar.yaml", "sort_bd.yaml"} <= set(names)
    cfgs = {n: load_config(p, []) for n, p in zip(names, paths)}
    ar = cfgs["sort_ar.yaml"]
    assert (ar.diffusion.objective, ar.diffusion.block_size, ar.diffusion.clip_min, ar.diffusion.clip_max) == \
        ("bd3", 1, 1.0, 1.0)
    assert ar.data.task == "sort" and ar.data.items == 24 and ar.data.seq_len in (56, 64)
    for name, cfg in cfgs.items():
        assert cfg.diffusion.objective == "bd3", name
        assert cfg.data.seq_len % (cfg.diffusion.block_size or cfg.data.seq_len) == 0, name
        # The comparison is fair only if everything but the objective (and its block size) is shared; D2F is a
        # post-training of the block-diffusion run (its own optimiser settings and step count on top).
        sections = ("model", "data") if cfg.diffusion.context == "noisy" else ("model", "data", "optim", "train")
        for section in sections:
            assert getattr(cfg, section) == getattr(ar, section), (name, section)
    with pytest.raises(ConfigError, match="too short for data.task=sort"):
        load_config(paths[0], ["data.items=40"])
    assert dataclasses.replace(ar.data, items=8).task_kwargs() == {"items": 8}
