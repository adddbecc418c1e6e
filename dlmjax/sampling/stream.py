"""Watching a jitted sampler from the host: the canvas after each finished block (what `dlmjax chat` shows).

The samplers take a static `observe` switch. When it is on, the end of every outer-loop iteration (a finished block)
calls `block_done` inside the jitted program, which hands the canvas to the host through `jax.debug.callback`;
the host side, `emit`, passes it to the observer installed with `observing(fn)`. The callback target is this
module's one function whatever the observer, so installing another observer never recompiles a sampler. With
`observe` off (the default) the program has no callback at all.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable

import jax
import numpy as np

_lock = threading.Lock()
_observers: list[Callable[[int, np.ndarray], None]] = []  # a stack: the innermost `observing` is called


def emit(block, canvas) -> None:
    """Host side: the observer (if any) gets (block index, canvas int32[B, N] as numpy)."""
    with _lock:
        observer = _observers[-1] if _observers else None
    if observer is not None:
        observer(int(block), np.asarray(canvas))


def block_done(block: jax.Array, canvas: jax.Array) -> None:
    """Device side, inside a sampler's loop: report a finished block (ordered: blocks arrive in order)."""
    jax.debug.callback(emit, block, canvas, ordered=True)


@contextlib.contextmanager
def observing(fn: Callable[[int, np.ndarray], None]):
    """Calls `fn(block, canvas)` for each finished block of the samplers run with `observe=True` inside."""
    with _lock:
        _observers.append(fn)
    try:
        yield
    finally:
        with _lock:
            _observers.remove(fn)


__all__ = ["block_done", "emit", "observing"]
