"""Attention masks as index rules, and the per-tile map that lets the kernels skip empty tiles.

This is the one definition of dlmjax's attention structures: the models (`dlmjax.models.attention`), the BD3
training objective (`dlmjax.diffusion`) and the kernels all use these classes.

A mask is a small frozen (hashable, hence jit-static) dataclass with `allowed(q_idx, kv_idx)` written with
operators only, so one rule runs on numpy arrays (tile maps, dense twins) and on jnp index tiles inside a
Pallas kernel. Each mask also answers, for whole index rectangles at once, "is any / is every pair allowed",
from its structure alone: that is what `tile_map` needs, and it never builds an L x L array.

Tile classes: EMPTY (0) tiles are skipped (no compute, no DMA), PARTIAL (1) tiles evaluate the mask,
FULL (2) tiles run without mask arithmetic.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax import lax

EMPTY, PARTIAL, FULL = 0, 1, 2


def _div(x, d: int):
    """Floor division of non-negative indices. On jax values this is `lax.div` (truncating, the same for
    x >= 0): jnp's `//` adds sign fix-ups whose Mosaic lowering needs a real TPU to query."""
    if isinstance(x, jax.Array):
        return lax.div(x, jax.numpy.asarray(d, x.dtype))
    return x // d


def _positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{owner}: {name}={value!r} must be a positive int")


@dataclasses.dataclass(frozen=True)
class Mask:
    """Base class. Subclasses define `allowed` and `rect_any_all`."""

    def allowed(self, q_idx, kv_idx):  # pragma: no cover - abstract
        raise NotImplementedError

    def rect_any_all(self, q_lo, q_hi, kv_lo, kv_hi):  # pragma: no cover - abstract
        """For inclusive index rectangles (numpy int arrays, broadcast together): (any allowed, all allowed)."""
        raise NotImplementedError

    def dense(self, q_len: int, kv_len: int, xp=np):
        """bool[q_len, kv_len], True = may attend, from `xp` (numpy or jax.numpy) index arrays. Small lengths only
        (tests, reference twins, the dense XLA attention path)."""
        q = xp.arange(q_len)[:, None]
        kv = xp.arange(kv_len)[None, :]
        return xp.broadcast_to(xp.asarray(self.allowed(q, kv), bool), (q_len, kv_len))


@dataclasses.dataclass(frozen=True)
class _Monotone(Mask):
    """Masks whose `allowed` only gains pairs as q grows and only loses them as kv grows.

    For such a rule a rectangle is all-allowed iff its (lowest q, highest kv) corner is, and has some allowed
    pair iff its (highest q, lowest kv) corner does.
    """

    def rect_any_all(self, q_lo, q_hi, kv_lo, kv_hi):
        return np.asarray(self.allowed(q_hi, kv_lo), bool), np.asarray(self.allowed(q_lo, kv_hi), bool)


@dataclasses.dataclass(frozen=True)
class Full(_Monotone):
    """Bidirectional attention over every key (MDLM, LLaDA, Dream)."""

    def allowed(self, q_idx, kv_idx):
        return (q_idx >= 0) & (kv_idx >= 0)


@dataclasses.dataclass(frozen=True)
class Causal(_Monotone):
    """Query i sees keys <= i + offset (offset > 0 for queries that continue a prefix)."""

    offset: int = 0

    def allowed(self, q_idx, kv_idx):
        return kv_idx <= q_idx + self.offset


@dataclasses.dataclass(frozen=True)
class BlockCausal(_Monotone):
    """Bidirectional inside blocks of `block_size`, causal across blocks: q // B >= kv // B."""

    block_size: int

    def __post_init__(self):
        _positive_int("BlockCausal", "block_size", self.block_size)

    def allowed(self, q_idx, kv_idx):
        return _div(q_idx, self.block_size) >= _div(kv_idx, self.block_size)


@dataclasses.dataclass(frozen=True)
class Bd3Training(Mask):
    """BD3-LM's training mask over `[x_t ; x_0]` (2 * length slots; queries and keys index that input).

    With n = length and B = block_size: noisy queries (q < n) see noisy keys of their own block (block
    diagonal) and clean keys (kv >= n) of strictly earlier blocks; clean queries see clean keys of the same or
    earlier blocks (block causal) and never noisy keys.
    """

    length: int
    block_size: int

    def __post_init__(self):
        _positive_int("Bd3Training", "length", self.length)
        _positive_int("Bd3Training", "block_size", self.block_size)
        if self.length % self.block_size:
            raise ValueError(f"Bd3Training: block_size={self.block_size} must divide length={self.length}")

    def allowed(self, q_idx, kv_idx):
        n, b = self.length, self.block_size
        q_clean, kv_clean = q_idx >= n, kv_idx >= n
        # Block index within its half; `bool * int` keeps one expression valid for numpy, jnp and kernels.
        q_blk = _div(q_idx - n * q_clean, b)
        kv_blk = _div(kv_idx - n * kv_clean, b)
        diagonal = (q_blk == kv_blk) & (q_clean == kv_clean)
        noisy_sees_clean_past = (q_blk > kv_blk) & kv_clean & (q_idx < n)
        clean_causal = (q_blk >= kv_blk) & kv_clean & q_clean
        return diagonal | noisy_sees_clean_past | clean_causal

    def rect_any_all(self, q_lo, q_hi, kv_lo, kv_hi):
        # Split the rectangle into its (noisy|clean) x (noisy|clean) quadrants; each quadrant's rule is simple.
        n, b = self.length, self.block_size
        any_, all_ = np.zeros(np.broadcast(q_lo, kv_lo).shape, bool), np.ones(np.broadcast(q_lo, kv_lo).shape, bool)
        halves = lambda lo, hi: (((lo, np.minimum(hi, n - 1)), False), ((np.maximum(lo, n) - n, hi - n), True))
        for (qa, qb), qc in halves(q_lo, q_hi):
            for (ka, kb), kc in halves(kv_lo, kv_hi):
                present = (qa <= qb) & (ka <= kb)
                qa_b, qb_b, ka_b, kb_b = qa // b, qb // b, ka // b, kb // b
                if not qc and not kc:  # block diagonal
                    q_any = (qa_b <= kb_b) & (ka_b <= qb_b)
                    q_all = (qa_b == qb_b) & (ka_b == kb_b) & (qa_b == ka_b)
                elif not qc and kc:  # strictly earlier clean blocks
                    q_any, q_all = qb_b > ka_b, qa_b > kb_b
                elif qc and not kc:  # clean queries never see noisy keys
                    q_any, q_all = np.zeros_like(present), np.zeros_like(present)
                else:  # block causal
                    q_any, q_all = qb_b >= ka_b, qa_b >= kb_b
                any_ |= present & q_any
                all_ &= ~present | q_all
        return any_, all_


def tile_map(mask: Mask, q_len: int, kv_len: int, block_q: int, block_k: int) -> np.ndarray:
    """int8[ceil(q_len / block_q), ceil(kv_len / block_k)]: EMPTY 0, PARTIAL 1, FULL 2 per (q tile, kv tile).

    Tiles that reach past `kv_len` are at most PARTIAL (the kernel masks the padded tail); padded query rows
    are ignored (their outputs are sliced off). Cost is O(number of tiles), never O(q_len * kv_len).
    """
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    qi, kj = np.arange(nq)[:, None], np.arange(nk)[None, :]
    q_lo, q_hi = qi * block_q, np.minimum((qi + 1) * block_q, q_len) - 1
    kv_lo, kv_end = kj * block_k, (kj + 1) * block_k
    any_, all_ = mask.rect_any_all(q_lo, q_hi, kv_lo, np.minimum(kv_end, kv_len) - 1)
    all_ = all_ & (kv_end <= kv_len)
    return np.where(any_, np.where(all_, FULL, PARTIAL), EMPTY).astype(np.int8)


def skipped_fraction(mask: Mask, q_len: int, kv_len: int, block_q: int, block_k: int) -> float:
    """Fraction of (q tile, kv tile) pairs the kernels skip entirely for this mask and tiling."""
    return float(np.mean(tile_map(mask, q_len, kv_len, block_q, block_k) == EMPTY))


def compact_tiles(tmap: np.ndarray):
    """Per row of `tmap`, the non-empty column indices packed to the front.

    Returns (index int32[rows, width], kind int32[rows, width], count int32[rows]) with width >= 1. Slots past
    `count` repeat the row's last valid index (so a pipelined kernel does not fetch a new tile for them) and
    have kind EMPTY. Pass `tmap.T` to get, per kv tile, the q tiles that see it (backward dk/dv).
    """
    rows = tmap.shape[0]
    count = (tmap != EMPTY).sum(axis=1).astype(np.int32)
    width = max(int(count.max(initial=0)), 1)
    index = np.zeros((rows, width), np.int32)
    kind = np.zeros((rows, width), np.int32)
    for r in range(rows):
        cols = np.flatnonzero(tmap[r] != EMPTY)
        if cols.size:
            index[r, : cols.size], index[r, cols.size:] = cols, cols[-1]
            kind[r, : cols.size] = tmap[r, cols]
    return index, kind, count
