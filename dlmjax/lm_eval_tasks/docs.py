"""The documents and the scoring of dlmjax's lm-eval tasks: the functions the task YAMLs beside this file name.

lm-eval calls a task's `custom_dataset` with the task's `dataset_kwargs` and its `metadata` as keyword arguments
(the metadata holds lm-eval's own keys and whatever a run passes with `--metadata`, sometimes the model's
arguments too), so the loaders take their settings by name and ignore every other keyword. They return a
`datasets.DatasetDict` with one split, `test`.

A document of a generate_until task: `{"task": "addition", "prompt": "558+143=", "answer": "0701"}`.
A document of the multiple-choice task: `{"prompt": ..., "answer": ..., "choices": [4 strings], "label": int}`.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from dlmjax.data.tasks import TASKS, Problem, Task, get_task, heldout
from dlmjax.errors import InputError

HERE = Path(__file__).resolve().parent
SPLIT = "test"
MC_FIELDS = ("prompt", "answer", "choices", "label")


def _dataset(docs: list[dict[str, Any]]):
    # datasets comes with lm-eval (the `eval` extra); dlmjax itself does not need it.
    import datasets

    return datasets.DatasetDict({SPLIT: datasets.Dataset.from_list(docs)})


@functools.cache
def _scorer(task_name: str) -> Task:
    # Scoring depends only on the task's class (`Task.score`), not on its size arguments.
    return get_task(task_name)


def heldout_problems(task_name: str, task_args: dict[str, Any] | None, num_docs: int, docs_seed: int) -> list[Problem]:
    """`heldout(get_task(task_name, **task_args), num_docs, docs_seed)`, refusing bad settings by their YAML names."""
    if task_name not in TASKS:
        raise InputError(f"dataset_kwargs.task_name={task_name!r} is not a dlmjax task; choose one of {sorted(TASKS)}")
    if task_args is not None and not isinstance(task_args, dict):
        raise InputError(f"dataset_kwargs.task_args={task_args!r} must be a mapping of the task's arguments")
    for name, value, low in (("num_docs", num_docs, 1), ("docs_seed", docs_seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"dataset_kwargs.{name}={value!r} must be an integer >= {low}")
    try:
        task = get_task(task_name, **(task_args or {}))
        return heldout(task, num_docs, docs_seed)
    except ValueError as e:  # the task's own one-line refusal (unknown argument, too few held-out problems)
        raise InputError(f"dataset_kwargs of task {task_name!r}: {e}") from None


def heldout_docs(*, task_name: str, task_args: dict[str, Any] | None = None, num_docs: int, docs_seed: int = 0,
                 **metadata):
    """The test split: the first `num_docs` held-out problems of a dlmjax task, in `heldout`'s order.

    Args:
      task_name: "addition" or "sudoku" (`dlmjax.data.tasks.TASKS`).
      task_args: the task's arguments (`{"digits": 3, "pad_answer": true}`); None for its defaults.
      num_docs: documents in the split.
      docs_seed: the held-out stream's seed (`data.seed` of a run; 0 by default).
      metadata: lm-eval's metadata, ignored.
    """
    problems = heldout_problems(task_name, task_args, num_docs, docs_seed)
    return _dataset([{"task": task_name, "prompt": p.prompt, "answer": p.answer} for p in problems])


def read_mc_docs(path: Path) -> list[dict[str, Any]]:
    """The multiple-choice documents of a JSON-lines file, checked line by line (one line per document)."""
    if not path.is_file():
        raise InputError(f"{path} does not exist; dataset_kwargs.data_file names a JSON-lines file next to "
                         f"{HERE / 'docs.py'}")
    docs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number} is not valid JSON ({e.msg})") from None
        missing = [f for f in MC_FIELDS if f not in doc] if isinstance(doc, dict) else list(MC_FIELDS)
        if missing:
            raise InputError(f"{path}:{number} lacks field(s) {missing}; a document holds {list(MC_FIELDS)}")
        choices, label = doc["choices"], doc["label"]
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
            raise InputError(f"{path}:{number}: choices={choices!r} must be a non-empty list of strings")
        if not (isinstance(label, int) and 0 <= label < len(choices) and choices[label] == doc["answer"]):
            raise InputError(f"{path}:{number}: label={label!r} must index the choice equal to answer="
                             f"{doc['answer']!r} in {choices}")
        docs.append({f: doc[f] for f in MC_FIELDS})
    if not docs:
        raise InputError(f"{path} holds no documents")
    return docs


def jsonl_docs(*, data_file: str, **metadata):
    """The test split read from `data_file` (relative to this folder; see `read_mc_docs`); metadata is ignored."""
    return _dataset(read_mc_docs(HERE / data_file))


def exact_match(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval's `process_results` of the generate_until tasks: `Task.score` of the (single) generation.

    Args:
      doc: a `heldout_docs` document.
      results: the filtered generations of the document (lm-eval's default filter keeps the first).
    """
    problem = Problem(prompt=doc["prompt"], answer=doc["answer"])
    return {"exact_match": float(_scorer(doc["task"]).score(results[0], problem))}


__all__ = ["exact_match", "heldout_docs", "heldout_problems", "jsonl_docs", "read_mc_docs"]
