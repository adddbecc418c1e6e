"""Multi-process start-up: `maybe_initialize()` calls `jax.distributed.initialize` when the environment asks.

One process runs per host (TPU VM worker, SLURM task) or per group of local devices; together they see every
device of the job through `jax.devices()`. Which environment applies is decided once, in this order:

1. `DLMJAX_DISTRIBUTED=0` (or `off`/`false`/`no`): never initialize (one process, local devices only).
2. Explicit variables, all three or none: `DLMJAX_COORDINATOR=host:port` (process 0's address; it listens on
   that port), `DLMJAX_NUM_PROCESSES`, `DLMJAX_PROCESS_ID`; optional `DLMJAX_LOCAL_DEVICE_IDS=0,1` (the
   accelerators this process uses; GPU/TPU only).
3. SLURM, inside `srun` (`SLURM_STEP_NODELIST` set) with `SLURM_NTASKS > 1`: the coordinator is the first
   node of `SLURM_STEP_NODELIST`, port `DLMJAX_COORDINATOR_PORT` or 12000 + `SLURM_JOB_ID` % 1000 (so two
   jobs sharing a node do not collide); process id `SLURM_PROCID`, count `SLURM_NTASKS`.
4. A Cloud TPU VM (`/dev/accel*`, `/dev/vfio/<n>` or `TPU_*` variables): JAX detects the slice itself, so
   `jax.distributed.initialize()` is called without arguments (also on a single-host TPU VM, where it is a
   one-process job). `DLMJAX_DISTRIBUTED=1` forces the same call anywhere JAX can detect a cluster.
5. Otherwise nothing happens: a single process.

CPU processes exchange data through gloo collectives (`jax_cpu_collectives_implementation`), which lets the
test suite run a 2-process job on one machine (`tests/test_multiprocess.py`, `launch/local_multiprocess.sh`).
`maybe_initialize` must run before JAX's first use of a device; it is idempotent.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
import re
from collections.abc import Mapping

import jax

from dlmjax.errors import DistributedError

COORDINATOR, NUM_PROCESSES, PROCESS_ID = "DLMJAX_COORDINATOR", "DLMJAX_NUM_PROCESSES", "DLMJAX_PROCESS_ID"
LOCAL_DEVICE_IDS, SWITCH, COORDINATOR_PORT = "DLMJAX_LOCAL_DEVICE_IDS", "DLMJAX_DISTRIBUTED", "DLMJAX_COORDINATOR_PORT"
EXPLICIT = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)
SLURM_BASE_PORT = 12000
_OFF, _ON = ("0", "off", "false", "no"), ("1", "on", "true", "yes")
TPU_ENV_HINTS = ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "MEGASCALE_COORDINATOR_ADDRESS")


class DistributedConfigError(DistributedError):
    """The environment describes a multi-process job incompletely or inconsistently."""


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How to call `jax.distributed.initialize`; `source` is `explicit`, `slurm` or `auto` (JAX detects all)."""

    source: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    def kwargs(self) -> dict:
        if self.source == "auto":
            return {}
        kw = dict(coordinator_address=self.coordinator, num_processes=self.num_processes,
                  process_id=self.process_id)
        if self.local_device_ids is not None:
            kw["local_device_ids"] = list(self.local_device_ids)
        return kw


_done: LaunchPlan | None = None  # the plan this process initialized with


def _int(env: Mapping[str, str], name: str, *, minimum: int) -> int:
    text = env[name]
    try:
        value = int(text)
    except ValueError:
        raise DistributedConfigError(f"{name}={text!r} is not an integer") from None
    if value < minimum:
        raise DistributedConfigError(f"{name}={text!r} must be >= {minimum}")
    return value


def _check_address(name: str, text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedConfigError(f"{name}={text!r} must be host:port with a port in 1..65535, "
                                     f"e.g. 10.0.0.2:12345 (process 0's address)")
    return text


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: `gpu[003-005,9],cpu1` -> `gpu003`, `a1,b2` -> `a1`."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match or not match.group(1):
        raise DistributedConfigError(f"SLURM_STEP_NODELIST={nodelist!r} is not a SLURM host list")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]  # zero padding of the range start is kept


def _explicit(env: Mapping[str, str]) -> LaunchPlan:
    missing = [n for n in EXPLICIT if not env.get(n)]
    given = [f"{n}={env[n]!r}" for n in EXPLICIT if env.get(n)]
    if missing:
        raise DistributedConfigError(
            f"multi-process run half configured: {', '.join(given)} set but {', '.join(missing)} missing; set all "
            f"of {', '.join(EXPLICIT)} (or none, for a single process)")
    n = _int(env, NUM_PROCESSES, minimum=1)
    pid = _int(env, PROCESS_ID, minimum=0)
    if pid >= n:
        raise DistributedConfigError(f"{PROCESS_ID}={env[PROCESS_ID]!r} must be < "
                                     f"{NUM_PROCESSES}={env[NUM_PROCESSES]!r} (ids run from 0 to {n - 1})")
    ids = None
    if env.get(LOCAL_DEVICE_IDS):
        try:
            ids = tuple(int(t) for t in env[LOCAL_DEVICE_IDS].split(","))
        except ValueError:
            raise DistributedConfigError(f"{LOCAL_DEVICE_IDS}={env[LOCAL_DEVICE_IDS]!r} must be comma-separated "
                                         f"device numbers, e.g. 0,1") from None
    return LaunchPlan("explicit", _check_address(COORDINATOR, env[COORDINATOR]), n, pid, ids)


def _slurm(env: Mapping[str, str]) -> LaunchPlan:
    n = _int(env, "SLURM_NTASKS", minimum=1)
    if not env.get("SLURM_STEP_NODELIST"):
        raise DistributedConfigError(f"SLURM_NTASKS={env['SLURM_NTASKS']!r} but SLURM_STEP_NODELIST is unset: start "
                                     f"one process per task with `srun`, not directly from the batch script")
    for name in ("SLURM_PROCID", "SLURM_JOB_ID"):
        if not env.get(name):
            raise DistributedConfigError(f"SLURM_NTASKS={env['SLURM_NTASKS']!r} but {name} is unset; is this a "
                                         f"SLURM job step?")
    pid = _int(env, "SLURM_PROCID", minimum=0)
    if pid >= n:
        raise DistributedConfigError(f"SLURM_PROCID={env['SLURM_PROCID']!r} must be < "
                                     f"SLURM_NTASKS={env['SLURM_NTASKS']!r}")
    if env.get(COORDINATOR_PORT):
        port = _int(env, COORDINATOR_PORT, minimum=1)
    else:
        port = SLURM_BASE_PORT + _int(env, "SLURM_JOB_ID", minimum=0) % 1000
    return LaunchPlan("slurm", f"{first_host(env['SLURM_STEP_NODELIST'])}:{port}", n, pid)


def on_tpu_vm(env: Mapping[str, str] = os.environ) -> bool:
    """A Cloud TPU VM: the TPU_* variables its image sets, or TPU device files with libtpu installed (vfio devices
    alone also appear on GPU passthrough hosts)."""
    if any(env.get(k) for k in TPU_ENV_HINTS):
        return True
    devices = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(devices) and importlib.util.find_spec("libtpu") is not None


def launch_plan(env: Mapping[str, str] = os.environ) -> LaunchPlan | None:
    """What `maybe_initialize` would do in `env` (None: stay a single process). Raises on a half-configured job."""
    switch = env.get(SWITCH, "").strip().lower()
    if switch and switch not in _OFF + _ON + ("auto",):
        raise DistributedConfigError(f"{SWITCH}={env[SWITCH]!r}: use 0 (never initialize), 1 (always, letting "
                                     f"JAX detect the cluster when no DLMJAX_* variables are set) or auto")
    if switch in _OFF:
        return None
    if any(env.get(n) for n in EXPLICIT):
        return _explicit(env)
    if env.get(LOCAL_DEVICE_IDS):
        raise DistributedConfigError(f"{LOCAL_DEVICE_IDS}={env[LOCAL_DEVICE_IDS]!r} is set but none of "
                                     f"{', '.join(EXPLICIT)}; set those too")
    if env.get("SLURM_NTASKS") and env.get("SLURM_NTASKS") != "1" and "SLURM_JOB_ID" in env:
        return _slurm(env)
    if switch in _ON or on_tpu_vm(env):
        return LaunchPlan("auto")
    return None


def maybe_initialize(env: Mapping[str, str] | None = None) -> LaunchPlan | None:
    """Join the multi-process job described by the environment (see the module doc); returns the plan used.

    Call before anything touches a JAX device. Calling it again is a no-op that returns the same plan; so is
    calling it after someone else initialized `jax.distributed` (returns `LaunchPlan("external")`).
    """
    global _done
    if _done is not None:
        return _done
    if jax.distributed.is_initialized():
        _done = LaunchPlan("external")
        return _done
    chosen = launch_plan(os.environ if env is None else env)
    if chosen is None:
        return None
    # gloo is JAX's default CPU collectives today; set it explicitly so a changed default cannot silently
    # leave CPU processes unable to run cross-process collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**chosen.kwargs())
    except RuntimeError as e:
        if "must be called before" not in str(e):
            raise
        if chosen.source == "auto" and not (os.environ if env is None else env).get(SWITCH):
            # a notebook on a single-host TPU VM that already used JAX: it keeps running as one process
            logging.getLogger(__name__).warning(
                "TPU VM detected but JAX is already initialized, so this process runs alone (%s). Call "
                "dlmjax.distributed.maybe_initialize() before using JAX to join a multi-host slice, or set %s=0.",
                e, SWITCH)
            return None
        raise RuntimeError(f"{chosen.source} multi-process job ({chosen}): jax.distributed.initialize failed "
                           f"because JAX was already used in this process; call "
                           f"dlmjax.distributed.maybe_initialize() before the first JAX computation or "
                           f"jax.devices() call") from e
    _done = chosen
    return chosen


__all__ = ["DistributedConfigError", "LaunchPlan", "first_host", "maybe_initialize", "launch_plan", "on_tpu_vm"]
