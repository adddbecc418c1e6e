"""Procedurally generated tasks scored by exact match: small, reproducible tests of reasoning.

Every example is a pure function of `(seed, index)`: `np.random.default_rng([seed, index])` draws
it, so example i can be read without generating 0..i-1 (random access for grain) and two runs
with one seed see the same data.

Held-out split. A problem is in the "eval" split iff a stable hash of its prompt,
`blake2b(prompt) mod EVAL_BUCKETS == 0` (1 problem in 64), independently of the seed and index that
drew it. The train stream redraws (from the same index-seeded generator) any problem that hashes into
the eval bucket, so no training example ever has an eval prompt, whatever seeds the two streams use.
The eval stream does the reverse (keeps only eval-bucket draws), and `heldout` collects n distinct
eval problems. The split is by exact prompt: "859+372=" may be trained on
while "372+859=" is held out, and a held-out Sudoku's solution grid can appear in training under other
clues; that is the intended generalisation gap (unseen inputs), not leakage of the input itself.

Sequence layout. Every example of a task has the same layout, fixed by the task's character budgets:
`[BOS] prompt(prompt_len) answer(<= answer_len) [EOS] [EOS]...` up to `seq_len` (see `encode_problem`).
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib

import numpy as np

from dlmjax.data.tokenizer import ByteTokenizer

SPLITS = ("train", "eval")
EVAL_BUCKETS = 64
# The eval bucket holds 1/64 of problems, so 4096 redraws all miss it with probability e^-64.
MAX_REDRAWS = 4096


@dataclasses.dataclass(frozen=True)
class Problem:
    """One task instance: the text the model is given and the text it must produce."""

    prompt: str
    answer: str


def in_eval_split(problem: Problem) -> bool:
    """True iff `problem` belongs to the held-out split (a stable hash of its prompt, 1 in 64)."""
    digest = hashlib.blake2b(problem.prompt.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % EVAL_BUCKETS == 0


class Task(abc.ABC):
    """A generator of `Problem`s with fixed prompt/answer character budgets and an exact-match score."""

    name: str

    @property
    @abc.abstractmethod
    def prompt_len(self) -> int:
        """Characters in every prompt (prompts are exactly this long)."""

    @property
    @abc.abstractmethod
    def answer_len(self) -> int:
        """Most characters an answer can have."""

    @abc.abstractmethod
    def sample(self, rng: np.random.Generator, split: str = "train") -> Problem:
        """One problem drawn with `rng` (the split may shape the distribution, not the hash bucket)."""

    def example(self, seed: int, index: int, split: str = "train") -> Problem:
        """Problem `index` of the stream `seed` restricted to `split` ("train" or "eval")."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not allowed; choose one of {list(SPLITS)}")
        for name, value in (("seed", seed), ("index", index)):
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative integer")
        want_eval = split == "eval"
        # One generator per (seed, index), drawn from until the split matches: seeding costs more than
        # a draw, and the eval split needs ~64 draws per problem.
        rng = np.random.default_rng([seed, index])
        for _ in range(MAX_REDRAWS):
            problem = self.sample(rng, split)
            if in_eval_split(problem) == want_eval:
                return problem
        raise ValueError(f"task {self.name!r} produced no {split!r} problem in {MAX_REDRAWS} draws; "
                         f"its problem space is too small for a 1/{EVAL_BUCKETS} held-out split "
                         "(e.g. use more addition digits)")

    def score(self, prediction: str, problem: Problem) -> bool:
        """Exact match of the decoded prediction with the answer (surrounding whitespace ignored)."""
        return prediction.strip() == problem.answer


@dataclasses.dataclass(frozen=True)
class AdditionTask(Task):
    """`a+b=` -> `a + b`, both operands with exactly `digits` digits, most significant digit first.

    Example (digits=3): prompt "372+859=", answer "1231". By default answers have no leading zeros, so
    they are `digits` or `digits + 1` characters; the EOS padding after them is part of the target. With
    `pad_answer` every answer has `digits + 1` characters ("100+200=0300"): each answer slot then has a
    fixed place value, which removes the hardest part of learning MSD-first addition (where the digits
    go depends on whether the sum carries out).
    """

    digits: int = 3
    pad_answer: bool = False
    # Curriculum: training operands have between `min_digits` and `digits` digits (each drawn
    # uniformly); held-out problems always have `digits`. 0 means `digits` (no curriculum).
    min_digits: int = 0
    name = "addition"

    def __post_init__(self):
        if not isinstance(self.digits, int) or self.digits < 1:
            raise ValueError(f"AdditionTask digits={self.digits!r} must be an integer >= 1")
        if not isinstance(self.min_digits, int) or not 0 <= self.min_digits <= self.digits:
            raise ValueError(f"AdditionTask min_digits={self.min_digits!r} must be in [0, digits={self.digits}]")

    @property
    def prompt_len(self) -> int:
        return 2 * self.digits + 2

    @property
    def answer_len(self) -> int:
        return self.digits + 1

    def sample(self, rng: np.random.Generator, split: str = "train") -> Problem:
        # Digit by digit so that any number of digits works without int64 overflow.
        digits = rng.integers(0, 10, size=(2, self.digits))
        digits[:, 0] = rng.integers(1, 10, size=2)
        a, b = ("".join(map(str, row)) for row in digits.tolist())
        if split == "train" and self.min_digits and self.min_digits < self.digits:
            # Shorter operands teach digit sums and carries on short alignments first; the extra
            # draws happen after the full-length ones, so min_digits == digits keeps the stream.
            la, lb = rng.integers(self.min_digits, self.digits + 1, size=2)
            a, b = a[: int(la)], b[: int(lb)]
        total = str(int(a) + int(b))
        return Problem(prompt=f"{a}+{b}=", answer=total.zfill(self.digits + 1) if self.pad_answer else total)


# ---- 4x4 Sudoku (2x2 boxes) -------------------------------------------------------------------------

_SIDE = 4
_CELLS = _SIDE * _SIDE
# A 4x4 puzzle needs at least 4 clues to have a unique solution, so at most 12 blanks.
_MAX_BLANKS = _CELLS - 4


def _peers(cell: int) -> list[int]:
    r, c = divmod(cell, _SIDE)
    box = [(r // 2 * 2 + i) * _SIDE + c // 2 * 2 + j for i in range(2) for j in range(2)]
    row = [r * _SIDE + j for j in range(_SIDE)]
    col = [i * _SIDE + c for i in range(_SIDE)]
    return sorted(set(box + row + col) - {cell})


_PEERS = tuple(tuple(_peers(cell)) for cell in range(_CELLS))


def _completions(cells: list[int]) -> list[tuple[int, ...]]:
    """Every valid completion of `cells` (16 values, 0 = blank), by backtracking in cell order."""
    found: list[tuple[int, ...]] = []

    def fill(pos: int) -> None:
        if pos == _CELLS:
            found.append(tuple(cells))
            return
        if cells[pos]:
            fill(pos + 1)
            return
        for digit in range(1, _SIDE + 1):
            if all(cells[p] != digit for p in _PEERS[pos]):
                cells[pos] = digit
                fill(pos + 1)
                cells[pos] = 0

    fill(0)
    return found


@functools.cache
def all_sudoku_grids() -> np.ndarray:
    """int8 [288, 16]: every valid 4x4 grid, row-major, digits 1..4 (found once by backtracking).

    With only 288 grids, counting a puzzle's solutions is one vectorised comparison against this
    table instead of a backtracking search; carving needs ~16 such counts per puzzle.
    """
    return np.asarray(_completions([0] * _CELLS), dtype=np.int8)


@dataclasses.dataclass(frozen=True)
class SudokuTask(Task):
    """4x4 Sudoku (2x2 boxes) with a unique solution, row-major, "." for a blank.

    Example: prompt ".2....2343....3.=", answer "3241142343122134".

    The solution is drawn uniformly from all 288 grids. (Relabelling digits and permuting rows in bands,
    bands, columns in stacks, stacks and transposing one base grid reaches only 192 of them: the 288
    fall into two orbits of that group.) The number of blanks is drawn uniformly from
    [min_blanks, max_blanks]; clues are removed in a random order, keeping a removal only while the
    puzzle still has exactly one solution.
    """

    min_blanks: int = 6
    max_blanks: int = 10
    name = "sudoku"

    def __post_init__(self):
        if not (isinstance(self.min_blanks, int) and isinstance(self.max_blanks, int)
                and 1 <= self.min_blanks <= self.max_blanks <= _MAX_BLANKS):
            raise ValueError(f"SudokuTask min_blanks={self.min_blanks!r}, max_blanks={self.max_blanks!r} must be "
                             f"integers with 1 <= min_blanks <= max_blanks <= {_MAX_BLANKS}")

    @property
    def prompt_len(self) -> int:
        return _CELLS + 1

    @property
    def answer_len(self) -> int:
        return _CELLS

    def sample(self, rng: np.random.Generator, split: str = "train") -> Problem:
        target = int(rng.integers(self.min_blanks, self.max_blanks + 1))
        grids = all_sudoku_grids()
        # A greedy pass can stop at a minimal puzzle with fewer blanks than the target (no single clue
        # can go); a new grid and removal order then almost always gets there.
        for _ in range(100):
            solution = grids[rng.integers(len(grids))]
            differs = (grids != solution).astype(np.int32)  # [288, 16]
            clue = np.ones(_CELLS, dtype=np.int32)
            blanks = 0
            for cell in rng.permutation(_CELLS):
                clue[cell] = 0
                # Grids that agree with the solution on every remaining clue; the solution is one.
                if np.count_nonzero(differs @ clue == 0) == 1:
                    blanks += 1
                    if blanks == target:
                        break
                else:
                    clue[cell] = 1
            if blanks == target:
                prompt = "".join(str(d) if k else "." for d, k in zip(solution, clue)) + "="
                return Problem(prompt=prompt, answer="".join(map(str, solution)))
        raise RuntimeError(f"could not carve a unique 4x4 Sudoku with {target} blanks in 100 tries")


# ---- sorting digits ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SortTask(Task):
    """`items` random digits then "=" -> the same digits in ascending order (exactly `items` characters).

    Example (items=8): prompt "53098153=", answer "01333589".

    Why this task: it is the benchmark where parallel decoding can pay off. Every answer slot is a
    deterministic function of the prompt alone (slot j holds the smallest digit d with more than j prompt
    digits <= d: a count), not of the answer slots before it, so a well-trained model can be confident
    about many slots at once and a threshold rule can commit a whole block per forward. An AR model must
    still spend one forward per slot. Answers are long (24 characters by default) and checkable by exact
    match, and there are 10^items prompts, so the 1/64 held-out split never runs dry.
    """

    items: int = 24
    name = "sort"

    def __post_init__(self):
        if not isinstance(self.items, int) or self.items < 1:
            raise ValueError(f"SortTask items={self.items!r} must be an integer >= 1")

    @property
    def prompt_len(self) -> int:
        return self.items + 1

    @property
    def answer_len(self) -> int:
        return self.items

    def sample(self, rng: np.random.Generator, split: str = "train") -> Problem:
        digits = rng.integers(0, 10, size=self.items)
        return Problem(prompt="".join(map(str, digits.tolist())) + "=",
                       answer="".join(map(str, np.sort(digits).tolist())))


TASKS: dict[str, type[Task]] = {"addition": AdditionTask, "sudoku": SudokuTask, "sort": SortTask}


def get_task(name: str, **kwargs) -> Task:
    """The task registered as `name` ("addition", "sudoku", "sort"), built with `kwargs` (e.g. digits=4)."""
    if name not in TASKS:
        raise ValueError(f"task={name!r} is unknown; choose one of {sorted(TASKS)}")
    cls = TASKS[name]
    allowed = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"task {name!r} takes no argument(s) {unknown}; allowed: {allowed}")
    return cls(**kwargs)


def heldout(task: Task, n: int, seed: int = 0) -> list[Problem]:
    """`n` distinct eval-split problems of `task`, in a fixed order for a given seed."""
    if n < 1:
        raise ValueError(f"heldout n={n!r} must be >= 1")
    problems: dict[str, Problem] = {}
    # Small problem spaces (e.g. 2-digit addition has ~126 eval prompts) run out of new problems:
    # stop after a generous number of draws rather than loop forever.
    max_draws = 50 * n + 1000
    for index in range(max_draws):
        problem = task.example(seed, index, split="eval")
        problems.setdefault(problem.prompt, problem)
        if len(problems) == n:
            return list(problems.values())
    raise ValueError(f"task {task.name!r} gave only {len(problems)} distinct held-out problems in "
                     f"{max_draws} draws, fewer than n={n}; ask for fewer or use a larger task")


# ---- tokens -------------------------------------------------------------------------------------------


def min_seq_len(task: Task) -> int:
    """Shortest row that fits `[BOS] prompt answer [EOS]` for every problem of `task`."""
    return 1 + task.prompt_len + task.answer_len + 1


def encode_problem(problem: Problem, task: Task, tokenizer: ByteTokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """One SFT row of length L = seq_len.

    Returns:
      tokens: int32 [L], `[BOS] prompt answer [EOS]` right-padded with EOS. The EOS padding is
        supervised like the answer (LLaDA SFT), so the model learns to end its answer with EOS.
      prompt_mask: bool [L], True on BOS and the prompt: never noised, never scored.
      valid_mask: bool [L], all True: no slot is padding here.
    """
    need = min_seq_len(task)
    if seq_len < need:
        raise ValueError(f"seq_len={seq_len} is too short for task {task.name!r}; it needs at least {need} "
                         f"(BOS + prompt {task.prompt_len} + answer {task.answer_len} + EOS)")
    prompt = tokenizer.encode(problem.prompt, bos=True)
    answer = tokenizer.encode(problem.answer, eos=True)
    if len(prompt) > 1 + task.prompt_len or len(answer) > 1 + task.answer_len:
        raise ValueError(f"problem {problem} does not fit task {task.name!r}: prompts must be at most "
                         f"{task.prompt_len} bytes and answers at most {task.answer_len}")
    tokens = np.full(seq_len, tokenizer.eos_id, dtype=np.int32)
    tokens[: len(prompt) + len(answer)] = prompt + answer
    prompt_mask = np.zeros(seq_len, dtype=bool)
    prompt_mask[: len(prompt)] = True
    return {"tokens": tokens, "prompt_mask": prompt_mask, "valid_mask": np.ones(seq_len, dtype=bool)}


def problem_from_record(record: dict[str, np.ndarray], tokenizer: ByteTokenizer) -> Problem:
    """The `Problem` encoded in an `encode_problem` row (to score generations against eval batches)."""
    tokens = np.asarray(record["tokens"])
    prompt_mask = np.asarray(record["prompt_mask"], dtype=bool)
    return Problem(prompt=tokenizer.decode(tokens[prompt_mask]), answer=tokenizer.decode(tokens[~prompt_mask]))
