"""Device mesh, logical-axis rules applied to arrays, and the check that nothing large stays replicated.

Parameters and activations are annotated with logical names in the model; a rules table (`mesh.rules` in the
config, default `LOGICAL_RULES`) maps each name to mesh axes (`data`, `fsdp`, `tensor`). Changing the
parallelism of a run means changing the mesh sizes or the rules in the config, never the model code.

Divisibility: `jax.jit` refuses an argument sharding whose dimension is not divisible by the number of shards,
so when a dimension does not divide, `resolve_spec` drops mesh axes of that dimension from the last one backwards
until it divides (in the end: replicated). `replicated_report` lists the parameters this leaves fully
replicated, and every parameter above a size threshold that is fully replicated for whatever reason.

Batch placement: `global_batch` turns the host batch of a train step into one global `[batch, length]` array per
key on the mesh, in one process or many (see its docstring).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from dlmjax.config import LOGICAL_RULES, MESH_AXES, ConfigError, LogicalRules, MeshConfig

__all__ = ["LOGICAL_RULES", "MESH_AXES", "ReplicatedParam", "abstract_mesh", "activation_rules",
           "assemble_global_batch", "batch_sharding", "global_batch", "logical_to_sharding", "make_mesh", "mesh_shape",
           "process_rows", "replicated", "replicated_report", "resolve_spec"]


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


def abstract_mesh(cfg: MeshConfig, n_devices: int) -> AbstractMesh:
    """A mesh of `n_devices` that need not exist: enough for shardings, `shard_shape` and `jax.eval_shape`."""
    return AbstractMesh(mesh_shape(cfg, n_devices), MESH_AXES)


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def resolve_spec(logical: P, shape, mesh: Mesh | AbstractMesh, rules: LogicalRules = LOGICAL_RULES) -> P:
    """Logical PartitionSpec -> mesh PartitionSpec for an array of `shape`, keeping every dimension divisible.

    Without a `shape`, the rules' spec is returned as is (what Flax's `logical_to_mesh_axes` gives).
    """
    spec = nn.logical_to_mesh_axes(logical, list(rules))
    if shape is None:
        return spec
    sizes = dict(mesh.shape)
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = _axes(entry)
        while axes and dim % math.prod(sizes[a] for a in axes):
            axes = axes[:-1]
        out.append(_entry(axes))
    return P(*out)


def logical_to_sharding(logical_tree, mesh: Mesh | AbstractMesh, rules: LogicalRules = LOGICAL_RULES, shapes=None):
    """Tree of logical PartitionSpecs (from `nn.get_partition_spec`) -> tree of NamedShardings.

    With `shapes` (a matching tree of arrays or ShapeDtypeStructs), dimensions that the rules would split unevenly
    fall back as `resolve_spec` describes, so the shardings are always valid `jax.jit` arguments.
    """
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    if shapes is None:
        return jax.tree.map(lambda s: NamedSharding(mesh, resolve_spec(s, None, mesh, rules)), logical_tree,
                            is_leaf=is_spec)
    return jax.tree.map(lambda s, x: NamedSharding(mesh, resolve_spec(s, x.shape, mesh, rules)), logical_tree,
                        shapes, is_leaf=is_spec)


def batch_sharding(mesh: Mesh, rules: LogicalRules = LOGICAL_RULES) -> NamedSharding:
    """[batch, length] arrays, placed by the rules (default: rows split over data and fsdp)."""
    return NamedSharding(mesh, resolve_spec(P("batch", "length"), None, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def process_rows(sharding, shape: tuple[int, ...]) -> np.ndarray:
    """Indices of the global batch rows held by this process's devices, in the order
    `jax.make_array_from_process_local_data` expects them (ascending; rows replicated on several local devices once)."""
    starts = sorted({(idx[0].start or 0, shape[0] if idx[0].stop is None else idx[0].stop)
                     for idx in sharding.addressable_devices_indices_map(shape).values()})
    return np.concatenate([np.arange(a, b) for a, b in starts])


def global_batch(host: Mapping[str, np.ndarray], sharding, *, per_process: bool = False) -> dict[str, jax.Array]:
    """A train step's `[batch, length]` arrays on the mesh, from host (numpy) arrays.

    One process: `host` goes straight to the mesh. Several processes: each reads the same global batch from the
    deterministic pipeline and hands over only the rows its devices hold (disjoint across data-parallel
    processes), so a multi-process run sees the same data as a single process. With `per_process` (data.kind
    corpus / sft / packed) `host` is already this process's own `[batch / processes, length]` rows
    (`dlmjax.data.sharded`) and becomes its slice of the global batch (`assemble_global_batch`).
    """
    if jax.process_count() == 1:
        return jax.device_put(dict(host), sharding)  # straight to the mesh: no stop on the default device
    if per_process:
        return assemble_global_batch(host, sharding)
    rows = process_rows(sharding, np.shape(host["tokens"]))
    return {k: jax.make_array_from_process_local_data(sharding, v[rows], v.shape) for k, v in host.items()}


def assemble_global_batch(local_batch: Mapping[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """One global `[batch_size, L]` array per key from every process's `[batch_size / count, L]` rows.

    `sharding` splits the batch axis over processes (the data-parallel `batch_sharding`); process p's rows
    become global rows `[p * b, (p + 1) * b)` on its devices.
    """
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


@contextlib.contextmanager
def activation_rules(mesh: Mesh | AbstractMesh, rules: LogicalRules = LOGICAL_RULES):
    """While tracing inside this block, the models' `nn.with_logical_constraint` calls place activations on
    `mesh` by `rules` (outside it they are no-ops). Usable inside `jax.jit`, unlike `jax.set_mesh`."""
    m = mesh.abstract_mesh if isinstance(mesh, Mesh) else mesh
    with nn.logical_axis_rules(list(rules)), jax.sharding.use_abstract_mesh(m):
        yield


@dataclasses.dataclass(frozen=True)
class ReplicatedParam:
    """One parameter that every device holds in full. `reason`: why it is listed."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    reason: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        return f"replicated parameter {self.path} {list(self.shape)} {self.dtype}: {self.reason}"


def replicated_report(params, shardings, mesh: Mesh | AbstractMesh, *, logical_specs=None,
                      rules: LogicalRules = LOGICAL_RULES, min_size: int = 2 ** 20) -> list[ReplicatedParam]:
    """Parameters that are fully replicated although they should not be.

    Args:
      params: arrays or ShapeDtypeStructs (e.g. `jax.eval_shape` output).
      shardings: the matching tree of NamedShardings actually used.
      mesh: the mesh (a real `Mesh` or an `AbstractMesh`).
      logical_specs: the parameters' logical PartitionSpecs (`nn.get_partition_spec`); with them, a parameter
        whose rules name mesh axes of size > 1 but that ended up replicated (its dimensions do not divide) is
        listed whatever its size.
      rules: the rules table the shardings were built from.
      min_size: elements; a fully replicated parameter at least this large is listed whatever the rules say,
        unless the mesh is purely data-parallel (fsdp = tensor = 1), where full copies are the plan.
    Returns:
      One `ReplicatedParam` per offending parameter, in tree order (empty on a one-device mesh).
    """
    sizes = dict(mesh.shape)
    if math.prod(sizes.values()) == 1:
        return []
    model_parallel = any(n > 1 for a, n in sizes.items() if a != "data")
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    flat_sh = jax.tree.leaves(shardings)
    flat_specs = (jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, P)) if logical_specs is not None
                  else [None] * len(flat))
    if not len(flat) == len(flat_sh) == len(flat_specs):
        raise ValueError(f"replicated_report: {len(flat)} parameters, {len(flat_sh)} shardings and "
                         f"{len(flat_specs)} logical specs do not match")
    out = []
    for (path, x), sharding, logical in zip(flat, flat_sh, flat_specs):
        shape = tuple(x.shape)
        if tuple(sharding.shard_shape(shape)) != shape:
            continue  # split somewhere
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        reason = None
        if logical is not None:
            wanted = resolve_spec(logical, None, mesh, rules)
            for dim, (n, entry) in enumerate(zip(shape, wanted)):
                ways = math.prod(sizes[a] for a in _axes(entry))
                if ways > 1:
                    reason = (f"the rules split dim {dim} ({logical[dim]}, size {n}) over {_axes(entry)} = {ways} "
                              f"ways, which does not divide it, so it fell back to replicated")
                    break
        if reason is None and model_parallel and math.prod(shape) >= min_size:
            rule = "" if logical is None else f" (logical axes {tuple(logical)})"
            reason = f"{math.prod(shape):,} elements >= min_size {min_size:,} and no rule splits it{rule}"
        if reason is not None:
            out.append(ReplicatedParam(name, shape, str(np.dtype(x.dtype)), reason))
    return out
