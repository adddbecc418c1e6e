"""A run's data from its config: the one dispatch on `data.kind`.

  load_data(cfg)       the training loop's input: the train stream, the held-out records, the tokenizer, the task.
  load_eval_data(cfg)  the held-out records, tokenizer and task alone (`dlmjax eval`): no train stream is built.
  data_tokenizer(cfg)  the tokenizer of `data.tokenizer`, checked against `model.vocab_size` and
                       `diffusion.mask_id` before anything is read (`ConfigError` naming the field).

Kinds: `task` and `text` rows are byte-level (`dlmjax.data.pipeline`); `corpus`, `sft` and `packed` are read by
each process from its own share of the files (`dlmjax.data.sharded`, `dlmjax.data.store`).
"""
from __future__ import annotations

from typing import NamedTuple

from dlmjax.config import Config
from dlmjax.data.pipeline import Record, build_data, build_eval_data
from dlmjax.data.sharded import SHARDED_KINDS, build_sharded_data, sharded_eval_records
from dlmjax.data.store import StoreMeta, check_store
from dlmjax.data.tasks import Task
from dlmjax.data.tokenizer import ByteTokenizer, Tokenizer, check_model_vocab, load_tokenizer


class RunData(NamedTuple):
    """What a training run reads. `train` yields `[batch, length]` batches (this process's
    `[batch / processes, length]` rows for the per-process kinds); `tokenizer` is None for `packed` (the store
    carries token ids only); `task` is None except for `data.kind=task`."""

    train: object  # a grain IterDataset; iter() of it checkpoints its position
    eval_records: list[Record]
    tokenizer: Tokenizer | None
    task: Task | None


class EvalData(NamedTuple):
    """The held-out part of `RunData`: the same records, tokenizer and task."""

    records: list[Record]
    tokenizer: Tokenizer | None
    task: Task | None


def per_process(cfg: Config) -> bool:
    """Whether each process reads its own rows (corpus, sft, packed) rather than the same global batch."""
    return cfg.data.kind in SHARDED_KINDS


def data_tokenizer(cfg: Config) -> Tokenizer | None:
    """The run's tokenizer (None for `packed`), after checking that the model's vocabulary and mask id fit it.

    For a store the check is against the tokenizer it was packed with (its `meta.json`). The mask id must be
    the tokenizer's own: 259 for bytes, the tokenizer's mask token, or its vocabulary size when it has none.
    """
    d = cfg.data
    if d.kind == "packed":
        check_store(StoreMeta.read(d.path), cfg)
        return None
    tokenizer = ByteTokenizer() if d.kind in ("task", "text") else load_tokenizer(d.tokenizer)
    check_model_vocab(tokenizer, vocab_size=cfg.model.vocab_size, mask_id=cfg.diffusion.mask_id)
    return tokenizer


def load_data(cfg: Config, tokenizer: Tokenizer | None = None) -> RunData:
    """The train stream and held-out records of `cfg` (see the module docstring).

    `tokenizer`: `data_tokenizer(cfg)` when the caller has already checked it (the training loop does so before
    it locks the run directory), so that a tokenizer file is read once.
    """
    d = cfg.data
    if tokenizer is None:
        tokenizer = data_tokenizer(cfg)
    if per_process(cfg):
        train, evals, _, _ = build_sharded_data(**_sharded_args(cfg), tokenizer=tokenizer, batch_size=d.batch_size,
                                                seed=d.seed)
        return RunData(train, evals, tokenizer, None)
    train, evals, _, task = build_data(**_byte_args(cfg), batch_size=d.batch_size)
    return RunData(train, evals, tokenizer, task)


def load_eval_data(cfg: Config) -> EvalData:
    """The held-out records `load_data` would give, without building the train stream."""
    tokenizer = data_tokenizer(cfg)
    if per_process(cfg):
        return EvalData(sharded_eval_records(**_sharded_args(cfg), tokenizer=tokenizer), tokenizer, None)
    evals, _, task = build_eval_data(**_byte_args(cfg))
    return EvalData(evals, tokenizer, task)


def _byte_args(cfg: Config) -> dict:
    d = cfg.data
    if d.kind == "task":
        return dict(kind="task", task=d.task, task_kwargs=d.task_kwargs(), seq_len=d.seq_len, seed=d.seed,
                    eval_size=d.eval_size)
    return dict(kind="text", path=d.path, seq_len=d.seq_len, seed=d.seed, eval_size=d.eval_size)


def _sharded_args(cfg: Config) -> dict:
    d = cfg.data
    return dict(kind=d.kind, path=d.path, fmt=d.format, seq_len=d.seq_len, block_size=cfg.diffusion.block_size,
                text_field=d.text_field, prompt_field=d.prompt_field, response_field=d.response_field,
                record_type=d.record_type, eval_size=d.eval_size, packing=d.packing)


__all__ = ["EvalData", "RunData", "data_tokenizer", "load_data", "load_eval_data", "per_process"]
