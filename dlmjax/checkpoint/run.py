"""Run checkpoints: the train state, the data-iterator position and the config of a run, saved together, and the
machinery that resumes from them.

A checkpoint step directory `checkpoints/<step>/` holds three items: `state` (the TrainState pytree),
`data` (the grain iterator position, so a resumed run sees exactly the batches it would have seen) and
`config` (JSON, so a checkpoint can be sampled from without the YAML that made it).

Guarantees (orbax 0.12 on a local or network file system; verified by tests/test_checkpoint.py):

* Atomic commits. orbax writes a step into `<step>.orbax-checkpoint-tmp/`, writes `commit_success.txt`
  into it and renames it to `<step>/` as the last act of the save. Only a directory named by a bare step
  number counts as a checkpoint, so a process killed mid-save (even with SIGKILL) leaves at most a
  `*.orbax-checkpoint-tmp` directory that is never restored from; `Checkpointer` reports such directories
  (`CheckpointWarning`) and orbax replaces one when that step is saved again.
* Saves are asynchronous (`checkpoint.async_save`): `save` returns once the arrays are copied to host
  memory; the write and commit finish in a background thread. `wait()` blocks until committed.
* A save that cannot be written (a full disk, a read-only folder, a file-size limit) raises one
  `CheckpointError` naming the step, the folder and the system's reason, from `save`, `wait` or `close`
  (whichever first sees it). The step is not committed, so every earlier step is untouched and still restores.
* Retention: the `checkpoint.max_to_keep` most recent steps are kept, plus every step that is a multiple of
  `checkpoint.keep_every` (0: off). Old steps are deleted only after the newer save has committed, so
  nothing is deleted that is not superseded by a readable-on-commit step.
* Fallback: `restore_latest` (training resume) and `dlmjax.checkpoint.load` try the newest committed step
  first; if it cannot be restored (a file truncated or removed, a step directory emptied, ...) they warn
  (`CheckpointWarning` naming the step, the directory and the error) and fall back to the previous step.
  Nothing is deleted: a training run moves the unreadable step aside to `<step>.unreadable/` (so that it no
  longer counts as the latest step and the step can be saved again), a reader (`load`) leaves it in place.
  If no step can be restored the error lists every step's failure and nothing is moved (the usual cause is a
  changed model/optimizer config, not corruption).
* Restores go into the shardings of the *current* mesh (`restore_state(..., shardings)`): a run saved on
  one mesh resumes on another (e.g. data=8 -> fsdp=4,tensor=2). `restore_params` reads the parameters alone.

This module knows the layout of a step (the items above, and that the state has a `params` field), not what a
train state is: it never imports `dlmjax.train`.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from dlmjax.config import CheckpointConfig, Config, config_from_dict
from dlmjax.errors import CheckpointError, CheckpointRestoreError

TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's suffix of a step being written (not committed)
UNREADABLE_SUFFIX = ".unreadable"  # where a training run moves a committed step it could not restore
STATE_ITEM, DATA_ITEM, CONFIG_ITEM = "state", "data", "config"  # the items of a step
PARAMS_FIELD = "params"  # the subtree of the state that holds the model parameters

# System errors that mean "this folder cannot take the write", as opposed to a bug: full, over quota, a file-size
# limit, read-only, no permission.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")


class CheckpointWarning(UserWarning):
    """A checkpoint step was skipped: not committed, or committed but unreadable."""


def absolute(path: str | Path) -> Path:
    """`path` with `~` expanded, made absolute (orbax refuses relative paths)."""
    return Path(path).expanduser().absolute()


def short_error(err: BaseException, limit: int = 400) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def storage_errno(err: BaseException) -> int | None:
    """The errno of a failed write that is the storage's fault (see `STORAGE_ERRNOS`), else None.

    orbax's writes go through TensorStore, whose failures are `ValueError`s carrying `os_error_code='N'`.
    """
    code = err.errno if isinstance(err, OSError) else None
    if code is None:
        match = _TENSORSTORE_ERRNO.search(str(err))
        code = int(match.group(1)) if match else None
    return code if code in STORAGE_ERRNOS else None


@contextlib.contextmanager
def storage_errors(what: str, *, after: str | Callable[[], str]):
    """Turn a write that the storage refused into one `CheckpointError`: "could not write `what` (reason); `after`"
    (`after` may be a function, called once the write has failed). Any other exception is a bug and propagates."""
    try:
        yield
    except Exception as e:
        code = storage_errno(e)
        if code is None:
            raise
        reason = f"{errno.errorcode.get(code, code)}: {os.strerror(code)}"
        raise CheckpointError(f"could not write {what} ({reason}: the disk is full, the folder is read-only or not "
                              f"writable, or a file-size limit was hit); {after() if callable(after) else after}"
                              ) from e


def _storage_failure_in(err: BaseException | None) -> bool:
    """`err`, or an exception it was raised from, is a write the storage refused (`storage_errno`)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if storage_errno(err) is not None:
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


class _DropStorageFailureTracebacks(logging.Filter):
    """orbax logs a refused background write with its full traceback once per thread it passes through (three or
    four times), and asyncio may report its future as never retrieved, before `wait` / `close` raises it;
    `Checkpointer` raises it then as one `CheckpointError` that chains the original, so these records only repeat
    it. Any other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _storage_failure_in(record.exc_info[1]))


def _is_abandoned_write_callback(unraisable) -> bool:
    """When one TensorStore write of a save fails, orbax stops and closes the event loop that awaited the save; the
    other writes of that save still finish and their completion callbacks call `call_soon_threadsafe` on the
    closed loop. Python reports each of those as an unraisable `RuntimeError('Event loop is closed')`, a traceback
    that says nothing the save's own error does not."""
    err = unraisable.exc_value
    if not isinstance(err, RuntimeError) or str(err) != "Event loop is closed":
        return False
    tb = unraisable.exc_traceback
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


_quieted = False


def _quiet_failed_writes() -> None:
    """Install (once per process) the two filters above, so that a refused checkpoint write reaches the user as
    the one `CheckpointError` of `save` / `wait` / `close` and not as a page of orbax and asyncio tracebacks. They
    stay installed: the callbacks of an abandoned write may fire after the error was raised."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    for name in ("absl", "asyncio"):  # orbax's own log, and asyncio's "Future exception was never retrieved"
        logging.getLogger(name).addFilter(_DropStorageFailureTracebacks())
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_abandoned_write_callback(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook


def _collect_failed_restores():
    """A failed orbax restore leaves futures and coroutines that were never awaited; without this they are
    reported at interpreter exit as tracebacks ("Future exception was never retrieved") that repeat the error
    already given in the `CheckpointWarning`. Collect them now, quietly."""
    asyncio_log = logging.getLogger("asyncio")
    level, hook = asyncio_log.level, sys.unraisablehook
    asyncio_log.setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            gc.collect()
    finally:
        sys.unraisablehook = hook
        asyncio_log.setLevel(level)


def _abstract(tree, shardings):
    """ShapeDtypeStructs (carrying target shardings) that tell orbax where to put each restored array."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# Parameters are restored a group of arrays at a time: orbax keeps a read buffer next to every array it fills, so
# reading a whole tree at once peaks near 2x its bytes (bench/load_memory.py). A group holds at most this share of
# the bytes (and at most MAX_GROUP_BYTES), or the largest single array.
RESTORE_GROUP_FRACTION = 1 / 16
MAX_GROUP_BYTES = 1 << 30


def _groups(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive leaf indices packed into groups of at most `limit` bytes (a larger leaf is a group alone)."""
    groups, current, total = [], [], 0
    for i, size in enumerate(sizes):
        if current and total + size > limit:
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    return groups + [current] if current else groups


def save_pytree(directory: Path, tree) -> None:
    """Write `tree` (arrays) as an orbax PyTree item at `directory` (what `restore_pytree` reads), synchronously,
    with the bytes in flight bounded like a restore's group: orbax copies each array to host memory before
    writing it, all at once by default (`dlmjax convert` of 100M bf16 parameters peaked at 1.76x their bytes that
    way, 1.21x this way: bench/RESULTS.md); here at most max(the largest array, 1/16 of the bytes, at most
    MAX_GROUP_BYTES) are copied or written at a time."""
    sizes = [x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)]
    limit = max(max(sizes, default=0) + 1, min(MAX_GROUP_BYTES, int(sum(sizes) * RESTORE_GROUP_FRACTION)))
    gb = limit / 1e9  # orbax takes the limits in GB (10^9 bytes) and refuses an array of at least the limit
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=gb, save_device_host_concurrent_gb=gb)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(directory, args=ocp.args.PyTreeSave(tree))


def _nested(keys: tuple[str, ...], value, into: dict) -> dict:
    node = into
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return into


def restore_pytree(directory: Path, like, shardings, dtype=None, *, under: tuple[str, ...] = ()):
    """Restore the arrays shaped like `like` (a tree of dicts) from the orbax PyTree item at `directory`, found at
    `under` inside it, straight into `shardings`, cast to `dtype` while reading (TensorStore's cast driver, chunk
    by chunk: no copy in the saved dtype is made). Read in groups (see RESTORE_GROUP_FRACTION); anything else in
    the item (an optimizer state) is neither read nor allocated."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    keys = [under + tuple(str(k.key) for k in path) for path, _ in leaves]
    targets = treedef.flatten_up_to(shardings)
    sizes = [x.size * jnp.dtype(dtype or x.dtype).itemsize for _, x in leaves]
    limit = max(max(sizes, default=0), min(MAX_GROUP_BYTES, int(sum(sizes) * RESTORE_GROUP_FRACTION)))
    out = [None] * len(leaves)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        for group in _groups(sizes, limit):
            item, args = {}, {}
            for i in group:
                x = leaves[i][1]
                _nested(keys[i], x, item)
                _nested(keys[i], ocp.ArrayRestoreArgs(sharding=targets[i], global_shape=tuple(x.shape), dtype=dtype),
                        args)
            restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                                                    partial_restore=True))
            for i in group:
                node = restored
                for key in keys[i]:
                    node = node[key]
                out[i] = node
    return treedef.unflatten(out)


def _preservation_policy(cfg: CheckpointConfig):
    policies = [checkpoint_managers.LatestN(n=cfg.max_to_keep)]
    if cfg.keep_every:
        policies.append(checkpoint_managers.EveryNSteps(interval_steps=cfg.keep_every))
    return checkpoint_managers.AnyPreservationPolicy(policies)


class Checkpointer:
    """Thin, explicit wrapper around `ocp.CheckpointManager` for one run directory.

    `read_only=True` (used by `load`) never creates, saves, deletes or moves anything.
    """

    def __init__(self, directory: str | Path, cfg: CheckpointConfig = CheckpointConfig(), *, read_only=False):
        self.directory = absolute(directory)
        self.read_only = read_only
        self._pending: int | None = None  # the step of a save that may not have committed yet
        if read_only:  # a reader never saves, so it can neither create nor garbage-collect steps
            options = ocp.CheckpointManagerOptions(create=False, max_to_keep=None)
        else:
            options = ocp.CheckpointManagerOptions(save_interval_steps=1,
                                                   preservation_policy=_preservation_policy(cfg),
                                                   enable_async_checkpointing=cfg.async_save)
        if not read_only:
            _quiet_failed_writes()
        with storage_errors(f"the checkpoint folder {self.directory}", after="give a writable folder"):
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    # -- what is on disk ---------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed steps, oldest first (uncommitted `*.orbax-checkpoint-tmp` directories are not steps)."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def uncommitted(self) -> list[Path]:
        """Step directories whose save never committed (or is still being written by another process)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if TMP_MARKER in p.name)

    def _warn_uncommitted(self):
        for p in self.uncommitted():
            warnings.warn(f"{p} is an uncommitted checkpoint step (a save interrupted before its commit, or "
                          f"still in progress): it is not a checkpoint and is ignored", CheckpointWarning,
                          stacklevel=3)

    # -- save --------------------------------------------------------------------------------------------
    def _writing(self, step: int | None):
        """Storage failures of the save of `step` -> one `CheckpointError` that names the last committed step."""
        return storage_errors(f"checkpoint step {step} in {self.directory}", after=lambda: self._after_failure(step))

    def _after_failure(self, step: int | None) -> str:
        self._pending = None
        with contextlib.suppress(Exception):
            self.manager.reload()  # forget the step that did not commit
        committed = [s for s in self.steps() if s != step]
        kept = (f"the last committed step, {committed[-1]}, is untouched and still loads" if committed
                else "no earlier step was committed")
        return f"step {step} was not committed and {kept}. Free space or fix the permissions, then rerun"

    def save(self, step: int, state, *, data_iter=None, config: Config | None = None, force=False) -> bool:
        if self._pending is not None:  # a failure of the previous (asynchronous) save is reported as that step's
            self.wait()
        items = {STATE_ITEM: ocp.args.StandardSave(state)}
        if data_iter is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items[CONFIG_ITEM] = ocp.args.JsonSave(config.to_dict())
        with self._writing(step):
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            self._pending = step
        return saved

    def wait(self):
        """Block until every pending save has committed (raises `CheckpointError` if the storage refused one)."""
        with self._writing(self._pending):
            self.manager.wait_until_finished()
        self._pending = None

    def close(self):
        with self._writing(self._pending):
            self.manager.close()
        self._pending = None

    # -- restore -----------------------------------------------------------------------------------------
    def restore_state(self, step: int, like_state, shardings, *, data_iter=None):
        """Restore the TrainState shaped like `like_state` (arrays or ShapeDtypeStructs) into `shardings`."""
        items = {STATE_ITEM: ocp.args.StandardRestore(_abstract(like_state, shardings))}
        if data_iter is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE_ITEM]

    def restore_params(self, step: int, like_params, shardings, *, dtype=None):
        """Only the `params` subtree of step `step`'s state (an orbax partial restore: the optimizer state is
        neither read nor allocated, and need not exist), shaped like `like_params`, into `shardings`, cast to
        `dtype` while reading (None: as saved)."""
        if step not in self.steps():
            raise FileNotFoundError(errno.ENOENT, f"no committed checkpoint step {step} in {self.directory}",
                                    str(self.directory / str(step)))
        # The step's state item is read directly: the manager restores an item in one piece.
        return restore_pytree(self.directory / str(step) / STATE_ITEM, like_params, shardings, dtype,
                              under=(PARAMS_FIELD,))

    def restore_config(self, step: int | None = None) -> Config:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(errno.ENOENT, f"no checkpoint in {self.directory}", str(self.directory))
        raw = self.manager.restore(step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
        return config_from_dict(raw[CONFIG_ITEM])

    def first_restorable(self, restore_fn):
        """(step, restore_fn(step)) for the newest committed step that restores; (None, None) if there is none.

        Unreadable newer steps are reported (`CheckpointWarning`) and, unless read-only, moved aside to
        `<step>.unreadable`. If every step fails, raises `CheckpointRestoreError` and moves nothing.
        """
        self._warn_uncommitted()
        failures = []
        for step in reversed(self.steps()):
            try:
                value = restore_fn(step)
            except Exception as e:  # noqa: BLE001 - any failure to read a step makes us try the previous one
                failures.append((step, e))
                warnings.warn(f"checkpoint step {step} in {self.directory} could not be restored "
                              f"({short_error(e)}); trying the previous step", CheckpointWarning, stacklevel=2)
                continue
            if failures:
                self._set_aside([s for s, _ in failures], good=step)
                failures.clear()
                _collect_failed_restores()
            return step, value
        if failures:
            listing = "; ".join(f"step {s}: {short_error(e, 300)}" for s, e in failures)
            raise CheckpointRestoreError(
                f"no checkpoint step in {self.directory} could be restored ({listing}). Nothing was moved or "
                f"deleted. If the model or optimizer config changed since these were saved, use the old config "
                f"or a new workdir.") from failures[0][1]
        return None, None

    def restore_latest(self, like_state, shardings, *, data_iter=None):
        """(step, state) of the newest restorable step (see `first_restorable`), or (None, None) if none."""
        return self.first_restorable(
            lambda step: self.restore_state(step, like_state, shardings, data_iter=data_iter))

    def _set_aside(self, bad_steps: list[int], *, good: int):
        if self.read_only:
            for step in bad_steps:
                warnings.warn(f"restored step {good} instead of the unreadable step {step} in {self.directory}; "
                              f"the unreadable step is left in place", CheckpointWarning, stacklevel=3)
            return
        for step in bad_steps:
            src = self.directory / str(step)
            if jax.process_index() == 0:
                dst, n = self.directory / f"{step}{UNREADABLE_SUFFIX}", 1
                while dst.exists():
                    n += 1
                    dst = self.directory / f"{step}{UNREADABLE_SUFFIX}-{n}"
                src.rename(dst)
            else:
                dst = self.directory / f"{step}{UNREADABLE_SUFFIX}"
            warnings.warn(f"resuming from step {good}: the unreadable checkpoint step {step} was moved aside to "
                          f"{dst} (not deleted; inspect or remove it yourself)", CheckpointWarning, stacklevel=3)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dlmjax_checkpoint_set_aside")
        self.manager.reload()


def find_checkpoint_dir(path: str | Path) -> Path:
    """Accept a run workdir (with `checkpoints/`) or the checkpoints directory itself (made absolute)."""
    path = absolute(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.is_dir():
        return path
    raise FileNotFoundError(errno.ENOENT, f"checkpoint path {str(path)!r} does not exist; pass a training workdir "
                            f"or its checkpoints/ folder", str(path))
