"""Local text files as a pre-training corpus of fixed-length rows (MDLM "wrap" packing).

Wrapping (concatenate every document, cut the stream into equal rows) wastes no slot on padding and
gives every row the same shape, so one compiled train step serves the whole corpus. Each row is framed
`[BOS] chunk [EOS]` as in MDLM's wrapped OpenWebText, so the model always sees where a row starts and
ends, and an EOS inside a chunk marks a document boundary.

The validation rows are the last rows of the corpus (the end of the last file in sorted order), a
deterministic split that needs no seed and never overlaps the training rows.
"""
from __future__ import annotations

import dataclasses
import glob
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dlmjax.data.tokenizer import ByteTokenizer
from dlmjax.errors import InputError

TEXT_SUFFIXES = (".txt", ".md")
_BLANK_LINES = re.compile(r"\n\s*\n")  # one or more blank lines


def resolve_text_files(spec: str) -> list[Path]:
    """Files named by `spec`: one file, a directory (recursive *.txt and *.md), or a glob; sorted."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES]
    else:
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    if not files:
        kinds = " or ".join("*" + s for s in TEXT_SUFFIXES)
        raise FileNotFoundError(f"no text files found for data.path={spec!r}; give a file, a directory holding "
                                f"{kinds} files, or a glob such as 'data/**/*.txt'")
    return sorted(files)


def read_documents(files: Sequence[Path], *, split_paragraphs: bool = False) -> list[str]:
    """The documents in `files`: one per file, or one per blank-line-separated paragraph.

    Empty (whitespace-only) documents are dropped so that they do not add bare EOS tokens. Bytes that are
    not valid UTF-8 become U+FFFD rather than stopping a run on one bad file.
    """
    documents = []
    for file in files:
        text = Path(file).read_text(encoding="utf-8", errors="replace")
        parts = _BLANK_LINES.split(text) if split_paragraphs else [text]
        documents.extend(part for part in parts if part.strip())
    return documents


def pack_rows(documents: Sequence[str], tokenizer: ByteTokenizer, seq_len: int) -> np.ndarray:
    """int32 [n_rows, seq_len]: documents (each + EOS) concatenated, cut into `[BOS] chunk(seq_len - 2) [EOS]`.

    The tail shorter than a full chunk is dropped.
    """
    if seq_len < 3:
        raise ValueError(f"seq_len={seq_len} is too short for text rows; it needs at least 3 (BOS, a token, EOS)")
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    pieces = [part for doc in documents for part in (tokenizer.encode_array(doc), eos)]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    chunk = seq_len - 2
    n_rows = len(stream) // chunk
    body = stream[: n_rows * chunk].reshape(n_rows, chunk)
    bos = np.full((n_rows, 1), tokenizer.bos_id, dtype=np.int32)
    return np.concatenate([bos, body, np.full((n_rows, 1), tokenizer.eos_id, dtype=np.int32)], axis=1)


def text_record(row: np.ndarray) -> dict[str, np.ndarray]:
    """One row as a record with the same keys as task rows: `tokens` int32 [L], `prompt_mask` bool [L]
    (all False: nothing is conditioning), `valid_mask` bool [L] (all True: no padding)."""
    row = np.asarray(row, dtype=np.int32)
    return {"tokens": row, "prompt_mask": np.zeros(row.shape, dtype=bool),
            "valid_mask": np.ones(row.shape, dtype=bool)}


@dataclasses.dataclass(frozen=True, eq=False)
class TextCorpus:
    """Packed rows of a text corpus and its train/validation split.

    Attributes:
      rows: int32 [n_rows, seq_len], every row `[BOS] ... [EOS]`.
      n_val: The last `n_val` rows are validation, the rest training.
    """

    rows: np.ndarray
    n_val: int

    @classmethod
    def load(cls, spec: str, *, seq_len: int, tokenizer: ByteTokenizer, val_frac: float = 0.05,
             split_paragraphs: bool = False) -> "TextCorpus":
        """Read, pack and split the files named by `spec` (see `resolve_text_files`).

        The last `max(1, round(val_frac * n_rows))` rows are validation.
        """
        if not 0.0 < val_frac < 1.0:
            raise ValueError(f"val_frac={val_frac!r} must be in (0, 1)")
        files = resolve_text_files(spec)
        rows = pack_rows(read_documents(files, split_paragraphs=split_paragraphs), tokenizer, seq_len)
        n_val = max(1, round(val_frac * len(rows)))
        if len(rows) - n_val < 1:
            raise InputError(f"data.path={spec!r} gives only {len(rows)} row(s) of data.seq_len={seq_len}, too few "
                             f"for a training row and {n_val} validation row(s); add text or lower data.seq_len")
        return cls(rows=rows, n_val=n_val)

    @property
    def seq_len(self) -> int:
        return self.rows.shape[1]

    @property
    def train_rows(self) -> np.ndarray:
        """int32 [n_rows - n_val, seq_len]."""
        return self.rows[: len(self.rows) - self.n_val]

    @property
    def val_rows(self) -> np.ndarray:
        """int32 [n_val, seq_len]."""
        return self.rows[len(self.rows) - self.n_val:]
