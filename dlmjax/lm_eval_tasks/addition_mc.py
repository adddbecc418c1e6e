"""Writes `addition_mc.jsonl`, the documents of `dlmjax_addition_mc`: held-out addition problems with 4 choices.

    .venv/bin/python -m dlmjax.lm_eval_tasks.addition_mc      # rewrites the file (the same bytes every time)

Each of the first `NUM_DOCS` held-out problems of `AdditionTask(**TASK_ARGS)` (the demo run's layout, answers
zero-padded to digits + 1 characters) gets its answer and three near misses of the same width, in an order drawn
with `np.random.default_rng(SEED)`:

- a dropped carry: the sum without the carry out of one column that carries (372+859: 1231 -> 1221, 1131,
  0231), the commonest slip of column addition; one of them when the sum carries at all;
- one digit moved by one (1231 -> 2231, 1331, 1241, ...);

the others are drawn from the rest of both pools. Every choice has the answer's length, so the log-likelihoods
of a document's choices sum over equally many tokens (and lm-eval's length-normalised acc_norm would equal acc).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dlmjax.data.tasks import AdditionTask, Problem, heldout

TASK_ARGS = {"digits": 3, "pad_answer": True}
NUM_DOCS = 100
SEED = 0
CHOICES = 4
DATA_FILE = Path(__file__).resolve().parent / "addition_mc.jsonl"


def _write(task: AdditionTask, total: int) -> str:
    """`total` as the task writes an answer."""
    return str(total).zfill(task.digits + 1) if task.pad_answer else str(total)


def dropped_carries(task: AdditionTask, problem: Problem) -> list[str]:
    """The sum without the carry out of column i, for every column i that carries (units first)."""
    a, b = problem.prompt.rstrip("=").split("+")
    total, carry, out = int(a) + int(b), 0, []
    for i in range(max(len(a), len(b))):
        column = int(a[-1 - i]) if i < len(a) else 0
        column += (int(b[-1 - i]) if i < len(b) else 0) + carry
        carry = column // 10
        if carry:
            out.append(_write(task, total - 10 ** (i + 1)))
    return out


def digit_slips(task: AdditionTask, problem: Problem) -> list[str]:
    """The answer with one digit moved up or down by one (no wrap-around; no new leading zero when unpadded)."""
    answer, out = problem.answer, []
    for j, d in enumerate(map(int, answer)):
        for new in (d - 1, d + 1):
            if 0 <= new <= 9 and not (j == 0 and new == 0 and not task.pad_answer and len(answer) > 1):
                out.append(answer[:j] + str(new) + answer[j + 1:])
    return out


def mc_doc(task: AdditionTask, problem: Problem, rng: np.random.Generator) -> dict:
    """One document: the answer and `CHOICES - 1` distinct near misses of its length, shuffled."""
    def usable(candidates):
        seen = []
        for c in candidates:
            if c != problem.answer and len(c) == len(problem.answer) and c not in seen:
                seen.append(c)
        return seen

    carries, slips = usable(dropped_carries(task, problem)), usable(digit_slips(task, problem))
    picked = [carries[rng.integers(len(carries))]] if carries else []
    rest = [c for c in usable(carries + slips) if c not in picked]  # a dropped carry can also be a slip
    # Every digit moves at least one way, so a 4-digit answer has >= 4 slips, >= 3 once the picked carry is out.
    picked += [rest[i] for i in rng.choice(len(rest), CHOICES - 1 - len(picked), replace=False)]
    choices = [picked[i] if i < len(picked) else problem.answer for i in rng.permutation(CHOICES)]
    return {"prompt": problem.prompt, "answer": problem.answer, "choices": choices,
            "label": choices.index(problem.answer)}


def build_docs(num_docs: int = NUM_DOCS, seed: int = SEED, task_args: dict | None = None) -> list[dict]:
    """The documents of the file: `mc_doc` of the first `num_docs` held-out problems, one generator for all."""
    task = AdditionTask(**(TASK_ARGS if task_args is None else task_args))
    rng = np.random.default_rng(seed)
    return [mc_doc(task, problem, rng) for problem in heldout(task, num_docs, 0)]


def main() -> None:
    docs = build_docs()
    DATA_FILE.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    print(f"wrote {len(docs)} documents to {DATA_FILE}")


if __name__ == "__main__":
    main()
