"""Tokenizers behind one small interface: the byte-level default, Hugging Face `tokenizer.json`, SentencePiece.

Every tokenizer has `encode(text, *, bos, eos) -> list[int]`, `encode_array(text) -> int32 [n]`,
`decode(ids, *, stop_at_eos)`, `vocab_size` (its own ids), `pad_id`, `bos_id`, `eos_id`, `mask_id` and
`model_vocab_size` (the embedding rows a model needs). The mask id rule (as MDLM): a tokenizer that has a mask
token uses it; one that has none gets `mask_id = vocab_size` and the model vocabulary grows by one
(`model_vocab_size = vocab_size + 1`). `load_tokenizer(spec)` picks one from `data.tokenizer`.

The byte-level tokenizer: UTF-8 bytes plus four special ids.

Bytes need no vocabulary file, cover every language, and keep the toy tasks' layout exact (one
character of a task prompt is one token), which is what a small diffusion model needs to be tested
on arithmetic and Sudoku. The special ids sit above the 256 byte values:

  PAD  = 256  filler that carries no signal (rows padded for static shapes)
  BOS  = 257  start of a sequence
  EOS  = 258  end of a document / answer; SFT rows are right-padded with it
  MASK = 259  the absorbing "masked" state of the diffusion forward process
"""
from __future__ import annotations

import abc
import dataclasses
import errno
import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from dlmjax.errors import ConfigError

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
    model_vocab_size: ClassVar[int] = VOCAB_SIZE  # the mask id is already inside the vocabulary
    name: ClassVar[str] = "byte"

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

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode_array` of each text."""
        return [self.encode_array(t) for t in texts]

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


class Tokenizer(Protocol):
    """What the data pipelines and samplers need from a tokenizer (see the module docstring)."""

    name: str
    vocab_size: int
    model_vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...
    def encode_array(self, text: str) -> np.ndarray: ...
    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]: ...
    def decode(self, ids, *, stop_at_eos: bool = True) -> str: ...


# Spellings of special tokens in common tokenizer.json files, most specific first.
_HF_SPECIALS = {
    "bos": ("<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>", "[CLS]", "<|im_start|>"),
    "eos": ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[SEP]", "<|eot_id|>", "<|im_end|>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "mask": ("<|mdm_mask|>", "<|mask|>", "<mask>", "[MASK]"),
}


class _SubwordTokenizer(abc.ABC):
    """Shared special-id handling of the file-based tokenizers; subclasses provide `_encode` / `_decode`."""

    name: str

    def __init__(self, vocab_size: int, *, bos_id: int, eos_id: int, pad_id: int | None, mask_id: int | None):
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id = bos_id, eos_id
        # No pad token: padding slots are never attended to or scored, so EOS serves (as GPT-2 and LLaDA SFT do).
        self.pad_id = eos_id if pad_id is None else pad_id
        self.mask_id = vocab_size if mask_id is None else mask_id
        self.model_vocab_size = max(vocab_size, self.mask_id + 1)
        self._specials = np.array(sorted({self.bos_id, self.eos_id, self.pad_id, self.mask_id}), dtype=np.int64)

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Ids of `text`, no specials added."""

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Text of ids (specials already removed)."""

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text` (no specials added by the tokenizer itself), optionally framed by BOS and EOS."""
        return [self.bos_id] * bos + self._encode(text) + [self.eos_id] * eos

    def encode_array(self, text: str) -> np.ndarray:
        """int32 [n] ids of `text`, without specials."""
        return np.asarray(self._encode(text), dtype=np.int32)

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode_array` of each text, on all cores (both libraries encode a batch in native threads)."""
        return [np.asarray(ids, dtype=np.int32) for ids in self._encode_batch(list(texts))]

    @abc.abstractmethod
    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`_encode` of each text, in the library's parallel batch call."""

    def decode(self, ids: Iterable[int] | np.ndarray, *, stop_at_eos: bool = True) -> str:
        """Text of a 1-D id sequence; special ids dropped, and everything from the first EOS with `stop_at_eos`."""
        flat = np.asarray(ids).astype(np.int64)
        if flat.ndim != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got shape {flat.shape}; decode rows one at a time")
        bad = flat[(flat < 0) | (flat >= self.model_vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.model_vocab_size})")
        if stop_at_eos:
            eos_at = np.flatnonzero(flat == self.eos_id)
            if eos_at.size:
                flat = flat[: eos_at[0]]
        return self._decode([int(i) for i in flat[~np.isin(flat, self._specials)]])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id}, mask={self.mask_id})")


class HFTokenizer(_SubwordTokenizer):
    """A Hugging Face `tokenizer.json` (any model the `tokenizers` package reads: BPE, WordPiece, Unigram).

    Special tokens are found by their usual spellings (`_HF_SPECIALS`): EOS is required; a missing BOS is EOS
    (GPT-2 style), a missing PAD is EOS, a missing mask token is `vocab_size` (see the module docstring).
    """

    def __init__(self, path: str | Path):
        import tokenizers  # noqa: PLC0415 (optional dependency, only for tokenizer.json files)

        self.name = str(path)
        self._tok = tokenizers.Tokenizer.from_file(str(path))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        found = {role: next((vocab[t] for t in names if t in vocab), None) for role, names in _HF_SPECIALS.items()}
        if found["eos"] is None:
            raise ConfigError(f"data.tokenizer={str(path)!r} has no end-of-sequence token; add one of "
                             f"{list(_HF_SPECIALS['eos'])} to it (documents are separated by EOS)")
        bos = found["eos"] if found["bos"] is None else found["bos"]
        super().__init__(self._tok.get_vocab_size(with_added_tokens=True), bos_id=bos, eos_id=found["eos"],
                         pad_id=found["pad"], mask_id=found["mask"])

    def _encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


class SentencePieceTokenizer(_SubwordTokenizer):
    """A SentencePiece `.model` file. BOS/EOS/PAD come from the model (`bos_id()`...; a disabled PAD is EOS);
    the mask token is a `<mask>` piece if the model defines one, else `vocab_size`."""

    def __init__(self, path: str | Path):
        import sentencepiece  # noqa: PLC0415 (optional dependency, only for .model files)

        self.name = str(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        sp = self._sp
        if sp.eos_id() < 0 or sp.bos_id() < 0:
            raise ConfigError(f"data.tokenizer={str(path)!r} (SentencePiece) has bos_id={sp.bos_id()}, eos_id={sp.eos_id()}; "
                             "train it with bos_id and eos_id >= 0 (the pipelines frame documents with them)")
        mask = sp.piece_to_id("<mask>")
        mask = None if mask == sp.unk_id() else mask
        super().__init__(sp.get_piece_size(), bos_id=sp.bos_id(), eos_id=sp.eos_id(),
                         pad_id=sp.pad_id() if sp.pad_id() >= 0 else None, mask_id=mask)

    def _encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int, num_threads=-1)

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


TOKENIZER_KINDS = ("byte", "a path to tokenizer.json (Hugging Face)", "a path to a SentencePiece .model")


def load_tokenizer(spec: str = "byte") -> Tokenizer:
    """`data.tokenizer` -> a tokenizer: "byte", a `*.json` file (Hugging Face) or a `*.model` file (SentencePiece).

    A file that is missing raises `FileNotFoundError` (with its name); one the library cannot read, or that lacks
    the special tokens the pipelines need, a `ConfigError` naming `data.tokenizer`.
    """
    if spec in ("", "byte"):
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.suffix not in (".json", ".model"):
        raise ConfigError(f"data.tokenizer={spec!r} is not allowed; use one of: {'; '.join(TOKENIZER_KINDS)}",
                          field="data.tokenizer")
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"data.tokenizer={spec!r}: no such file", str(path))
    kind = HFTokenizer if path.suffix == ".json" else SentencePieceTokenizer
    try:
        return kind(path)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - both libraries raise plain Exceptions (or RuntimeError) on a bad file
        raise ConfigError(f"data.tokenizer={spec!r} cannot be read as a {kind.__name__} file: "
                          f"{' '.join(str(e).split())[:300]}", field="data.tokenizer") from e


def check_model_vocab(tokenizer: Tokenizer, *, vocab_size: int, mask_id: int) -> None:
    """Raise a `ConfigError` naming `model.vocab_size` / `diffusion.mask_id` when they disagree with `tokenizer`.

    The mask id must be the tokenizer's own mask id: any other id is either a real token of the data (the model
    would learn to predict the mask from it) or outside the tokenizer's ids.
    """
    if vocab_size < tokenizer.model_vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} is too small for data.tokenizer={tokenizer.name!r}: "
                          f"set model.vocab_size={tokenizer.model_vocab_size} (its ids and the mask id)",
                          field="model.vocab_size")
    if mask_id != tokenizer.mask_id:
        real = " (a token the data uses)" if 0 <= mask_id < tokenizer.vocab_size else ""
        raise ConfigError(f"diffusion.mask_id={mask_id}{real} is not the mask id of data.tokenizer="
                          f"{tokenizer.name!r}: set diffusion.mask_id={tokenizer.mask_id}", field="diffusion.mask_id")


def encode_in_chunks(tokenizer: Tokenizer, texts: Iterable[str], chunk: int = 1024) -> Iterator[np.ndarray]:
    """Token ids (`encode_array`) of each text of a stream, encoded `chunk` texts at a time: the subword
    libraries spread a batch over every core."""
    texts = iter(texts)
    while batch := list(itertools.islice(texts, chunk)):
        yield from tokenizer.encode_arrays(batch)
