"""Attention masks of block diffusion (BD3-LM), as index rules.

BD3-LM trains every block in one pass over `[x_t ; x_0]` (length 2L). Slot `i < L` is the noisy copy of
position `i`, slot `L + i` the clean copy. With `c(i) = [i >= L]` (clean half) and
`k(i) = (i - L c(i)) // L'` (block index within its half), query `q` may attend to key `kv` when

- M_BD:  k(q) == k(kv) and c(q) == c(kv)   (block diagonal: a block sees itself, within its half);
- M_OBC: k(q) >  k(kv) and c(q) = 0, c(kv) = 1   (offset block-causal: noisy block b sees clean blocks < b);
- M_BC:  k(q) >= k(kv) and c(q) = c(kv) = 1   (block-causal: clean block b sees clean blocks <= b).

A noisy block never sees another noisy block and clean queries never see noisy keys, so block b's loss
depends only on its own noisy tokens and the clean prefix, as in the factorisation
`log p(x) = sum_b log p(x^b | x^{<b})`.

The rule is defined once, as `kernels_pallas.masks.Bd3Training` (operators only, so it runs on numpy arrays, jnp
arrays and index tiles inside a Pallas kernel); `bd3_training_mask` materialises it (tests, small L).
"""
from __future__ import annotations

import numpy as np

from kernels_pallas.masks import Bd3Training


def check_block_size(length: int, block_size: int, owner: str = "bd3_training_mask") -> None:
    """Raise a ValueError unless `block_size` is a positive divisor of `length`."""
    for name, value in (("length", length), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{owner}: {name}={value!r} must be a positive int")
    if length % block_size:
        raise ValueError(f"{owner}: block_size={block_size} must divide length={length} "
                         f"(blocks tile the sequence; e.g. block_size in 1, ..., length with length % block_size == 0)")


def bd3_training_mask(length: int, block_size: int) -> np.ndarray:
    """bool[2L, 2L], True = may attend: the training mask for `[x_t ; x_0]` (rows are queries).

    Only for small L (tests, reference twins): a 2L x 2L mask at L = 16k is 1 GB. Raises ValueError unless
    `block_size` divides `length`.
    """
    check_block_size(length, block_size)
    return Bd3Training(length, block_size).dense(2 * length, 2 * length)
