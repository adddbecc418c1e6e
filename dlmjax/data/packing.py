"""Documents packed into fixed-length rows with segment ids, and SFT rows with a prompt mask.

Packing (pre-training). Each document is framed `[BOS] ids [EOS]` and laid down in corpus order (deterministic
and cheap), in one of two modes:

  wrap  (default) fill every row to the end: a document that does not fit in what is left of a row is cut there
        and continues in the next row as a new segment (as MDLM / LLaDA concatenate and cut their corpora, but
        the cut pieces never attend to each other). Rows are full up to block-alignment padding.
  fit   a document that does not fit starts a new row (next-fit), so documents shorter than a row are never
        cut; the rest of the row is padding (bench/data.py measures what that costs: ~20% of the slots on
        web-like documents at 1024 tokens).

A framed document longer than a row is cut into row-sized pieces in both modes. Each piece is its own segment:
within a row, piece k has `segment_ids == k` (1-based) and `positions` 0, 1, ... (restarting per piece), so with
the model's segment mask a piece's logits do not depend on its neighbours. With a diffusion block size B > 0
every piece starts at a multiple of B and the rest of its last block is padding, so no block straddles two
pieces (BD3's block times and block-causal mask then apply per document). Padding slots have `pad_id`,
segment 0, position 0 and `valid_mask` False: never noised, attended to or scored.

SFT. One example per row: `[BOS] prompt response [EOS] [EOS]...`; `prompt_mask` covers BOS and the prompt (the
forward process never masks it), the EOS padding is a target (LLaDA SFT: the model learns where to stop).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from dlmjax.errors import ConfigError, InputError

PACKED_KEYS = ("tokens", "prompt_mask", "valid_mask", "segment_ids", "positions")
PACKING_MODES = ("wrap", "fit")


def _framed(doc: np.ndarray, bos_id: int, eos_id: int) -> np.ndarray:
    return np.concatenate([[bos_id], np.asarray(doc, np.int32), [eos_id]]).astype(np.int32)


def iter_packed_rows(documents: Iterable[np.ndarray], *, seq_len: int, block_size: int = 0, pad_id: int,
                     bos_id: int, eos_id: int, mode: str = "wrap") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows of packed documents, one at a time: `(tokens, segment_ids)`, int32 `[L]` each (see the module
    docstring; `row_record` adds positions and masks). Streams: holds one row, however long the corpus."""
    if block_size < 0 or (block_size and seq_len % block_size):
        raise ValueError(f"block_size={block_size} must be 0 or divide seq_len={seq_len}")
    if mode not in PACKING_MODES:
        raise ConfigError(f"data.packing={mode!r} is not allowed; choose one of {list(PACKING_MODES)}")
    unit = block_size or 1
    tokens = segs = None
    used = n_segs = seq_len  # no row yet: "full"
    for doc in documents:
        rest = _framed(doc, bos_id, eos_id)
        while len(rest):
            room = seq_len - used
            if room == 0 or (mode == "fit" and len(rest) > room and len(rest) <= seq_len) or (
                    mode == "fit" and len(rest) > seq_len and used):
                if tokens is not None:
                    yield tokens, segs
                tokens, segs = np.full(seq_len, pad_id, np.int32), np.zeros(seq_len, np.int32)
                used = n_segs = 0
                room = seq_len
            piece, rest = rest[:room], rest[room:]
            n_segs += 1
            tokens[used: used + len(piece)] = piece
            segs[used: used + len(piece)] = n_segs
            used = min(seq_len, used + -(-len(piece) // unit) * unit)  # the next piece starts on a block boundary
    if tokens is not None:
        yield tokens, segs


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 in every segment (and 0 on padding) of `[..., L]` segment ids."""
    seg = np.asarray(segment_ids)
    idx = np.broadcast_to(np.arange(seg.shape[-1]), seg.shape)
    new = np.ones(seg.shape, bool)
    new[..., 1:] = seg[..., 1:] != seg[..., :-1]
    starts = np.maximum.accumulate(np.where(new, idx, 0), axis=-1)
    return np.where(seg > 0, idx - starts, 0).astype(np.int32)


def row_record(tokens: np.ndarray, segment_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The batch record of packed rows `[..., L]`: tokens, segment_ids, positions, valid_mask, prompt_mask."""
    segment_ids = np.asarray(segment_ids, np.int32)
    valid = segment_ids > 0
    return {"tokens": np.asarray(tokens, np.int32), "segment_ids": segment_ids,
            "positions": segment_positions(segment_ids), "valid_mask": valid, "prompt_mask": np.zeros_like(valid)}


def pack_documents(documents: Iterable[np.ndarray], *, seq_len: int, block_size: int = 0, pad_id: int,
                   bos_id: int, eos_id: int, mode: str = "wrap") -> dict[str, np.ndarray]:
    """Pack token-id documents (int [n] each, without BOS/EOS) into rows, all in memory.

    Args:
      documents: token ids of each document.
      seq_len: row length L.
      block_size: diffusion block size B (0: no alignment); must divide L.
      mode: `wrap` (cut documents at row ends) or `fit` (start a new row instead); see the module docstring.
    Returns:
      A dict of `[n_rows, L]` arrays: `tokens` int32, `segment_ids` int32 (0 on padding), `positions` int32,
      `valid_mask` bool, `prompt_mask` bool (all False).
    """
    rows = list(iter_packed_rows(documents, seq_len=seq_len, block_size=block_size, pad_id=pad_id,
                                 bos_id=bos_id, eos_id=eos_id, mode=mode))
    if not rows:
        raise InputError("no documents to pack: the corpus (data.path) holds no document")
    return row_record(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))


def sft_row(prompt: np.ndarray, response: np.ndarray, *, seq_len: int, bos_id: int, eos_id: int
            ) -> dict[str, np.ndarray] | None:
    """`[BOS] prompt response [EOS]...` as a record (`tokens`, `prompt_mask`, `valid_mask` of length L),
    or None if it does not fit with at least one EOS."""
    prompt, response = np.asarray(prompt, np.int32), np.asarray(response, np.int32)
    n_prompt = 1 + len(prompt)
    if n_prompt + len(response) + 1 > seq_len:
        return None
    tokens = np.full(seq_len, eos_id, np.int32)
    tokens[0] = bos_id
    tokens[1:n_prompt] = prompt
    tokens[n_prompt: n_prompt + len(response)] = response
    prompt_mask = np.arange(seq_len) < n_prompt
    return {"tokens": tokens, "prompt_mask": prompt_mask, "valid_mask": np.ones(seq_len, bool)}


def sft_rows(pairs: Sequence[tuple[np.ndarray, np.ndarray]], *, seq_len: int, bos_id: int, eos_id: int
             ) -> tuple[dict[str, np.ndarray], int]:
    """SFT records stacked into `[n_rows, L]` arrays, and the number of examples dropped for being too long."""
    rows = [sft_row(p, r, seq_len=seq_len, bos_id=bos_id, eos_id=eos_id) for p, r in pairs]
    kept = [r for r in rows if r is not None]
    if not kept:
        raise InputError(f"none of the {len(pairs)} SFT examples fits in data.seq_len={seq_len} "
                         "(BOS + prompt + response + EOS); raise data.seq_len")
    return {k: np.stack([r[k] for r in kept]) for k in kept[0]}, len(rows) - len(kept)
