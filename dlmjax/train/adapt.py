"""Adaptation from an autoregressive model: start a run's parameters from a checkpoint, and LLaDA2.0's block-size
schedule.

Starting point (`train.init_from`). A new run takes its parameters, and nothing else, from

* a training workdir: its newest committed checkpoint step (e.g. an AR run, `diffusion.objective bd3` with
  `block_size 1`, configs/addition_ar.yaml), or
* a params-only export, e.g. one written by `dlmjax convert --from-hf DIR --arch dream` from a Dream / Qwen2
  release (a bidirectional Qwen2 with a mask token; see "Hugging Face causal LMs" below).

The optimizer state is fresh (Adam's moments zero, its count 0), the step is 0, and the training noise comes
from this run's `train.seed` exactly as for a randomly initialised run. The parameters are read by
`dlmjax.checkpoint.load` (a params-only restore: the source's optimizer state is neither read nor allocated),
cast to this run's `model.param_dtype` while reading, then placed in this run's shardings.

The model sections must describe the same network: every `ModelConfig` field except the `RUNTIME_FIELDS` (how
the network is run and how a fresh one would be initialised, not what it computes: context length, activation
and parameter dtypes, attention kernel, rematerialisation, init scale) must be equal. A mismatch, a missing
folder or a folder without a checkpoint is refused with one `ConfigError` naming `train.init_from` (and the field
with both values) before any data is read or anything is written. A run that already has checkpoints resumes from
them and ignores `train.init_from` (the source is not even looked at), so preemption and resume stay exact.

Block-size schedule (`diffusion.block_schedule`, LLaDA2.0's warm-up / stable / decay). A list of
`[until_step, block_size]` pairs: step s (0-based, the step being trained) uses the block size of the first
entry with s < until_step. Warm-up grows the block from the AR model's 1 (where the bd3 objective is exactly
next-token prediction, so step 0 reproduces the AR model) to larger blocks, a stable phase may train at the full
row (`data.seq_len`: MDLM), and a decay phase returns to the small block the run samples with. The block size of
a step is a pure function of the step, so a resume at any step is exact. The train step is compiled once per
distinct block size (`dlmjax.train.loop`); held-out NELBO, sampling and evaluation always use
`diffusion.block_size`, which must be the schedule's last size (validated in `dlmjax.config`), so numbers are
comparable across phases. Packed corpora (`data.kind` corpus / packed) align documents to `diffusion.block_size`
only: in a phase with larger blocks a block may hold the end of one document and the start of the next (attention
stays inside each document; the two share the block's noise level).

Hugging Face causal LMs. Convert the release first: `dlmjax convert --from-hf DIR --arch dream --mask-id N
--out CKPT` reads plain `Qwen2ForCausalLM` (q/k/v biases) and `LlamaForCausalLM` (none) folders as well as Dream
releases; a causal LM has no mask token, so `--mask-id` names the embedding row the diffusion model will use as
[MASK] (an unused row: the user's choice). Then `train.init_from: CKPT` with `model.arch: dream` (shifted logits:
at block size 1 the bd3 objective is exactly the causal LM's next-token loss).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from dlmjax.config import Config, DiffusionConfig, ModelConfig

# ModelConfig fields that may differ between a run and the checkpoint it starts from: they change how the
# network runs (or how a fresh one would be drawn), not the function its parameters compute.
RUNTIME_FIELDS = ("max_seq_len", "init_std", "dtype", "param_dtype", "attention_impl", "remat")
FIELD = "train.init_from"


@dataclasses.dataclass(frozen=True)
class InitSource:
    """A checked `train.init_from`: the absolute `path`, its `kind` (`run` or `export`) and its run config."""

    path: Path
    kind: str
    config: Config


# ---- the block-size schedule ---------------------------------------------------------------------------------

def block_size_at(diff_cfg: DiffusionConfig, step: int) -> int:
    """The `diffusion.block_size` value step `step` (0-based) trains with: the schedule's entry for the step, or
    `diff_cfg.block_size` (0 meaning the row) when there is no schedule. Steps past the last until_step (a run
    the config check would refuse) keep the last size."""
    for until, size in diff_cfg.block_schedule:
        if step < until:
            return size
    return diff_cfg.block_schedule[-1][1] if diff_cfg.block_schedule else diff_cfg.block_size


def diffusion_at(diff_cfg: DiffusionConfig, block_size: int) -> DiffusionConfig:
    """The objective's settings for steps that train with `block_size`: `diff_cfg` without its schedule."""
    return dataclasses.replace(diff_cfg, block_size=block_size, block_schedule=())


def block_sizes(diff_cfg: DiffusionConfig, start: int, stop: int) -> tuple[int, ...]:
    """The distinct block sizes of steps start..stop-1, in the order they first occur (one compile each)."""
    sizes = [block_size_at(diff_cfg, start)] if start < stop else []
    for until, size in diff_cfg.block_schedule:
        if start < until < stop:  # a phase boundary inside the range: step `until` starts the next entry
            sizes.append(block_size_at(diff_cfg, until))
    return tuple(dict.fromkeys(sizes))


# ---- the starting point ----------------------------------------------------------------------------------------

def check_init_from(cfg: Config) -> InitSource:
    """Check `cfg.train.init_from` without reading a parameter: it exists, holds a committed checkpoint step or a
    params export, and its model section matches `cfg.model`. Raises one-line `ConfigError`s naming the field."""
    from dlmjax.checkpoint import Checkpointer, find_checkpoint_dir, is_params_export, read_config  # noqa: PLC0415
    from dlmjax.checkpoint.run import absolute, short_error  # noqa: PLC0415
    from dlmjax.errors import ConfigError  # noqa: PLC0415

    raw = cfg.train.init_from
    path = absolute(raw)
    given = f"{FIELD}={raw!r}"
    if not path.exists():
        raise ConfigError(f"{given}: {path} does not exist; give a training workdir (its newest checkpoint is used) "
                          f"or a params export (written by `dlmjax convert --from-hf`)", field=FIELD)
    if not path.is_dir():
        raise ConfigError(f"{given}: {path} is a file; give a training workdir or a params export folder", field=FIELD)
    if is_params_export(path):
        kind = "export"
    else:
        ckpt = Checkpointer(find_checkpoint_dir(path), read_only=True)
        try:
            has_steps = bool(ckpt.steps())
        finally:
            ckpt.close()
        if not has_steps:
            hint = (" (a Hugging Face folder: convert it first with `dlmjax convert --from-hf DIR --arch dream --out "
                    "CKPT` and give CKPT)" if any(path.glob("*.safetensors")) else "")
            raise ConfigError(f"{given}: {path} holds no committed checkpoint step and is not a params export"
                              f"{hint}", field=FIELD)
        kind = "run"
    try:
        source = read_config(path)
    except ConfigError as e:
        raise ConfigError(f"{given}: the config saved in {path} is not valid here ({e})", field=FIELD) from None
    except Exception as e:  # noqa: BLE001 - an unreadable config is the user's folder, named with its cause
        raise ConfigError(f"{given}: the config saved in {path} could not be read ({short_error(e, 200)})",
                          field=FIELD) from e
    check_same_model(cfg.model, source.model, where=given)
    return InitSource(path=path, kind=kind, config=source)


def check_same_model(run: ModelConfig, source: ModelConfig, *, where: str = FIELD) -> None:
    """Raise a one-line `ConfigError` naming the first `ModelConfig` field (outside `RUNTIME_FIELDS`) on which
    the run's model and the source's differ, with both values."""
    from dlmjax.errors import ConfigError  # noqa: PLC0415

    diffs = [f.name for f in dataclasses.fields(ModelConfig)
             if f.name not in RUNTIME_FIELDS and getattr(run, f.name) != getattr(source, f.name)]
    if diffs:
        name = diffs[0]
        more = f" (and {len(diffs) - 1} more: {', '.join('model.' + d for d in diffs[1:4])})" if len(diffs) > 1 else ""
        raise ConfigError(f"{where}: model.{name}={getattr(source, name)!r} there, {getattr(run, name)!r} here{more}; "
                          f"the run's model section must match the checkpoint it starts from", field=f"model.{name}")


def load_init_params(source: InitSource, cfg: Config, mesh, shardings):
    """The parameters of `source` (checked by `check_init_from`) as this run's `model.param_dtype`, placed in
    `shardings` (the params shardings of this run's train state)."""
    from dlmjax.checkpoint import load  # noqa: PLC0415

    _, params = load(source.path, mesh=mesh, dtype=cfg.model.param_dtype)
    return jax.device_put(params, shardings)


__all__ = ["FIELD", "InitSource", "RUNTIME_FIELDS", "block_size_at", "block_sizes", "check_init_from",
           "check_same_model", "diffusion_at", "load_init_params"]
