"""orbax checkpoints of a run: train state, data-iterator state and the config, saved together.

A checkpoint step directory holds three items: `state` (the TrainState pytree), `data` (the grain iterator
position, so a resumed run sees exactly the batches it would have seen) and `config` (JSON, so a checkpoint
can be sampled from without the YAML that made it). orbax writes each step into a temporary directory and
renames it on commit, so a run killed mid-save leaves the previous step intact.
"""
from __future__ import annotations

import json
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from dlmjax.config import CheckpointConfig, Config, MeshConfig, config_from_dict
from dlmjax.models.transformer import init_params
from dlmjax.sharding import make_mesh
from dlmjax.train.state import abstract_train_state, make_optimizer


def _abstract(tree, shardings):
    """ShapeDtypeStructs (carrying target shardings) that tell orbax where to put each restored array."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    """Thin, explicit wrapper around `ocp.CheckpointManager` for one run directory."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig = CheckpointConfig(), *, read_only=False):
        self.directory = Path(directory).absolute()
        if read_only:  # a reader never saves, so it can neither create nor garbage-collect steps
            options = ocp.CheckpointManagerOptions(create=False, max_to_keep=None)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=cfg.max_to_keep, save_interval_steps=1,
                                                   enable_async_checkpointing=cfg.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

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

    def wait(self):
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
    without its optimizer state. Refuses to overwrite an existing export.
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
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / PARAMS_ITEM, like)
    return cfg, params


def load(path: str | Path, step: int | None = None):
    """Load (config, params): the notebook entry point.

    `path` is a training workdir (latest or given `step`), its `checkpoints/` folder, or a params-only export
    (`save_params`, `dlmjax convert`). Parameters land on the first local device; reshard them with
    `jax.device_put` for a mesh.
    """
    if is_params_export(path):
        if step is not None:
            raise ValueError(f"{path} is a params-only export (one version); step={step} does not apply")
        return _load_params_export(Path(path))
    ckpt = Checkpointer(find_checkpoint_dir(path), read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint steps under {ckpt.directory}")
        cfg = ckpt.restore_config(step)
        mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.devices()[:1])
        tx = make_optimizer(cfg.optim, cfg.train.steps)
        like_state, shardings = abstract_train_state(cfg.model, tx, mesh)
        state = ckpt.restore_state(step, like_state, shardings)
    finally:
        ckpt.close()
    return cfg, state.params
