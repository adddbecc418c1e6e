"""`dlmjax plan`: bytes per device of a training run on N devices, without allocating anything or owning them.

The train state is built with `jax.eval_shape` and placed by the run's rules on an `AbstractMesh` of N devices;
`NamedSharding.shard_shape` gives the exact per-device shape of every parameter and optimizer leaf. Activations
are an estimate (XLA's real peak depends on fusion and scheduling); the formula is `activation_bytes`.
"""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np

from dlmjax.config import Config
from dlmjax.models.layers import DTYPES
from dlmjax.sharding import abstract_mesh, replicated_report
from dlmjax.train.state import abstract_train_state, make_optimizer, param_specs

# Default memory per device for --platform: TPU v5e (16 GiB HBM), H100 (80 GiB); cpu: no budget.
HBM_BYTES = {"tpu": 16 * 2 ** 30, "gpu": 80 * 2 ** 30, "cpu": None}
# Float32 [rows, length, vocab/tensor] copies alive at the loss: logits, log-probabilities, their gradient.
LOGIT_COPIES = 3


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What a run needs in device memory (`dlmjax plan`). Bytes per device (the largest shard, i.e. device 0 for even splits) and in total."""

    devices: int
    mesh: dict
    n_params: int
    param_bytes: int  # per device
    opt_bytes: int  # per device
    grad_bytes: int  # per device: gradients are sharded like the parameters
    activation_bytes: int  # per device, estimate
    param_bytes_total: int
    opt_bytes_total: int
    rows_per_device: int
    hbm_bytes: int | None
    replicated: tuple[str, ...]  # `replicated_report` lines
    problems: tuple[str, ...]

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.opt_bytes + self.grad_bytes + self.activation_bytes


def per_device_bytes(tree, shardings) -> tuple[int, int]:
    """(bytes of one device's shards, bytes of the whole arrays) over a tree of ShapeDtypeStructs."""
    local = total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        item = np.dtype(x.dtype).itemsize
        local += math.prod(s.shard_shape(x.shape)) * item
        total += math.prod(x.shape) * item
    return local, total


def activation_bytes(cfg: Config, rows: int, tensor: int) -> int:
    """Estimated activation bytes per device for one train step (forward + backward).

    With `b = rows` per device, `L = data.seq_len` (x2 for bd3, which reads [x_t ; x_0]), `D = d_model`,
    `M = mlp_hidden`, `H`/`Hkv` heads, `Dh` head_dim, `t = mesh.tensor`, `a` bytes of `model.dtype`, one layer
    keeps per token, for the backward pass,

        per_layer = a * (4*D + ((2*H + 2*Hkv)*Dh + 3*M) / t)

    elements: the block input and mid-block residual, two norm outputs (4 D), rotated q and k, v and the
    attention output ((2H + 2Hkv) Dh, split over tensor), gate, up and their product (3 M, split over tensor). For
    LLaDA-8B (D 4096, M 12288, H = Hkv = 32) this is ~17 D elements per token per layer. `attention_impl=xla`
    also materialises float32 scores and probabilities, `8 * H/t * L` bytes per token per layer; the Pallas
    kernels keep only a float32 log-sum-exp (`4 * H/t`).

        remat off: b * L * n_layers * per_layer
        remat on:  b * L * (n_layers * a * D + per_layer)   (block inputs, plus one block recomputed)

    plus the loss: `LOGIT_COPIES` float32 copies of [b, L, V/t]. Not counted: parameters of one layer
    all-gathered by FSDP (at most a few layers' `param_bytes_total / n_layers`), XLA temporaries and
    fragmentation; expect the real peak within about +-30%.
    """
    m = cfg.model
    a = np.dtype(DTYPES[m.dtype]).itemsize
    length = cfg.data.seq_len * (2 if cfg.diffusion.objective == "bd3" else 1)
    d, dh = m.d_model, m.head_dim
    per_layer = a * (4 * d + ((2 * m.n_heads + 2 * m.num_kv_heads) * dh + 3 * m.mlp_hidden) / tensor)
    heads = m.n_heads / tensor
    per_layer += 8 * heads * length if m.attention_impl == "xla" else 4 * heads
    if m.remat:
        layers = m.n_layers * a * d + per_layer
    else:
        layers = m.n_layers * per_layer
    logits = LOGIT_COPIES * 4 * m.vocab_size / tensor
    return int(rows * length * (layers + logits))


def make_plan(cfg: Config, devices: int, platform: str = "tpu", hbm_bytes: int | None = None) -> MemoryPlan:
    """The memory plan of `cfg` on `devices` devices of `platform` (nothing is allocated or compiled)."""
    if devices < 1:
        raise ValueError(f"--devices {devices}: a mesh needs at least one device")
    mesh = abstract_mesh(cfg.mesh, devices)
    sizes = dict(mesh.shape)
    rules = cfg.mesh.rules
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    like, shardings = abstract_train_state(cfg.model, tx, mesh, rules)
    param_local, param_total = per_device_bytes(like.params, shardings.params)
    opt_local, opt_total = per_device_bytes(like.opt_state, shardings.opt_state)
    abstract_params, logical = param_specs(cfg.model)
    report = replicated_report(abstract_params, shardings.params, mesh, logical_specs=logical, rules=rules)
    problems = []
    batch_ways = sizes["data"] * sizes["fsdp"]
    if cfg.data.batch_size % batch_ways:
        problems.append(f"data.batch_size={cfg.data.batch_size} is not divisible by data*fsdp={batch_ways}: "
                        f"the batch cannot be split evenly (use a multiple of {batch_ways})")
    rows = -(-cfg.data.batch_size // batch_ways)
    budget = hbm_bytes if hbm_bytes is not None else HBM_BYTES[platform]
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(like.params))
    plan = MemoryPlan(devices=devices, mesh=sizes, n_params=n_params, param_bytes=param_local, opt_bytes=opt_local,
                      grad_bytes=param_local, activation_bytes=activation_bytes(cfg, rows, sizes["tensor"]),
                      param_bytes_total=param_total, opt_bytes_total=opt_total, rows_per_device=rows,
                      hbm_bytes=budget, replicated=tuple(str(r) for r in report), problems=tuple(problems))
    if budget is not None and plan.total_bytes > budget:
        plan = dataclasses.replace(plan, problems=plan.problems + (
            f"estimated {format_bytes(plan.total_bytes)} per device exceeds the {format_bytes(budget)} of a "
            f"{platform} device",))
    return plan


def budget_note(total: int, hbm: int | None) -> str:
    """`   of 16.00 GiB (47%)` after a total, or nothing without a budget."""
    return f"   of {format_bytes(hbm)} ({100 * total / hbm:.0f}%)" if hbm else ""


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_plan(plan: MemoryPlan, cfg: Config, platform: str) -> str:
    """A human-readable table followed by one JSON line (the last line) with the same numbers in bytes."""
    m = cfg.model
    mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
    lines = [
        f"plan: {plan.devices} {platform} devices, mesh {mesh}",
        f"model: {_count(plan.n_params)} parameters ({m.param_dtype}), activations {m.dtype}, "
        f"remat {'on' if m.remat else 'off'}, attention {m.attention_impl}",
        f"batch: {cfg.data.batch_size} rows x {cfg.data.seq_len} tokens, {plan.rows_per_device} rows per device",
        "",
        f"{'':<22}{'per device':>14}{'unsharded':>14}",
        f"{'parameters':<22}{format_bytes(plan.param_bytes):>14}{format_bytes(plan.param_bytes_total):>14}",
        f"{'optimizer state':<22}{format_bytes(plan.opt_bytes):>14}{format_bytes(plan.opt_bytes_total):>14}",
        f"{'gradients':<22}{format_bytes(plan.grad_bytes):>14}",
        f"{'activations (est.)':<22}{format_bytes(plan.activation_bytes):>14}",
        f"{'total':<22}{format_bytes(plan.total_bytes):>14}" + budget_note(plan.total_bytes, plan.hbm_bytes),
    ]
    lines += [f"warning: {p}" for p in plan.replicated + plan.problems]
    record = {"devices": plan.devices, "platform": platform, "mesh": plan.mesh, "n_params": plan.n_params,
              "rows_per_device": plan.rows_per_device, "param_bytes": plan.param_bytes,
              "opt_bytes": plan.opt_bytes, "grad_bytes": plan.grad_bytes,
              "activation_bytes": plan.activation_bytes, "total_bytes": plan.total_bytes,
              "param_bytes_total": plan.param_bytes_total, "opt_bytes_total": plan.opt_bytes_total,
              "hbm_bytes": plan.hbm_bytes, "remat": m.remat, "replicated": list(plan.replicated),
              "problems": list(plan.problems)}
    return "\n".join(lines + [json.dumps(record)])
