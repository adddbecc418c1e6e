"""Device mesh and the one table of logical-axis rules.

Parameters and activations are annotated with logical names in the model; `LOGICAL_RULES` maps each name
to mesh axes (`data`, `fsdp`, `tensor`). Changing the parallelism of a run means changing the mesh sizes
in the config, never the model code.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlmjax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes. Batch is split over data and fsdp (FSDP shards the batch too); weights are
# sharded over fsdp along their model dimension and over tensor along heads / mlp / vocab.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
    # DiT (arch dit): the time-conditioning width (and the output of sigma_map's C x C layer: one array may not
    # name an axis twice), the sinusoidal time features, the adaLN modulation outputs (6D per block) and
    # attn_qkv's q/k/v axis. Replicated: the conditioning path is small (C x 6D per block) and the modulation is
    # split into six D-chunks right away; q/k/v are split by `heads` instead.
    ("cond", None),
    ("cond_out", None),
    ("time_freq", None),
    ("modulation", None),
    ("qkv", None),
)


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve a -1 entry and check that the sizes multiply to the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh {tuple(sizes)}: {n_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"mesh data*fsdp*tensor = {tuple(sizes)} needs {math.prod(sizes)} devices, "
                          f"but {n_devices} are available")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_sharding(logical_tree, mesh: Mesh, rules=LOGICAL_RULES):
    """Tree of logical PartitionSpecs (from `nn.get_partition_spec`) -> tree of NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, list(rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, length] arrays: rows split over data and fsdp."""
    return NamedSharding(mesh, P(("data", "fsdp"), None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
