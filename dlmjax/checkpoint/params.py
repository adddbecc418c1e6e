"""Parameters alone: params-only exports (`save_params`) and `load`, the reader of any checkpoint's parameters.

`load` never builds an optimizer or a train state. From a run checkpoint it restores only the `params` subtree of
the step's `state` item (an orbax partial restore: Adam's moments are neither read nor allocated, and a copy of the
checkpoint without them loads the same), straight into the shardings of the given mesh, cast while reading when a
`dtype` is given. Peak host memory is about one copy of the parameters in the requested dtype
(bench/load_memory.py).

A params-only export is a folder with `config.json` (the full run config) and `params/` (orbax), written by
`save_params`: what `dlmjax convert --from-hf` produces, and how a trained model is handed to others without its
optimizer state.
"""
from __future__ import annotations

import errno
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from dlmjax.checkpoint.run import (Checkpointer, absolute, find_checkpoint_dir, restore_pytree, save_pytree,
                                   short_error, storage_errors)
from dlmjax.config import Config, MeshConfig, config_from_dict
from dlmjax.errors import CheckpointError, CheckpointRestoreError, InputError
from dlmjax.models.specs import param_shardings
from dlmjax.sharding import make_mesh

PARAMS_ITEM, CONFIG_FILE = "params", "config.json"

__all__ = ["CONFIG_FILE", "PARAMS_ITEM", "is_params_export", "load", "read_config", "save_params"]


def is_params_export(path: str | Path) -> bool:
    """A params-only export: `config.json` + `params/` (orbax), as written by `save_params`."""
    path = absolute(path)
    return (path / PARAMS_ITEM).is_dir() and (path / CONFIG_FILE).is_file()


def save_params(path: str | Path, cfg: Config, params) -> Path:
    """Write a params-only export that `load(path)` reads: `config.json` and `params/` (orbax, atomic).

    Never overwrites: an existing `params/` is refused (`FileExistsError`). orbax writes `params/` under a
    temporary name and renames it on commit; `config.json` is written (by rename) only after that, so an
    interrupted export is never mistaken for a complete one (`load` reports it as incomplete). A write the
    storage refuses (full disk, read-only folder) raises one `CheckpointError` and leaves any existing export
    untouched. Returns the export's absolute path.
    """
    path = absolute(path)
    if (path / PARAMS_ITEM).exists():
        raise FileExistsError(errno.EEXIST, f"{path / PARAMS_ITEM} exists; choose a new output directory or remove "
                              f"it", str(path / PARAMS_ITEM))
    with storage_errors(f"the params export {path}", after=f"no complete export was written at {path}"):
        path.mkdir(parents=True, exist_ok=True)
        save_pytree(path / PARAMS_ITEM, params)
        tmp = path / (CONFIG_FILE + ".tmp")
        tmp.write_text(cfg.to_json())
        tmp.replace(path / CONFIG_FILE)  # the config appears only once the params are committed
    return path


def _target(cfg: Config, mesh, dtype):
    """(abstract params, their NamedShardings on `mesh` under the run's `mesh.rules`, dtype or None)."""
    if mesh is None:  # one device of this process
        mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.local_devices()[:1])
    like, shardings = param_shardings(cfg.model, mesh, cfg.mesh.rules)
    if dtype is not None:
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), like)
    return like, shardings, dtype


def _check_dtype(dtype):
    if dtype is None:
        return None
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise InputError(f"dtype={dtype!r} is not a dtype; give a floating one such as 'bfloat16' or "
                         f"'float32'") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise InputError(f"dtype={dtype} is not a floating dtype; parameters can be cast to bfloat16, float16, "
                         f"float32 or float64")
    return dtype


def _load_params_export(path: Path, mesh, dtype):
    cfg = config_from_dict(json.loads((path / CONFIG_FILE).read_text()))
    like, shardings, dtype = _target(cfg, mesh, dtype)
    try:
        params = restore_pytree(path / PARAMS_ITEM, like, shardings, dtype)
    except Exception as e:  # noqa: BLE001 - one version only: nothing to fall back to
        raise CheckpointRestoreError(f"params export {path} could not be restored ({short_error(e)}); an export "
                                     f"has a single version, so there is nothing to fall back to") from e
    return cfg, params


def read_config(path: str | Path) -> Config:
    """The run config of a checkpoint (any path `load` takes; a run's newest step), without reading a parameter."""
    path = absolute(path)
    if is_params_export(path):
        return config_from_dict(json.loads((path / CONFIG_FILE).read_text()))
    ckpt = Checkpointer(find_checkpoint_dir(path), read_only=True)
    try:
        return ckpt.restore_config()
    finally:
        ckpt.close()


def load(path: str | Path, *, step: int | None = None, mesh: jax.sharding.Mesh | None = None, dtype=None):
    """(config, params) of a checkpoint: the notebook entry point.

    Args:
      path: a training workdir, its `checkpoints/` folder, or a params-only export (`save_params`, `dlmjax
        convert`); relative paths and `~` work.
      step: a run checkpoint's step (default: the newest restorable one). Without it, an unreadable newest step
        is reported (`CheckpointWarning`) and the previous restorable step is loaded; nothing on disk changes.
        An explicit step is never replaced by another one.
      mesh: where the parameters go: each lands directly in its `NamedSharding` on this mesh under the run's
        `mesh.rules` (default: a one-device mesh of this process's first device).
      dtype: cast every parameter to this floating dtype while reading (e.g. "bfloat16": half the memory, no
        float32 copy first); default: as saved.
    Returns:
      (Config, params tree).
    Raises:
      CheckpointRestoreError: no step (or the export, or the given step) could be restored.
      CheckpointError / InputError: an incomplete export; a step that is not committed; a bad `step` or `dtype`.
      FileNotFoundError: `path` does not exist or holds no checkpoint step.
    """
    path = absolute(path)
    dtype = _check_dtype(dtype)
    if is_params_export(path):
        if step is not None:
            raise InputError(f"step={step} does not apply: {path} is a params-only export (one version, no steps)")
        return _load_params_export(path, mesh, dtype)
    if path.is_dir() and not (path / CONFIG_FILE).exists() and any(path.glob(PARAMS_ITEM + "*")):
        raise CheckpointRestoreError(f"{path} holds an incomplete params export ({CONFIG_FILE} is missing: the "
                                     f"export was interrupted); rerun the export")
    ckpt = Checkpointer(find_checkpoint_dir(path), read_only=True)

    def restore(s):
        cfg = ckpt.restore_config(s)
        like, shardings, cast = _target(cfg, mesh, dtype)
        return cfg, ckpt.restore_params(s, like, shardings, dtype=cast)

    try:
        if step is not None:
            if step not in ckpt.steps():
                raise CheckpointError(f"step={step} is not a committed checkpoint step in {ckpt.directory}; "
                                      f"committed steps: {ckpt.steps()}")
            try:
                return restore(step)
            except Exception as e:  # noqa: BLE001 - reported with the step and folder; the cause is chained
                raise CheckpointRestoreError(f"checkpoint step {step} in {ckpt.directory} could not be restored "
                                             f"({short_error(e)}); it is left in place") from e
        found, value = ckpt.first_restorable(restore)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, f"no checkpoint steps under {ckpt.directory}", str(ckpt.directory))
        return value
    finally:
        ckpt.close()
