"""lm-eval (0.4.13) task definitions for dlmjax's built-in tasks, runnable offline from any working directory.

    python -m dlmjax.lm_eval --model dlmjax --model_args checkpoint=runs/demo,mc_num=128 --batch_size 32 \\
        --tasks dlmjax --include_path "$(python -c 'import dlmjax.lm_eval_tasks as t; print(t.TASKS_DIR)')"
    dlmjax eval --checkpoint runs/demo --lm-eval dlmjax_addition_mc      # includes this folder itself

Tasks (tag `dlmjax` selects all three):

- `dlmjax_addition` (generate_until): the first 100 held-out problems of 3-digit addition, written as the demo
  run (`configs/demo.yaml`) writes them, answers zero-padded to 4 digits (`558+143=0701`); exact match, scored as
  `Task.score` scores it (the generation with surrounding whitespace stripped equals the answer).
- `dlmjax_sudoku` (generate_until): the first 100 held-out 4x4 Sudoku puzzles of the default `SudokuTask`; the
  same exact match on the 16-digit solution.
- `dlmjax_addition_mc` (multiple_choice): the same 100 addition problems, each with its answer and three near
  misses (a carry dropped, one digit off by one), shipped in `addition_mc.jsonl` (written by `addition_mc.py`);
  accuracy of the highest log-likelihood choice.

The generate_until documents are not shipped: they are drawn when a task loads, with `dlmjax.data.tasks.heldout`
(a pure function of the task, n and seed), so they are the problems `dlmjax eval` scores (its first
`num_docs`). The YAMLs name their loaders as `!function dlmjax.lm_eval_tasks.docs.<name>`: importable dotted
paths, resolved by import rather than against the working directory; the JSON-lines file is found next to
`docs.py`. A variant (another digit count, more documents) is a YAML that `include`s one of these and changes
`dataset_kwargs`.
"""
from __future__ import annotations

from pathlib import Path

# The folder to give lm-eval as `--include_path` (it holds the task YAMLs).
TASKS_DIR: Path = Path(__file__).resolve().parent
TAG = "dlmjax"
TASK_NAMES = ("dlmjax_addition", "dlmjax_sudoku", "dlmjax_addition_mc")

__all__ = ["TAG", "TASKS_DIR", "TASK_NAMES"]
