"""grain input pipelines: random-access sources, a resumable train stream, padded eval batches.

Everything is built on `grain.MapDataset` (random access) and turned into an `IterDataset` last, so
the iterator's state is one small position that orbax saves next to the train state: restoring it
replays exactly the batches that would have come next (bitwise-deterministic resume).

A record is a dict of numpy arrays of length L: `tokens` int32, `prompt_mask` bool (never noised),
`valid_mask` bool (False on padding: never noised, attended to or scored). A batch stacks B records
into `[B, L]` arrays.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from dlmjax.data.tasks import SPLITS, TASKS, Task, encode_problem, get_task, heldout, min_seq_len
from dlmjax.data.text import TextCorpus, text_record
from dlmjax.data.tokenizer import ByteTokenizer

KINDS = ("task", "text")
# Generated tasks have no natural length; this many examples is more than any run reads.
TASK_SOURCE_SIZE = 2**31 - 1
# grain's default (16 threads, 500 batches ahead) would generate tens of thousands of Sudoku examples
# at start-up on a 2-core host; a few batches ahead keep the accelerator fed.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)

Record = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TaskSource:
    """Random-access source of encoded task examples: record i is `task.example(seed, i, split)`.

    Examples are generated on demand, so the source costs no memory and any index can be read first.
    """

    task: Task
    seq_len: int
    seed: int
    split: str = "train"
    size: int = TASK_SOURCE_SIZE
    tokenizer: ByteTokenizer = ByteTokenizer()

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r} is not allowed; choose one of {list(SPLITS)}")
        if self.seq_len < min_seq_len(self.task):
            raise ValueError(f"seq_len={self.seq_len} is too short for task {self.task.name!r}; "
                             f"it needs at least {min_seq_len(self.task)}")
        if not 1 <= self.size <= TASK_SOURCE_SIZE:
            raise ValueError(f"size={self.size} must be in [1, {TASK_SOURCE_SIZE}]")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Record:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} is out of range for a TaskSource of size {self.size}")
        problem = self.task.example(self.seed, index, self.split)
        return encode_problem(problem, self.task, self.tokenizer, self.seq_len)


@dataclasses.dataclass(frozen=True, eq=False)
class RowSource:
    """Random-access source over packed text rows, int32 [n_rows, L]; record i is `text_record(rows[i])`."""

    rows: np.ndarray

    def __post_init__(self):
        if self.rows.ndim != 2 or len(self.rows) == 0:
            raise ValueError(f"rows must be a non-empty [n_rows, seq_len] array, got shape {self.rows.shape}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Record:
        return text_record(self.rows[int(index)])

    def __repr__(self) -> str:
        # grain puts the source's repr in checkpoints; the rows themselves would be megabytes.
        return f"RowSource(shape={self.rows.shape})"


def make_train_dataset(source: Sequence[Record], *, batch_size: int, seed: int, shuffle: bool,
                       read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """An endless, resumable stream of `[batch_size, L]` batches from `source`.

    `shuffle` permutes the source with `seed`, and again with a new seed every epoch; use it for finite
    sources (text rows). Generated task sources are already i.i.d., so shuffling them only costs time.
    Epochs are concatenated endlessly before batching, so every batch is full (one may straddle two
    epochs) and no record is ever skipped. `iter()` of the result supports `get_state()`/`set_state()`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if batch_size > len(source):
        raise ValueError(f"batch_size={batch_size} is larger than the source ({len(source)} records)")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat().batch(batch_size, drop_remainder=True)
    return ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)


def padding_record(seq_len: int, tokenizer: ByteTokenizer = ByteTokenizer()) -> Record:
    """A record that is all padding: PAD tokens, `prompt_mask` and `valid_mask` all False."""
    return {"tokens": np.full(seq_len, tokenizer.pad_id, dtype=np.int32),
            "prompt_mask": np.zeros(seq_len, dtype=bool),
            "valid_mask": np.zeros(seq_len, dtype=bool)}


def make_eval_batches(records: Sequence[Record], batch_size: int) -> list[Record]:
    """All `records`, in order, as `[batch_size, L]` batches; the last batch is padded, not dropped.

    Padding keeps one shape for every eval batch (one compile). Padding rows come from
    `padding_record`: `valid_mask` all False, so they are never scored; a batch's real rows are
    `batch["valid_mask"].any(axis=-1)`.
    """
    if not records:
        raise ValueError("records is empty; there is nothing to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    records = list(records)
    short = -len(records) % batch_size
    pad = padding_record(len(records[0]["tokens"]))
    # Packed rows carry segment_ids / positions too: pad them with zeros (padding's segment and position).
    pad.update({k: np.zeros_like(v) for k, v in records[0].items() if k not in pad})
    records += [pad] * short
    return [{key: np.stack([r[key] for r in records[i: i + batch_size]]) for key in records[0]}
            for i in range(0, len(records), batch_size)]


def build_data(*, kind: str, seq_len: int, batch_size: int, seed: int, task: str | None = None,
               task_kwargs: Mapping[str, Any] | None = None, path: str | None = None,
               eval_size: int = 500, val_frac: float = 0.05, split_paragraphs: bool = False,
               read_options: grain.ReadOptions | None = None,
               ) -> tuple[grain.IterDataset, list[Record], ByteTokenizer, Task | None]:
    """The train stream, eval records, tokenizer and task (None for text) of one run.

    kind="task": `task` names a registered task built with `task_kwargs`; train batches are generated
      from `seed` (train split); eval records are `heldout(task, eval_size, seed)`, disjoint from them.
    kind="text": `path` is a file, directory or glob; train batches are shuffled training rows;
      eval records are the first `eval_size` validation rows (the last `val_frac` of the corpus).

    Train batches are `[batch_size, seq_len]` (see `make_train_dataset`); batch the eval records with
    `make_eval_batches`.
    """
    _check_args(kind=kind, seq_len=seq_len, eval_size=eval_size, task=task, task_kwargs=task_kwargs, path=path,
                batch_size=batch_size)
    tokenizer = ByteTokenizer()
    if kind == "task":
        the_task = get_task(task, **dict(task_kwargs or {}))
        source = TaskSource(the_task, seq_len, seed, tokenizer=tokenizer)
        train = make_train_dataset(source, batch_size=batch_size, seed=seed, shuffle=False,
                                   read_options=read_options)
        return train, _task_eval_records(the_task, seq_len, eval_size, seed), tokenizer, the_task
    corpus = TextCorpus.load(path, seq_len=seq_len, tokenizer=tokenizer, val_frac=val_frac,
                             split_paragraphs=split_paragraphs)
    train = make_train_dataset(RowSource(corpus.train_rows), batch_size=batch_size, seed=seed, shuffle=True,
                               read_options=read_options)
    return train, _text_eval_records(corpus, eval_size), tokenizer, None


def build_eval_data(*, kind: str, seq_len: int, seed: int, task: str | None = None,
                    task_kwargs: Mapping[str, Any] | None = None, path: str | None = None, eval_size: int = 500,
                    val_frac: float = 0.05, split_paragraphs: bool = False,
                    ) -> tuple[list[Record], ByteTokenizer, Task | None]:
    """The eval records, tokenizer and task of `build_data` with the same arguments, without a train stream."""
    _check_args(kind=kind, seq_len=seq_len, eval_size=eval_size, task=task, task_kwargs=task_kwargs, path=path)
    tokenizer = ByteTokenizer()
    if kind == "task":
        the_task = get_task(task, **dict(task_kwargs or {}))
        return _task_eval_records(the_task, seq_len, eval_size, seed), tokenizer, the_task
    corpus = TextCorpus.load(path, seq_len=seq_len, tokenizer=tokenizer, val_frac=val_frac,
                             split_paragraphs=split_paragraphs)
    return _text_eval_records(corpus, eval_size), tokenizer, None


def _task_eval_records(task: Task, seq_len: int, eval_size: int, seed: int) -> list[Record]:
    return [encode_problem(p, task, ByteTokenizer(), seq_len) for p in heldout(task, eval_size, seed)]


def _text_eval_records(corpus: TextCorpus, eval_size: int) -> list[Record]:
    return [text_record(row) for row in corpus.val_rows[:eval_size]]


def _check_args(*, kind, seq_len, eval_size, task, task_kwargs, path, batch_size=1) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not allowed; choose one of {list(KINDS)}")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("eval_size", eval_size)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if kind == "task":
        if not task:
            raise ValueError(f"kind='task' needs a task name; choose one of {sorted(TASKS)}")
        if path:
            raise ValueError(f"path={path!r} is only used with kind='text', not kind='task'")
        return
    if not path:
        raise ValueError("kind='text' needs path: a file, a directory of *.txt/*.md files, or a glob")
    if task or task_kwargs:
        raise ValueError(f"task={task!r}, task_kwargs={task_kwargs!r} are only used with kind='task'; "
                         "pass task=None with kind='text'")
