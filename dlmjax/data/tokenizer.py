"""A byte-level tokenizer: UTF-8 bytes plus four special ids.

Bytes need no vocabulary file, cover every language, and keep the toy tasks' layout exact (one
character of a task prompt is one token), which is what a small diffusion model needs to be tested
on arithmetic and Sudoku. The special ids sit above the 256 byte values:

  PAD  = 256  filler that carries no signal (rows padded for static shapes)
  BOS  = 257  start of a sequence
  EOS  = 258  end of a document / answer; SFT rows are right-padded with it
  MASK = 259  the absorbing "masked" state of the diffusion forward process
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import ClassVar

import numpy as np

NUM_BYTES = 256
PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
MASK_ID = 259
VOCAB_SIZE = 260


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then PAD, BOS, EOS, MASK (ids 256..259).

    The ids are class constants rather than fields: a tokenizer with other ids would silently
    disagree with `ModelConfig.vocab_size` and `DiffusionConfig.mask_id`.
    """

    pad_id: ClassVar[int] = PAD_ID
    bos_id: ClassVar[int] = BOS_ID
    eos_id: ClassVar[int] = EOS_ID
    mask_id: ClassVar[int] = MASK_ID
    vocab_size: ClassVar[int] = VOCAB_SIZE

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`: its UTF-8 bytes, optionally framed by BOS and EOS."""
        ids = list(text.encode("utf-8"))
        if bos:
            ids.insert(0, BOS_ID)
        if eos:
            ids.append(EOS_ID)
        return ids

    def encode_array(self, text: str) -> np.ndarray:
        """int32 [n_bytes] ids of `text`, without specials.

        A fast path for corpora: a Python list per byte costs ~50x more than a view of the bytes.
        """
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray, *, stop_at_eos: bool = True) -> str:
        """Text of a 1-D id sequence (list, numpy or jax array of shape [n]).

        Special ids (PAD, BOS, MASK and EOS) are dropped; with `stop_at_eos` everything from the first
        EOS on is dropped too. Bytes that are not valid UTF-8 (a model may emit any byte) become
        U+FFFD instead of raising.
        """
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got shape {arr.shape}; "
                             "decode rows one at a time")
        flat = arr.astype(np.int64)
        bad = flat[(flat < 0) | (flat >= VOCAB_SIZE)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {VOCAB_SIZE})")
        if stop_at_eos:
            eos_at = np.flatnonzero(flat == EOS_ID)
            if eos_at.size:
                flat = flat[: eos_at[0]]
        data = flat[flat < NUM_BYTES].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")
