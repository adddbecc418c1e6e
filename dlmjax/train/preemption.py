"""Stopping on SIGTERM (preemption) at a step boundary: the same step in every process.

One process: inside `watch_preemption()`, SIGTERM sets a flag instead of killing the process (main thread only;
the previous handler comes back on exit). The loop looks at the flag between steps, saves the current step and
returns `preempted`.

Several processes: the signals reach the hosts at different moments (or only some hosts), so a per-process flag
would stop processes at different steps and hang them in the checkpoint's collectives. There JAX's preemption
service decides instead (`multihost_utils.reached_preemption_sync_point`, whose C++ SIGTERM handler
`jax.distributed.initialize` installs; no Python handler is set): a notice on any host is propagated to all, they
agree on one step a little later, and every process stops at that same step. The per-step check is a local
read, not a collective.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import jax
from jax.experimental import multihost_utils


class Preemption:
    """Whether the job was asked to stop. `after_step(done)` once per step, in every process, after the step is
    dispatched; `requested` then says whether to stop before the next one."""

    def __init__(self, flag: threading.Event, *, multi_process: bool):
        self._flag = flag
        self._multi_process = multi_process

    @property
    def requested(self) -> bool:
        return self._flag.is_set()

    def after_step(self, done: int) -> None:
        if self._multi_process and multihost_utils.reached_preemption_sync_point(done):
            self._flag.set()  # every process reaches this at the same `done`: all stop and save this step


@contextmanager
def sigterm_flag(install: bool = True) -> Iterator[threading.Event]:
    """A `threading.Event` set by SIGTERM while inside the block (main thread only, and only with `install`;
    otherwise never set by a signal)."""
    flag = threading.Event()
    if not install or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def watch_preemption() -> Iterator[Preemption]:
    """The job's `Preemption` while inside the block: a Python SIGTERM handler in a single process, JAX's
    preemption service in a multi-process job (a Python handler would replace its C++ one)."""
    multi_process = jax.process_count() > 1
    with sigterm_flag(install=not multi_process) as flag:
        yield Preemption(flag, multi_process=multi_process)


__all__ = ["Preemption", "sigterm_flag", "watch_preemption"]
