"""`dlmjax plan --sample`: bytes per device of sampling from a model on a mesh, nothing allocated or compiled.

The training plan's sibling (`dlmjax.train.plan`, whose per-device byte counting and budgets it shares). Three parts:

* **Parameters**, exact: the model's parameter tree (`jax.eval_shape`) in `model.param_dtype`, placed by the
  run's rules on an `AbstractMesh`; `NamedSharding.shard_shape` gives each device's piece. `--dtype` runs the
  model in another dtype, as `dlmjax sample --dtype` / `open_run(dtype=...)` do: parameters, activations and
  KV cache.
* **KV cache**, a closed form of what the samplers allocate (`kv_cache_bytes`): K and V, `[layers, B', S, Hkv,
  Dh]` each, in the activation dtype `model.dtype`:

      masked sampler, --cache none     S = 0: every step forwards the whole canvas
      masked sampler, prefix / dual    S = N, the whole canvas: a block's first pass keeps every slot's K/V
      block sampler (bd3 runs)         S = N - L': the prompt and committed blocks (the last block is never
                                       committed); one block over the whole row (L' = N, MDLM) runs uncached

  with N = `--length` slots per row (prompt + generation), L' the block length, and B' = 2 x `--batch` with
  classifier-free guidance (the unconditional copy runs in the same batch). The samplers jit over the
  parameters' shardings and let XLA propagate them: the K/V buffers of the compiled programs are split like the
  k/v projections' output dimension (over `tensor` by the default rules; seen in the partitioned HLO on 8 CPU
  devices, with 4 kv heads and with 2 over tensor=4) and every row is on every device (rows are not split over
  data or fsdp, which split only the weights).
* **Activations (est.)**, the largest transients of one forward pass (`activation_bytes`): float32 logits
  `[B', n, V]` of the pass whose logits are used, plus float32 attention scores and probabilities
  `[B', H, n, K]` of one layer where attention is dense (`attention_impl=xla`, and every cached call: the
  kernels take no KV cache), both split over `tensor` like the q projection and the output head. The largest
  pass: the whole canvas (n = N; K = N uncached, K = 2N for the first pass of a cached block, which attends to
  its empty N-slot cache and to itself); for the block sampler the prefill of a prompt that fills all but the
  last block (n = S, K = 2S) and blocks of n = L' against K = S + L' keys, with logits for L' slots. Hidden
  states `[B', n, D]`, XLA temporaries and fragmentation are not counted: treat it as +-30%.

What `--dtype bfloat16` halves: the parameters and the KV cache. Logits, attention scores and confidences are
float32 in any case. (On XLA:CPU a bfloat16 program still holds float32 copies of the weights: CPU matmuls run in
float32, and the converts are hoisted out of the sampling loop; accelerators multiply bfloat16 natively.)
"""
from __future__ import annotations

import dataclasses
import json
import math

import jax
from jax.sharding import PartitionSpec as P

from dlmjax.config import Config
from dlmjax.errors import InputError
from dlmjax.models.layers import DTYPES
from dlmjax.models.specs import param_shardings, param_specs
from dlmjax.sampling.choices import CacheKind
from dlmjax.sharding import abstract_mesh, replicated_report, resolve_spec
from dlmjax.train.plan import HBM_BYTES, budget_note, format_bytes, per_device_bytes

__all__ = ["SamplePlan", "activation_bytes", "format_sample_plan", "in_dtype", "kv_cache_bytes", "make_sample_plan"]


@dataclasses.dataclass(frozen=True)
class SamplePlan:
    """What sampling needs in device memory (`dlmjax plan --sample`). Bytes per device (the largest shard) and in
    total."""

    devices: int
    mesh: dict
    sampler: str  # "masked" or "block"
    cache: str  # masked sampler: none / prefix / dual; block sampler: "prefix" (exact), or "none" (one block)
    batch: int
    rows: int  # batch x 2 with guidance
    length: int
    block_length: int | None  # block sampler
    param_dtype: str
    activation_dtype: str  # and the KV cache's
    n_params: int
    param_bytes: int
    param_bytes_total: int
    kv_cache_bytes: int
    kv_cache_bytes_total: int
    activation_bytes: int
    hbm_bytes: int | None
    replicated: tuple[str, ...]
    problems: tuple[str, ...]

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.kv_cache_bytes + self.activation_bytes


def _ways(spec: P, dim: int, mesh) -> int:
    """Devices dimension `dim` of an array is split over under the mesh PartitionSpec `spec`."""
    entry = tuple(spec)[dim] if dim < len(tuple(spec)) else None
    axes = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    return math.prod(dict(mesh.shape)[a] for a in axes)


def _split(cfg: Config, mesh) -> dict[str, int]:
    """How many ways the k/v projections' output (the cache's heads), the q projection's output (the attention
    heads) and the output head's vocabulary are split: the shardings XLA propagates to the sampler's activations."""
    m, rules = cfg.model, cfg.mesh.rules
    kv, q = m.num_kv_heads * m.head_dim, m.n_heads * m.head_dim
    head = P("vocab", "embed") if m.tie_embeddings else P("embed", "vocab")
    head_shape = (m.vocab_size, m.d_model) if m.tie_embeddings else (m.d_model, m.vocab_size)
    return {"kv": _ways(resolve_spec(P("embed", "kv_heads"), (m.d_model, kv), mesh, rules), 1, mesh),
            "heads": _ways(resolve_spec(P("embed", "heads"), (m.d_model, q), mesh, rules), 1, mesh),
            "vocab": _ways(resolve_spec(head, head_shape, mesh, rules), 0 if m.tie_embeddings else 1, mesh)}


def cache_slots(sampler: str, cache: str, length: int, block_length: int | None) -> int:
    """Slots per row of the sampler's KV cache (0: no cache)."""
    if sampler == "block":
        return length - block_length if block_length < length else 0
    return 0 if cache == CacheKind.NONE else length


def kv_cache_bytes(cfg: Config, rows: int, slots: int, kv_ways: int = 1) -> int:
    """K and V `[layers, rows, slots, Hkv * Dh]` in `model.dtype`, split `kv_ways` ways (per device)."""
    m = cfg.model
    item = jax.numpy.dtype(DTYPES[m.dtype]).itemsize
    return 2 * m.n_layers * rows * slots * (m.num_kv_heads * m.head_dim // kv_ways) * item


def in_dtype(cfg: Config, dtype: str | None) -> Config:
    """`cfg` with the model running in `dtype` (parameters and activations), as `open_run(dtype=...)` runs it."""
    if dtype is None:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype, param_dtype=dtype))


def activation_bytes(cfg: Config, sampler: str, cache: str, rows: int, length: int, block_length: int | None,
                     heads_ways: int = 1, vocab_ways: int = 1) -> int:
    """The largest transients of one forward (see the module docstring): float32 logits of the pass whose logits
    are used + float32 attention scores and probabilities of one layer where attention is dense."""
    m = cfg.model
    heads, vocab = -(-m.n_heads // heads_ways), -(-m.vocab_size // vocab_ways)
    dense = m.attention_impl == "xla"
    if sampler == "block" and block_length < length:
        slots = length - block_length
        logit_slots = block_length
        queries_by_keys = max(slots * 2 * slots, block_length * (slots + block_length))
        dense = True  # every call of the cached block sampler carries a dense mask
    elif sampler == "masked" and cache != CacheKind.NONE:
        logit_slots, queries_by_keys, dense = length, length * 2 * length, True
    else:
        logit_slots, queries_by_keys = length, length * length
    logits = 4 * rows * logit_slots * vocab
    scores = 2 * 4 * rows * heads * queries_by_keys if dense else 0
    return logits + scores


def make_sample_plan(cfg: Config, devices: int, platform: str = "tpu", hbm_bytes: int | None = None, *,
                     batch: int = 1, length: int | None = None, dtype: str | None = None, cache: str | None = None,
                     guidance: bool = False, block_length: int | None = None) -> SamplePlan:
    """The sampling memory plan of `cfg` on `devices` devices (the sampler the run uses: block for bd3 runs).

    Args:
      batch: rows sampled at once; length: slots per row, prompt + generation (default `data.seq_len`).
      dtype: the dtype the model runs in, "bfloat16" or "float32" (parameters, activations and KV cache, as
        `dlmjax.open_run(dtype=...)` runs it; default: the config's); cache: the masked sampler's KV cache (default
        dual); guidance: classifier-free guidance (masked sampler; doubles the rows); block_length: the block
        sampler's block (default `sample.block_length`, else `diffusion.block_size`, else the row).
    Raises:
      InputError: a setting the run's sampler does not have (guidance or a cache mode for the block sampler), or a
        length that is not a whole number of blocks.
    """
    from dlmjax.inference import uses_block_sampler  # noqa: PLC0415 (which sampler: the front door decides)

    if devices < 1:
        raise InputError(f"--devices {devices}: a mesh needs at least one device")
    cfg = in_dtype(cfg, dtype)
    length = cfg.data.seq_len if length is None else length
    sampler = "block" if uses_block_sampler(cfg) else "masked"
    problems = []
    if sampler == "block":
        for flag, given in (("--guidance", guidance), ("--cache", cache is not None)):
            if given:
                raise InputError(f"{flag}: this config (diffusion.objective=bd3) samples with the block sampler, "
                                 "which has an exact KV cache of its prefix and no guidance; the flag belongs to the "
                                 "masked sampler")
        block_length = block_length or cfg.sample.block_length or cfg.diffusion.block_size or length
        if length % block_length:
            raise InputError(f"--length {length} is not a multiple of the block length {block_length} "
                             "(--block-length, else sample.block_length / diffusion.block_size); the block sampler "
                             "fills whole blocks")
        cache = "prefix" if block_length < length else "none"
    else:
        if block_length is not None:
            raise InputError("--block-length: the masked sampler's blocks do not change its memory; the flag is the "
                             "block sampler's (diffusion.objective=bd3 configs)")
        cache = str(CacheKind(cache or CacheKind.DUAL))
    if length > cfg.model.max_seq_len:
        problems.append(f"--length {length} exceeds the model's context model.max_seq_len={cfg.model.max_seq_len}")
    rows = batch * (2 if guidance else 1)

    mesh = abstract_mesh(cfg.mesh, devices)
    like, shardings = param_shardings(cfg.model, mesh, cfg.mesh.rules)
    param_local, param_total = per_device_bytes(like, shardings)
    _, logical = param_specs(cfg.model)
    report = replicated_report(like, shardings, mesh, logical_specs=logical, rules=cfg.mesh.rules)
    split = _split(cfg, mesh)
    slots = cache_slots(sampler, cache, length, block_length)
    budget = hbm_bytes if hbm_bytes is not None else HBM_BYTES[platform]
    plan = SamplePlan(
        devices=devices, mesh=dict(mesh.shape), sampler=sampler, cache=cache, batch=batch, rows=rows, length=length,
        block_length=block_length if sampler == "block" else None, param_dtype=cfg.model.param_dtype,
        activation_dtype=cfg.model.dtype,
        n_params=sum(math.prod(x.shape) for x in jax.tree.leaves(like)), param_bytes=param_local,
        param_bytes_total=param_total, kv_cache_bytes=kv_cache_bytes(cfg, rows, slots, split["kv"]),
        kv_cache_bytes_total=kv_cache_bytes(cfg, rows, slots),
        activation_bytes=activation_bytes(cfg, sampler, cache, rows, length, block_length, split["heads"],
                                          split["vocab"]),
        hbm_bytes=budget, replicated=tuple(str(r) for r in report), problems=tuple(problems))
    if budget is not None and plan.total_bytes > budget:
        plan = dataclasses.replace(plan, problems=plan.problems + (
            f"estimated {format_bytes(plan.total_bytes)} per device exceeds the {format_bytes(budget)} of a "
            f"{platform} device",))
    return plan


def format_sample_plan(plan: SamplePlan, cfg: Config, platform: str) -> str:
    """A human-readable table followed by one JSON line (the last line) with the same numbers in bytes."""
    m = cfg.model
    mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
    what = (f"block sampler, blocks of {plan.block_length}" if plan.sampler == "block"
            else f"masked sampler, cache {plan.cache}")
    rows = f"{plan.batch} rows" + (f" (x2 guidance: {plan.rows})" if plan.rows != plan.batch else "")
    count = f"{plan.n_params / 1e9:.3f}B" if plan.n_params >= 1e9 else f"{plan.n_params / 1e6:.2f}M"
    lines = [
        f"sample plan: {plan.devices} {platform} devices, mesh {mesh}",
        f"model: {count} parameters in {plan.param_dtype}, activations and KV cache {plan.activation_dtype}, "
        f"attention {m.attention_impl}",
        f"sampling: {what}; {rows} x {plan.length} slots (prompt + generation)",
        "",
        f"{'':<22}{'per device':>14}{'unsharded':>14}",
        f"{'parameters':<22}{format_bytes(plan.param_bytes):>14}{format_bytes(plan.param_bytes_total):>14}",
        f"{'KV cache':<22}{format_bytes(plan.kv_cache_bytes):>14}{format_bytes(plan.kv_cache_bytes_total):>14}",
        f"{'activations (est.)':<22}{format_bytes(plan.activation_bytes):>14}",
        f"{'total':<22}{format_bytes(plan.total_bytes):>14}" + budget_note(plan.total_bytes, plan.hbm_bytes),
    ]
    lines += [f"warning: {p}" for p in plan.replicated + plan.problems]
    record = {"sample": True, "devices": plan.devices, "platform": platform, "mesh": plan.mesh,
              "sampler": plan.sampler, "cache": plan.cache, "batch": plan.batch, "rows": plan.rows,
              "length": plan.length, "block_length": plan.block_length, "param_dtype": plan.param_dtype,
              "activation_dtype": plan.activation_dtype,
              "n_params": plan.n_params, "param_bytes": plan.param_bytes, "kv_cache_bytes": plan.kv_cache_bytes,
              "activation_bytes": plan.activation_bytes, "total_bytes": plan.total_bytes,
              "param_bytes_total": plan.param_bytes_total, "kv_cache_bytes_total": plan.kv_cache_bytes_total,
              "hbm_bytes": plan.hbm_bytes, "replicated": list(plan.replicated), "problems": list(plan.problems)}
    return "\n".join(lines + [json.dumps(record)])
