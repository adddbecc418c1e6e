"""Corpus files on disk as numbered records, and each process's share of them.

A corpus is the sorted list of files matched by `data.path` (a glob, a directory or one file) in one
`data.format`:

  text          one document per file (any text file; `*.txt`/`*.md` when `data.path` is a directory)
  jsonl         one JSON object per non-blank line; the document is its `data.text_field` (SFT: the
                `prompt_field` and `response_field`)
  parquet       one row per document, the string column `data.text_field` (read with pyarrow)
  array_record  one record per document: UTF-8 text (`data.record_type=text`) or a pre-tokenized document,
                little-endian int32 ids without BOS/EOS (`data.record_type=tokens`)

Records are numbered globally in file order (`CorpusIndex`), from per-file counts that are cheap to get
(Parquet and ArrayRecord metadata; a line count for JSON lines). Process p of c reads records
`[p * m, (p + 1) * m)` with `m = n // c` (`shard_range`): every process gets the same number of documents,
contiguous ranges touch few files per process, and the last `n % c` records are dropped on every process
alike, so no two processes ever read the same record.
"""
from __future__ import annotations

import dataclasses
import glob
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from dlmjax.errors import ConfigError, InputError

FORMATS = ("text", "jsonl", "parquet", "array_record")
RECORD_TYPES = ("text", "tokens")
# Files a directory contributes, per format (a glob or a single file is taken as given).
SUFFIXES = {"text": (".txt", ".md"), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",),
            "array_record": (".array_record", ".arrayrecord")}

Document = str | np.ndarray  # text, or int32 [n] pre-tokenized ids


def resolve_files(spec: str, fmt: str) -> list[Path]:
    """Files named by `spec` (a file, a directory searched recursively for `SUFFIXES[fmt]`, or a glob); sorted."""
    if fmt not in FORMATS:
        raise ConfigError(f"data.format={fmt!r} is not allowed; choose one of {list(FORMATS)}")
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES[fmt]]
    else:
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    if not files:
        raise FileNotFoundError(f"no {fmt} files found for data.path={spec!r}; give a file, a directory holding "
                                f"{' or '.join('*' + s for s in SUFFIXES[fmt])} files, or a glob such as "
                                f"'data/**/*{SUFFIXES[fmt][0]}'")
    return sorted(files)


def _jsonl_lines(path: Path) -> Iterator[str]:
    """The non-blank lines of a JSON lines file, streamed (files may be larger than memory)."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line


def count_records(path: Path, fmt: str) -> int:
    """Number of documents in one file."""
    if fmt == "text":
        return 1
    if fmt == "jsonl":
        return sum(1 for _ in _jsonl_lines(path))
    if fmt == "parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415 (optional dependency)

        return pq.ParquetFile(path).metadata.num_rows
    from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

    reader = ArrayRecordReader(str(path))
    try:
        return reader.num_records()
    finally:
        reader.close()


def _field(obj: dict, name: str, where: str) -> str:
    if not isinstance(obj, dict) or name not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise InputError(f"{where}: no field {name!r} (has {keys}); set the data.*_field option to the right name")
    value = obj[name]
    if not isinstance(value, str):
        raise InputError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def iter_records(path: Path, fmt: str, start: int = 0, stop: int | None = None, *,
                 fields: Sequence[str] = ("text",), record_type: str = "text", chunk: int = 1024) -> Iterator:
    """Documents `[start, stop)` of one file, in one streaming pass (`stop=None`: to the end).

    Yields strings (or int32 arrays for `record_type=tokens`); with several `fields` (SFT: prompt, response)
    tuples of strings, one per field (jsonl and parquet only).
    """
    stop = count_records(path, fmt) if stop is None else stop
    if stop <= start:
        return
    if fmt == "text":
        if len(fields) != 1:
            raise ConfigError(f"data.format=text holds one document per file; fields {list(fields)} need jsonl")
        if start == 0:
            yield path.read_text(encoding="utf-8", errors="replace")
        return
    if fmt == "jsonl":
        for n, line in enumerate(_jsonl_lines(path)):
            if n >= stop:
                return
            if n < start:
                continue
            where = f"{path} record {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where} is not valid JSON: {e}") from e
            values = tuple(_field(obj, f, where) for f in fields)
            yield values if len(fields) > 1 else values[0]
        return
    if fmt == "parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415

        file = pq.ParquetFile(path)
        missing = [f for f in fields if f not in file.schema_arrow.names]
        if missing:
            raise InputError(f"{path}: no column {missing[0]!r} (has {file.schema_arrow.names}); set "
                             "data.text_field (or prompt_field / response_field) to the right column")
        row = 0
        for batch in file.iter_batches(batch_size=chunk, columns=list(fields)):
            lo, hi = max(start - row, 0), min(stop - row, batch.num_rows)
            if lo < hi:
                cols = [batch.column(f).slice(lo, hi - lo).to_pylist() for f in fields]
                yield from (zip(*cols) if len(fields) > 1 else cols[0])
            row += batch.num_rows
            if row >= stop:
                return
        return
    if len(fields) != 1:
        raise ConfigError(f"data.format=array_record holds one document per record; fields {list(fields)} need jsonl")
    from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

    reader = ArrayRecordReader(str(path))
    try:
        for lo in range(start, stop, chunk):
            for r in reader.read(lo, min(lo + chunk, stop)):
                yield (np.frombuffer(r, dtype="<i4").astype(np.int32) if record_type == "tokens"
                       else r.decode("utf-8", errors="replace"))
    finally:
        reader.close()


def shard_range(n_records: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Global record range `[start, stop)` of one process: equal sizes `n // count`, remainder dropped."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    per = n_records // process_count
    if per == 0:
        raise InputError(f"the corpus has {n_records} documents, fewer than the {process_count} processes reading it")
    return process_index * per, (process_index + 1) * per


def local_batch_size(batch_size: int, process_count: int) -> int:
    """Rows per process of a global batch (each process reads its own)."""
    if batch_size % process_count:
        raise ConfigError(f"data.batch_size={batch_size} must be a multiple of the {process_count} processes "
                         "(each process reads batch_size / process_count rows)")
    return batch_size // process_count


@dataclasses.dataclass(frozen=True)
class CorpusIndex:
    """The files of a corpus and their record counts; record i is global (file order, then record order)."""

    files: tuple[Path, ...]
    counts: tuple[int, ...]
    fmt: str

    @classmethod
    def build(cls, spec: str, fmt: str) -> "CorpusIndex":
        files = tuple(resolve_files(spec, fmt))
        return cls(files, tuple(count_records(f, fmt) for f in files), fmt)

    def __len__(self) -> int:
        return sum(self.counts)

    def iter(self, start: int = 0, stop: int | None = None, **kwargs) -> Iterator:
        """Global records `[start, stop)`, streamed file by file, opening only the files that hold them."""
        stop = len(self) if stop is None else stop
        offset = 0
        for file, count in zip(self.files, self.counts):
            lo, hi = max(start - offset, 0), min(stop - offset, count)
            if lo < hi:
                yield from iter_records(file, self.fmt, lo, hi, **kwargs)
            offset += count

    def read(self, start: int, stop: int, **kwargs) -> list:
        """Global records `[start, stop)` as a list."""
        return list(self.iter(start, stop, **kwargs))

    def read_shard(self, process_index: int, process_count: int, **kwargs) -> list:
        """This process's documents (see `shard_range`)."""
        return self.read(*shard_range(len(self), process_index, process_count), **kwargs)
