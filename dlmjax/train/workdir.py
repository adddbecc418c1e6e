"""The run directory: one trainer at a time, nothing written before it is needed, and files written whole.

* `lock_workdir(workdir)`: an exclusive `flock` on `workdir/.lock`, held while the trainer runs. A second trainer
  on the same directory gets `WorkdirLockedError` before it reads or writes anything else there. The lock goes
  with the process (also on SIGKILL), so a crashed run never leaves a stale lock; the file itself stays, empty
  (removing it would race with a trainer that has just opened it; writing into it would change a file of the run
  directory even when the run is then refused).
* `check_writable(workdir)`: a read-only directory (or one on a read-only file system) is refused up front with
  one `CheckpointError`, instead of failing at the first checkpoint.
* `check_free_space(directory, nbytes)` before each checkpoint: a disk too full for the next checkpoint stops the
  run with one `CheckpointError` before the write starts. A write that fails anyway (the disk filled meanwhile, a
  quota, a file system turned read-only) is one `CheckpointError` too (`dlmjax.checkpoint.run.storage_errors`);
  orbax commits a step only once it is whole, so the last committed checkpoint still loads.
* `check_resumable(ckpt, cfg, like_state, mesh)`: a config whose train state has other shapes than the saved one
  (a changed model, say) is refused with one `ConfigError` naming the fields that differ, before a restore is
  tried (and fails on every step).
* `write_run_files(workdir, cfg)`: `config.json` (and a copy of the tokenizer file the run reads, so that the run
  samples text after the original has moved) are written after the checkpoint restored, each atomically: a refused
  resume leaves the directory as it was, and a crash leaves either the old file or the new one.
"""
from __future__ import annotations

import dataclasses
import fcntl
import filecmp
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from dlmjax.checkpoint.run import STORAGE_ERRNOS
from dlmjax.config import Config
from dlmjax.errors import CheckpointError, ConfigError, DlmjaxError, WorkdirLockedError
from dlmjax.inference import TOKENIZER_DIR  # where `run_tokenizer` looks first for the run's tokenizer file

LOCK_NAME = ".lock"
CONFIG_NAME = "config.json"


@contextmanager
def lock_workdir(workdir: str | Path) -> Iterator[Path]:
    """Hold the run directory's lock inside the block (creating the directory); yields its path.

    Process 0 takes the lock; in a multi-process job it tells the others whether it got it (one collective at
    start-up), so that every process stops together.
    """
    workdir = Path(workdir)
    fd, error = None, None
    if jax.process_index() == 0:
        try:
            fd = _acquire(workdir)
        except DlmjaxError as e:
            error = e
    if jax.process_count() > 1:
        locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not locked and error is None:
            error = WorkdirLockedError(f"workdir {workdir}: process 0 could not take its lock (see its message)")
    if error is not None:
        raise error
    try:
        yield workdir
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _acquire(workdir: Path) -> int:
    path = workdir / LOCK_NAME
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CheckpointError(f"workdir {workdir} cannot be written ({e.strerror}: {e.filename}); give a "
                              f"writable --workdir") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WorkdirLockedError(f"workdir {workdir} is in use by another trainer (it holds {path}): wait for it "
                                 f"to finish or stop it, or give another --workdir") from None
    return fd


def check_writable(*directories: Path) -> None:
    """Raise `CheckpointError` naming the first of `directories` (those that exist) where no file can be created."""
    for directory in directories:
        if not directory.is_dir():
            continue
        try:
            with tempfile.TemporaryFile(dir=directory, prefix=".write-check-"):
                pass
        except OSError as e:
            if e.errno not in STORAGE_ERRNOS:
                raise
            raise CheckpointError(f"{directory} is not writable ({e.strerror}); the run cannot save checkpoints "
                                  f"there: give a writable --workdir (its checkpoints are left as they are)") from e


def check_free_space(directory: Path, nbytes: int) -> None:
    """Raise `CheckpointError` if `directory`'s file system has less than `nbytes` free (a checkpoint's size: the
    new step is written whole before an old one is deleted)."""
    free = shutil.disk_usage(directory).free
    if free < nbytes:
        raise CheckpointError(f"{directory} has {_mib(free)} free, and a checkpoint of this run needs about "
                              f"{_mib(nbytes)}: the run stopped before writing it, and the last committed checkpoint "
                              f"is intact; free some space (or lower checkpoint.max_to_keep) and rerun to resume")


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


def check_resumable(ckpt, cfg: Config, like_state, mesh) -> None:
    """Raise `ConfigError` if the newest checkpoint's train state (from the config saved with it) differs in
    structure or shapes from `like_state`, the one `cfg` builds. A step whose config cannot be read is left to the
    restore's own fallback."""
    from dlmjax.train.state import abstract_train_state, make_optimizer  # noqa: PLC0415

    step = ckpt.latest_step()
    if step is None:
        return
    try:
        saved = ckpt.restore_config(step)
    except Exception:  # noqa: BLE001 - an unreadable step is the restore fallback's business, not this check's
        return
    if saved.model == cfg.model and (saved.optim.grad_clip > 0) == (cfg.optim.grad_clip > 0):
        return
    tx = make_optimizer(saved.optim, saved.train.steps)
    saved_like, _ = abstract_train_state(saved.model, tx, mesh, cfg.mesh.rules)
    if _shapes(saved_like) == _shapes(like_state):
        return
    diffs = [f"{section}.{f.name}={getattr(getattr(saved, section), f.name)!r} there, "
             f"{getattr(getattr(cfg, section), f.name)!r} here"
             for section in ("model", "optim") for f in dataclasses.fields(getattr(cfg, section))
             if getattr(getattr(saved, section), f.name) != getattr(getattr(cfg, section), f.name)]
    raise ConfigError(f"the checkpoints in {ckpt.directory} hold a train state of other shapes than this config "
                      f"builds ({'; '.join(diffs[:6])}), so the run cannot resume. Nothing was changed: rerun with "
                      f"the config it was trained with, or give a new --workdir", field=diffs[0].split("=")[0])


def _shapes(tree):
    return jax.tree.structure(tree), [tuple(x.shape) for x in jax.tree.leaves(tree)]


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `path` whole or not at all: a temporary file in the same directory, flushed, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_run_files(workdir: Path, cfg: Config) -> None:
    """`config.json` and, for a tokenizer file, `tokenizer/<its name>` (process 0 only; see the module doc)."""
    if jax.process_index() != 0:
        return
    write_atomic(workdir / CONFIG_NAME, cfg.to_json())
    spec = cfg.data.tokenizer
    source = Path(spec).expanduser()
    if spec == "byte" or not source.is_file():
        return
    target = workdir / TOKENIZER_DIR / source.name
    if target.is_file() and filecmp.cmp(source, target, shallow=False):
        return
    target.parent.mkdir(exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["CONFIG_NAME", "LOCK_NAME", "check_free_space", "check_resumable", "check_writable", "lock_workdir",
           "write_atomic", "write_run_files"]
