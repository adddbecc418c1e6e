"""Per-process pipelines over corpus files: packed pre-training rows (`kind=corpus`) and SFT rows (`kind=sft`).

Each process reads only its own documents (`formats.shard_range`), tokenizes and packs them, and yields
`[batch_size / process_count, L]` batches; `dlmjax.sharding.assemble_global_batch` makes one global array of them
with `jax.make_array_from_process_local_data`. Every process yields the same number of batches per epoch: the
training rows are cut to a count all processes agree on (the minimum over processes, `agree_min`),
rounded down to whole local batches, so the dropped remainder is a deterministic tail of each shard.

The train stream is `shuffle(seed) -> repeat -> batch` on a `grain.MapDataset`: its iterator state is one
position, saved by orbax next to the train state (`dlmjax.checkpoint`), and resume replays the same batches.
Eval records are the last `val_frac` of each process's packed rows (never trained on).
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

import grain
import jax
import numpy as np

from dlmjax.data.pipeline import DEFAULT_READ_OPTIONS
from dlmjax.data.formats import CorpusIndex, local_batch_size, shard_range
from dlmjax.data.packing import pack_documents, sft_rows
from dlmjax.data.store import build_store_data, store_eval_records
from dlmjax.data.tokenizer import Tokenizer, encode_in_chunks
from dlmjax.errors import InputError

SHARDED_KINDS = ("corpus", "sft", "packed")  # packed: a store written by `dlmjax pack`


@dataclasses.dataclass(frozen=True)
class ProcessShard:
    """Which share of the corpus this process reads: `index` of `count` (default: this JAX process)."""

    index: int
    count: int

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"ProcessShard(index={self.index}, count={self.count}): index must be in [0, count)")

    @classmethod
    def current(cls) -> "ProcessShard":
        return cls(jax.process_index(), jax.process_count())


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
    """Random-access source over `[n_rows, L]` arrays; record i is `{key: arrays[key][i]}`."""

    arrays: Mapping[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[int(index)] for k, v in self.arrays.items()}

    def __repr__(self) -> str:
        # grain writes the source's repr into checkpoints: shapes, not megabytes of rows.
        return f"ArraySource({ {k: v.shape for k, v in self.arrays.items()} })"


def agree_min(value: int, shard: ProcessShard) -> int:
    """The minimum of `value` over the processes of a real multi-process run (collective), else `value`."""
    if shard.count == 1:
        return value
    if jax.process_count() != shard.count:
        raise ValueError(f"{shard} is simulated (jax.process_count()={jax.process_count()}): pass train_rows, the "
                         "row count every process keeps, explicitly")
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return int(np.min(multihost_utils.process_allgather(np.int64(value))))


def corpus_rows(index: CorpusIndex, tokenizer: Tokenizer, shard: ProcessShard, *, seq_len: int, block_size: int = 0,
                text_field: str = "text", record_type: str = "text", packing: str = "wrap") -> dict[str, np.ndarray]:
    """This process's documents, tokenized and packed (see `packing.pack_documents`)."""
    docs = index.iter(*shard_range(len(index), shard.index, shard.count), fields=(text_field,),
                      record_type=record_type)  # streamed: only the packed rows are held
    ids = docs if record_type == "tokens" else encode_in_chunks(tokenizer, docs)
    return pack_documents(ids, seq_len=seq_len, block_size=block_size, pad_id=tokenizer.pad_id,
                          bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, mode=packing)


def sft_rows_of(index: CorpusIndex, tokenizer: Tokenizer, shard: ProcessShard, *, seq_len: int,
                prompt_field: str = "prompt", response_field: str = "response") -> dict[str, np.ndarray]:
    """This process's SFT examples as rows (see `packing.sft_rows`); too-long examples are dropped."""
    pairs = index.read_shard(shard.index, shard.count, fields=(prompt_field, response_field))
    prompts = tokenizer.encode_arrays([p for p, _ in pairs])
    responses = tokenizer.encode_arrays([r for _, r in pairs])
    rows, dropped = sft_rows(list(zip(prompts, responses)), seq_len=seq_len, bos_id=tokenizer.bos_id,
                             eos_id=tokenizer.eos_id)
    if dropped:  # said out loud: a silently shrinking SFT set is a classic surprise
        warnings.warn(f"process {shard.index}: {dropped} of {len(pairs)} SFT examples do not fit data.seq_len="
                      f"{seq_len} (BOS + prompt + response + EOS) and were dropped", stacklevel=2)
    return rows


def split_rows(rows: dict[str, np.ndarray], *, local_batch: int, val_frac: float, shard: ProcessShard,
               train_rows: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(train, eval) rows: the last `max(1, round(val_frac * n))` rows are eval; the train rows are cut to the
    count every process keeps (`train_rows`, or `agree_min`), rounded down to whole local batches."""
    n = len(rows["tokens"])
    n_val = held_out_count(n, val_frac)
    n_train = agree_min(n - n_val, shard) if train_rows is None else min(train_rows, n - n_val)
    n_train -= n_train % local_batch
    if n_train < local_batch:
        raise InputError(f"process {shard.index} of {shard.count} has {n - n_val} training row(s) (after "
                         f"{n_val} eval rows), fewer than one local batch of {local_batch}; add data, lower "
                         "data.batch_size or data.seq_len")
    return ({k: v[:n_train] for k, v in rows.items()}, {k: v[n - n_val:] for k, v in rows.items()})


def build_sharded_data(*, kind: str, path: str, fmt: str, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                       seed: int, block_size: int = 0, text_field: str = "text", prompt_field: str = "prompt",
                       response_field: str = "response", record_type: str = "text", eval_size: int = 500,
                       val_frac: float = 0.05, packing: str = "wrap", shard: ProcessShard | None = None,
                       train_rows: int | None = None,
                       read_options: grain.ReadOptions | None = None):
    """(train stream of local `[batch_size / count, L]` batches, local eval records, tokenizer, None).

    `shard` defaults to this JAX process; tests simulate other processes with an explicit shard and
    `train_rows` (the agreed count that `agree_min` would compute collectively).
    """
    _check_kind(kind)
    shard = shard or ProcessShard.current()
    if kind == "packed":  # rows tokenized and packed ahead of time (dlmjax.data.store)
        ds, evals = build_store_data(path=path, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                     process_index=shard.index, process_count=shard.count, eval_size=eval_size,
                                     val_frac=val_frac, read_options=read_options)
        return ds, evals, tokenizer, None
    local = local_batch_size(batch_size, shard.count)
    rows = _shard_rows(kind, path=path, fmt=fmt, tokenizer=tokenizer, shard=shard, seq_len=seq_len,
                       block_size=block_size, text_field=text_field, prompt_field=prompt_field,
                       response_field=response_field, record_type=record_type, packing=packing)
    train, val = split_rows(rows, local_batch=local, val_frac=val_frac, shard=shard, train_rows=train_rows)
    ds = grain.MapDataset.source(ArraySource(train)).shuffle(seed=seed).repeat().batch(local, drop_remainder=True)
    return ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS), _records(val, eval_size), tokenizer, None


def sharded_eval_records(*, kind: str, path: str, fmt: str, tokenizer: Tokenizer, seq_len: int, block_size: int = 0,
                         text_field: str = "text", prompt_field: str = "prompt", response_field: str = "response",
                         record_type: str = "text", eval_size: int = 500, val_frac: float = 0.05,
                         packing: str = "wrap", shard: ProcessShard | None = None) -> list[dict[str, np.ndarray]]:
    """This process's held-out records, the same ones `build_sharded_data` returns, without the train stream.

    A store reads only its held-out rows. A corpus is still tokenized and packed (where a row ends depends on every
    document before it), but the training rows are dropped as they are cut off, no train stream is built and no
    collective runs, so any one process can evaluate alone.
    """
    _check_kind(kind)
    shard = shard or ProcessShard.current()
    if kind == "packed":
        return store_eval_records(path=path, seq_len=seq_len, process_index=shard.index, process_count=shard.count,
                                  eval_size=eval_size, val_frac=val_frac)
    rows = _shard_rows(kind, path=path, fmt=fmt, tokenizer=tokenizer, shard=shard, seq_len=seq_len,
                       block_size=block_size, text_field=text_field, prompt_field=prompt_field,
                       response_field=response_field, record_type=record_type, packing=packing)
    n = len(rows["tokens"])
    return _records({k: v[n - held_out_count(n, val_frac):] for k, v in rows.items()}, eval_size)


def held_out_count(n_rows: int, val_frac: float) -> int:
    """How many of a process's last packed rows are held out: `max(1, round(val_frac * n_rows))`."""
    return max(1, round(val_frac * n_rows))


def _check_kind(kind: str) -> None:
    if kind not in SHARDED_KINDS:
        raise ValueError(f"data.kind={kind!r} is not allowed here; choose one of {list(SHARDED_KINDS)}")


def _shard_rows(kind: str, *, path: str, fmt: str, tokenizer: Tokenizer, shard: ProcessShard, seq_len: int,
                block_size: int, text_field: str, prompt_field: str, response_field: str, record_type: str,
                packing: str) -> dict[str, np.ndarray]:
    index = CorpusIndex.build(path, fmt)
    if kind == "corpus":
        return corpus_rows(index, tokenizer, shard, seq_len=seq_len, block_size=block_size, text_field=text_field,
                           record_type=record_type, packing=packing)
    return sft_rows_of(index, tokenizer, shard, seq_len=seq_len, prompt_field=prompt_field,
                       response_field=response_field)


def _records(rows: dict[str, np.ndarray], limit: int) -> list[dict[str, np.ndarray]]:
    return [{k: v[i] for k, v in rows.items()} for i in range(min(limit, len(rows["tokens"])))]
