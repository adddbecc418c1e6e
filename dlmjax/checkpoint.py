"""orbax checkpoints of a run: train state, data-iterator state and the config, saved together.

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
* Retention: the `checkpoint.max_to_keep` most recent steps are kept, plus every step that is a multiple of
  `checkpoint.keep_every` (0: off). Old steps are deleted only after the newer save has committed, so
  nothing is deleted that is not superseded by a readable-on-commit step.
* Fallback: `restore_latest` (training resume) and `load` try the newest committed step first; if it
  cannot be restored (a file truncated or removed, a step directory emptied, ...) they warn
  (`CheckpointWarning` naming the step, the directory and the error) and fall back to the previous step.
  Nothing is deleted: a training run moves the unreadable step aside to `<step>.unreadable/` (so that it no
  longer counts as the latest step and the step can be saved again), a reader (`load`) leaves it in place.
  If no step can be restored the error lists every step's failure and nothing is moved (the usual cause is a
  changed model/optimizer config, not corruption).
* Restores go into the shardings of the *current* mesh (`restore_state(..., shardings)`): a run saved on
  one mesh resumes on another (e.g. data=8 -> fsdp=4,tensor=2).
"""
from __future__ import annotations

import gc
import json
import logging
import sys
import warnings
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from dlmjax.errors import CheckpointRestoreError
from dlmjax.config import CheckpointConfig, Config, MeshConfig, config_from_dict
from dlmjax.models.transformer import init_params
from dlmjax.sharding import make_mesh
from dlmjax.train.state import abstract_train_state, make_optimizer

TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's suffix of a step being written (not committed)
UNREADABLE_SUFFIX = ".unreadable"  # where a training run moves a committed step it could not restore


class CheckpointWarning(UserWarning):
    """A checkpoint step was skipped: not committed, or committed but unreadable."""




def _short(err: BaseException, limit: int = 400) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


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
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        if read_only:  # a reader never saves, so it can neither create nor garbage-collect steps
            options = ocp.CheckpointManagerOptions(create=False, max_to_keep=None)
        else:
            options = ocp.CheckpointManagerOptions(save_interval_steps=1,
                                                   preservation_policy=_preservation_policy(cfg),
                                                   enable_async_checkpointing=cfg.async_save)
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

    # -- save / restore ----------------------------------------------------------------------------------
    def save(self, step: int, state, *, data_iter=None, config: Config | None = None, force=False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config.to_dict())
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_state(self, step: int, like_state, shardings, *, data_iter=None):
        """Restore the TrainState shaped like `like_state` (arrays or ShapeDtypeStructs) into `shardings`."""
        items = {"state": ocp.args.StandardRestore(_abstract(like_state, shardings))}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_config(self, step: int | None = None) -> Config:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        raw = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        return config_from_dict(raw)

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
                              f"({_short(e)}); trying the previous step", CheckpointWarning, stacklevel=2)
                continue
            if failures:
                self._set_aside([s for s, _ in failures], good=step)
                failures.clear()
                _collect_failed_restores()
            return step, value
        if failures:
            listing = "; ".join(f"step {s}: {_short(e, 300)}" for s, e in failures)
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

    def wait(self):
        """Block until every pending save has committed (raises if one failed)."""
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def find_checkpoint_dir(path: str | Path) -> Path:
    """Accept a run workdir (with `checkpoints/`) or the checkpoints directory itself."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.is_dir():
        return path
    raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist; pass a training workdir or its "
                            f"checkpoints/ folder")


PARAMS_ITEM, CONFIG_FILE = "params", "config.json"


def is_params_export(path: str | Path) -> bool:
    """A params-only export: `config.json` + `params/` (orbax), as written by `save_params`."""
    path = Path(path)
    return (path / PARAMS_ITEM).is_dir() and (path / CONFIG_FILE).is_file()


def save_params(path: str | Path, cfg: Config, params) -> Path:
    """Write a params-only export that `load(path)` reads: `config.json` and `params/` (orbax, atomic).

    Used by `dlmjax convert` (imported Hugging Face weights) and for handing a trained model to others
    without its optimizer state. Refuses to overwrite an existing export. `config.json` is written (by
    rename) only after `params/` has committed, so an interrupted export is never mistaken for a complete one;
    rerunning `save_params` into the same directory then completes it.
    """
    path = Path(path).absolute()
    if (path / PARAMS_ITEM).exists():
        raise FileExistsError(f"{path / PARAMS_ITEM} exists; choose a new output directory or remove it")
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / PARAMS_ITEM, params)
        ckptr.wait_until_finished()
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(cfg.to_json())
    tmp.replace(path / CONFIG_FILE)  # the config appears only once the params are committed
    return path


def _load_params_export(path: Path):
    cfg = config_from_dict(json.loads((path / CONFIG_FILE).read_text()))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.eval_shape(lambda: init_params(cfg.model, jax.random.PRNGKey(0)))
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(path / PARAMS_ITEM, like)
    except Exception as e:  # noqa: BLE001 - one version only: nothing to fall back to
        raise CheckpointRestoreError(f"params export {path} could not be restored ({_short(e)}); an export has "
                                     f"a single version, so there is nothing to fall back to") from e
    return cfg, params


def load(path: str | Path, step: int | None = None):
    """Load (config, params): the notebook entry point.

    `path` is a training workdir (latest or given `step`), its `checkpoints/` folder, or a params-only export
    (`save_params`, `dlmjax convert`). Parameters land on the first local device; reshard them with
    `jax.device_put` for a mesh. Without `step`, an unreadable latest step is reported (`CheckpointWarning`)
    and the previous restorable step is loaded; nothing on disk is changed.
    """
    path = Path(path)
    if is_params_export(path):
        if step is not None:
            raise ValueError(f"{path} is a params-only export (one version); step={step} does not apply")
        return _load_params_export(path)
    if path.is_dir() and not (path / CONFIG_FILE).exists() and any(path.glob(PARAMS_ITEM + "*")):
        raise CheckpointRestoreError(f"{path} holds an incomplete params export ({CONFIG_FILE} is missing: the "
                                     f"export was interrupted); rerun the export")
    ckpt = Checkpointer(find_checkpoint_dir(path), read_only=True)
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.devices()[:1])

    def restore(s):
        cfg = ckpt.restore_config(s)
        tx = make_optimizer(cfg.optim, cfg.train.steps)
        like_state, shardings = abstract_train_state(cfg.model, tx, mesh, cfg.mesh.rules)
        return cfg, ckpt.restore_state(s, like_state, shardings).params

    try:
        if step is not None:
            return restore(step)
        found, value = ckpt.first_restorable(restore)
        if found is None:
            raise FileNotFoundError(f"no checkpoint steps under {ckpt.directory}")
        return value
    finally:
        ckpt.close()
