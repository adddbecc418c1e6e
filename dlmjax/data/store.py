"""Packed rows on disk (`dlmjax pack`, `data.kind=packed`): tokenize and pack a corpus once, train from it many times.

`data.kind=corpus` tokenizes and packs each process's shard in memory at start-up: simple, and fine up to a few
GB of text per process. For pre-training corpora `write_store` streams the documents of a corpus through the
tokenizer (in batches, on every core) and the packer (`packing.iter_packed_rows`, one row in memory) into
ArrayRecord files of rows; training then reads rows by index (`PackedRowSource`), so start-up is instant and
memory does not grow with the corpus.

A store is a directory:
  meta.json                     what the rows are: seq_len, block_size, packing mode, tokenizer ids, row counts
  rows-00000.array_record ...   one record per row: int32 little-endian `[2, L]` = tokens, segment ids
It is written under `<dir>.partial` and renamed when complete, so a store that exists is whole.

Rows `[0, n - n_val)` are for training and the last `n_val = max(processes, round(val_frac * n))` are held out.
Process p of c reads train rows `shard_range(n_train, p, c)` (equal counts, disjoint) and held-out rows
`shard_range(n_val, p, c)`. The train stream is `shuffle(seed) -> repeat -> decode -> batch` over the process's
rows: endless, so every process yields the same number of batches, and its iterator state (one position) is
checkpointed with the train state.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grain
import numpy as np
from tqdm.auto import tqdm

from dlmjax.data.pipeline import DEFAULT_READ_OPTIONS
from dlmjax.data.formats import CorpusIndex, local_batch_size, shard_range
from dlmjax.data.packing import iter_packed_rows, row_record
from dlmjax.data.tokenizer import Tokenizer, encode_in_chunks
from dlmjax.errors import ConfigError, InputError

META = "meta.json"
STORE_FORMAT = "dlmjax-packed-rows/1"


@dataclasses.dataclass(frozen=True)
class StoreMeta:
    """The contents of `meta.json`."""

    seq_len: int
    block_size: int
    packing: str
    tokenizer: str
    model_vocab_size: int
    mask_id: int
    pad_id: int
    bos_id: int
    eos_id: int
    n_rows: int
    n_documents: int
    real_tokens: int
    files: tuple[tuple[str, int], ...]  # (file name, rows)
    format: str = STORE_FORMAT

    @classmethod
    def read(cls, directory: str | Path) -> "StoreMeta":
        path = Path(directory).expanduser() / META
        if not path.is_file():
            raise FileNotFoundError(2, f"data.path={str(directory)!r} is not a packed-row store (no {META}); write "
                                       "one with `dlmjax pack --config C --out DIR`", str(path))
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path} is not valid JSON ({e}); repack the corpus") from e
        if not isinstance(raw, dict) or raw.get("format") != STORE_FORMAT:
            raw = raw if isinstance(raw, dict) else {}
            raise InputError(f"{path}: format {raw.get('format')!r} is not {STORE_FORMAT!r}; repack the corpus")
        raw["files"] = tuple((str(name), int(rows)) for name, rows in raw["files"])
        return cls(**raw)


def _document_ids(index: CorpusIndex, tokenizer: Tokenizer, *, text_field: str, record_type: str,
                  chunk: int = 1024) -> Iterator[np.ndarray]:
    docs = index.iter(fields=(text_field,), record_type=record_type)
    return docs if record_type == "tokens" else encode_in_chunks(tokenizer, docs, chunk)


def write_store(index: CorpusIndex, tokenizer: Tokenizer, out: str | Path, *, seq_len: int, block_size: int = 0,
                packing: str = "wrap", text_field: str = "text", record_type: str = "text",
                rows_per_file: int = 65536, progress: bool = True) -> StoreMeta:
    """Tokenize and pack every document of `index` into a store at `out` (which must not exist)."""
    from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415

    out = Path(out).expanduser()
    if out.exists():
        raise FileExistsError(f"--out {str(out)!r} exists; choose a new directory (a store is never overwritten)")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # an interrupted earlier attempt
    partial.mkdir(parents=True)
    files: list[tuple[str, int]] = []
    n_rows = real = 0
    writer = None
    bar = tqdm(total=len(index), unit="doc", desc="pack", disable=not progress, dynamic_ncols=True)

    def counted(ids_iter):
        for ids in ids_iter:
            bar.update(1)
            yield ids

    ids = counted(_document_ids(index, tokenizer, text_field=text_field, record_type=record_type))
    try:
        for tokens, segs in iter_packed_rows(ids, seq_len=seq_len, block_size=block_size, pad_id=tokenizer.pad_id,
                                             bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, mode=packing):
            if writer is None or files[-1][1] == rows_per_file:
                if writer is not None:
                    writer.close()
                files.append((f"rows-{len(files):05d}.array_record", 0))
                # group_size:1 makes every row its own chunk: cheap random access for the shuffled reader
                writer = ArrayRecordWriter(str(partial / files[-1][0]), "group_size:1")
            writer.write(np.stack([tokens, segs]).astype("<i4").tobytes())
            files[-1] = (files[-1][0], files[-1][1] + 1)
            n_rows += 1
            real += int((segs > 0).sum())
    finally:
        if writer is not None:
            writer.close()
        bar.close()
    if n_rows == 0:
        shutil.rmtree(partial)
        raise InputError(f"no documents to pack in {index.files[0] if index.files else 'the corpus'}")
    meta = StoreMeta(seq_len=seq_len, block_size=block_size, packing=packing, tokenizer=tokenizer.name,
                     model_vocab_size=tokenizer.model_vocab_size, mask_id=tokenizer.mask_id, pad_id=tokenizer.pad_id,
                     bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, n_rows=n_rows, n_documents=len(index),
                     real_tokens=real, files=tuple(files))
    (partial / META).write_text(json.dumps(dataclasses.asdict(meta), indent=1))
    os.replace(partial, out)  # atomic: the store appears whole or not at all
    return meta


@dataclasses.dataclass(frozen=True, eq=False)
class PackedRowSource:
    """Random access to rows `[start, stop)` of a store: record i is `{tokens, segment_ids}` int32 `[L]`."""

    directory: str
    start: int
    stop: int
    seq_len: int

    def __post_init__(self):
        meta = StoreMeta.read(self.directory)
        paths = [str(Path(self.directory) / name) for name, _ in meta.files]
        object.__setattr__(self, "_source", grain.sources.ArrayRecordDataSource(paths))

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        raw = self._source[self.start + int(index)]
        rows = np.frombuffer(raw, dtype="<i4").reshape(2, self.seq_len)
        return {"tokens": rows[0].astype(np.int32), "segment_ids": rows[1].astype(np.int32)}

    def __repr__(self) -> str:  # grain writes the source's repr into checkpoints
        return f"PackedRowSource({self.directory!r}, rows [{self.start}, {self.stop}))"


def split_store(meta: StoreMeta, *, process_index: int, process_count: int, val_frac: float
                ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Global row ranges (train, held-out) of one process (see the module docstring)."""
    n_val = max(process_count, round(val_frac * meta.n_rows))
    n_train = meta.n_rows - n_val
    if n_train < process_count:
        raise InputError(f"the store has {meta.n_rows} rows: too few for {process_count} processes and {n_val} "
                         "held-out rows; pack more data")
    lo, hi = shard_range(n_train, process_index, process_count)
    vlo, vhi = shard_range(n_val, process_index, process_count)
    return (lo, hi), (n_train + vlo, n_train + vhi)


def _decode(record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return row_record(record["tokens"], record["segment_ids"])


def build_store_data(*, path: str, seq_len: int, batch_size: int, seed: int, process_index: int,
                     process_count: int, eval_size: int = 500, val_frac: float = 0.05,
                     read_options: grain.ReadOptions | None = None):
    """(train stream of local `[batch_size / count, L]` batches, local eval records) of a store."""
    meta = StoreMeta.read(path)
    if meta.seq_len != seq_len:
        raise ConfigError(f"data.seq_len={seq_len} does not match the store's rows of {meta.seq_len} tokens "
                         f"({path}); set data.seq_len={meta.seq_len} or repack")
    local = local_batch_size(batch_size, process_count)
    (lo, hi), (vlo, vhi) = split_store(meta, process_index=process_index, process_count=process_count,
                                       val_frac=val_frac)
    if hi - lo < local:
        raise InputError(f"process {process_index} of {process_count} has {hi - lo} training rows, fewer than one "
                         f"local batch of {local}; pack more data or lower data.batch_size")
    train = grain.MapDataset.source(PackedRowSource(str(path), lo, hi, seq_len))
    ds = train.shuffle(seed=seed).repeat().map(_decode).batch(local, drop_remainder=True)
    evals = _held_out_records(path, vlo, vhi, seq_len, eval_size)
    return ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS), evals


def store_eval_records(*, path: str, seq_len: int, process_index: int, process_count: int, eval_size: int = 500,
                       val_frac: float = 0.05) -> list[dict[str, np.ndarray]]:
    """This process's held-out records of a store (the ones `build_store_data` returns), reading only those."""
    meta = StoreMeta.read(path)
    if meta.seq_len != seq_len:
        raise ConfigError(f"data.seq_len={seq_len} does not match the store's rows of {meta.seq_len} tokens "
                          f"({path}); set data.seq_len={meta.seq_len} or repack")
    _, (vlo, vhi) = split_store(meta, process_index=process_index, process_count=process_count, val_frac=val_frac)
    return _held_out_records(path, vlo, vhi, seq_len, eval_size)


def _held_out_records(path: str, lo: int, hi: int, seq_len: int, eval_size: int) -> list[dict[str, np.ndarray]]:
    held_out = PackedRowSource(str(path), lo, hi, seq_len)
    return [_decode(held_out[i]) for i in range(min(eval_size, len(held_out)))]


def check_store(meta: StoreMeta, cfg) -> None:
    """Raise a `ConfigError` naming the config field that disagrees with a store (vocabulary, mask id, rows, blocks)."""
    if cfg.model.vocab_size < meta.model_vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is too small for the store's tokenizer "
                         f"{meta.tokenizer!r}: set model.vocab_size={meta.model_vocab_size}")
    if cfg.diffusion.mask_id != meta.mask_id:
        raise ConfigError(f"diffusion.mask_id={cfg.diffusion.mask_id} is not the mask id of the store's tokenizer "
                         f"{meta.tokenizer!r}: set diffusion.mask_id={meta.mask_id}")
    if cfg.data.seq_len != meta.seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} does not match the store's rows of {meta.seq_len} tokens: "
                         f"set data.seq_len={meta.seq_len}")
    block = cfg.diffusion.block_size
    if block and (meta.block_size == 0 or meta.block_size % block):
        raise ConfigError(f"diffusion.block_size={block} needs documents aligned to multiples of {block}, but the "
                         f"store was packed with block_size={meta.block_size}; repack with diffusion.block_size="
                         f"{block} (or a multiple of it)")


def pack_corpus(cfg, out: str | Path, *, rows_per_file: int = 65536) -> dict:
    """`dlmjax pack`: tokenize and pack the corpus of a `data.kind=corpus` config into a store at `out`.

    Returns a summary (rows, documents, real tokens, fill, files). The config's vocabulary is checked against the
    tokenizer before anything is read.
    """
    from dlmjax.data.formats import CorpusIndex  # noqa: PLC0415
    from dlmjax.data.tokenizer import check_model_vocab, load_tokenizer  # noqa: PLC0415

    d = cfg.data
    if d.kind != "corpus":
        raise ConfigError(f"dlmjax pack reads a corpus: data.kind={d.kind!r} must be 'corpus' (with data.path, "
                          "data.format and data.tokenizer)", field="data.kind")
    tokenizer = load_tokenizer(d.tokenizer)
    check_model_vocab(tokenizer, vocab_size=cfg.model.vocab_size, mask_id=cfg.diffusion.mask_id)
    meta = write_store(CorpusIndex.build(d.path, d.format), tokenizer, out, seq_len=d.seq_len,
                       block_size=cfg.diffusion.block_size, packing=d.packing, text_field=d.text_field,
                       record_type=d.record_type, rows_per_file=rows_per_file)
    fill = meta.real_tokens / (meta.n_rows * meta.seq_len)
    return {"out": str(out), "rows": meta.n_rows, "documents": meta.n_documents, "tokens": meta.real_tokens,
            "fill": round(fill, 4), "files": len(meta.files)}
