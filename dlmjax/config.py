"""Run configuration: frozen dataclasses, loaded from YAML plus `section.key=value` overrides.

One loader (`load_config`) turns files and overrides into a `Config` and validates every field and every
cross-field rule once, so that the rest of the code can trust its inputs. Layers receive their own
sub-config (`ModelConfig`, ...), never the whole run config.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dlmjax.errors import ConfigError  # re-exported: `from dlmjax.config import ConfigError`


def _check_choice(section: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{name}={value!r} is not allowed; choose one of {sorted(allowed)}")


def _check_positive(section: str, name: str, value, *, allow_zero: bool = False) -> None:
    if not (value > 0 or (allow_zero and value == 0)):  # written so that NaN fails too
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{name}={value!r} must be {bound}", field=f"{section}.{name}")


def _check_range(section: str, name: str, value, low: float, high: float, *, high_open: bool = True) -> None:
    """`low <= value < high` (or `<= high` with `high_open=False`); NaN fails."""
    if not (low <= value < high or (not high_open and value == high)):
        interval = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ConfigError(f"{section}.{name}={value!r} must be in {interval}", field=f"{section}.{name}")


def _check_finite(section: str, config) -> None:
    """Every float field of a section is a finite number (a NaN or infinity never means anything here)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{section}.{f.name}={value!r} is not allowed; give a finite number",
                              field=f"{section}.{f.name}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The denoiser network.

    arch: `llada` (LLaDA/LLaMA-style transformer: RMSNorm, rotary, SwiGLU, no biases), `dream` (the same with
    q/k/v biases and shifted logits, i.e. Qwen2 as Dream uses it) or `dit` (the MDLM / BD3-LM DiT: LayerNorm,
    adaLN time conditioning, rotary, GELU MLP; `cond_dim`, `time_conditioning`, `adaln`).
    """

    arch: str = "llada"
    vocab_size: int = 260
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 means n_heads (no grouped-query attention)
    mlp_hidden: int = 384
    max_seq_len: int = 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "float32"  # activations; norms, RoPE and logits stay float32
    param_dtype: str = "float32"
    attention_impl: str = "xla"  # or "pallas" (kernels_pallas: Mosaic on TPU, Triton on GPU), "pallas_interpret"
    remat: bool = False
    scan_layers: bool = False
    qkv_bias: bool = False  # llada/dream: biases on the q/k/v projections (Dream/Qwen2: true)
    cond_dim: int = 128  # dit: width of the time-conditioning vector c
    time_conditioning: bool = False  # dit: feed sigma(t) to adaLN; false feeds sigma = 0 (MDLM/BD3 default)
    adaln: bool = True  # dit: adaLN modulation in the blocks (BD3-LM's `adaln` flag)

    def __post_init__(self):
        s = "model"
        _check_finite(s, self)
        _check_choice(s, "arch", self.arch, {"llada", "dream", "dit"})
        _check_positive(s, "cond_dim", self.cond_dim)
        if self.arch == "dit" and self.qkv_bias:
            raise ConfigError("model.qkv_bias=true applies to arch llada/dream; the DiT's attn_qkv has no bias")
        _check_choice(s, "dtype", self.dtype, {"float32", "bfloat16"})
        _check_choice(s, "param_dtype", self.param_dtype, {"float32", "bfloat16"})
        _check_choice(s, "attention_impl", self.attention_impl, {"xla", "pallas", "pallas_interpret"})
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden", "max_seq_len"):
            _check_positive(s, name, getattr(self, name))
        _check_positive(s, "n_kv_heads", self.n_kv_heads, allow_zero=True)
        for name in ("rope_theta", "norm_eps", "init_std"):
            _check_positive(s, name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model.d_model/model.n_heads={self.head_dim} must be even for rotary embeddings")
        if self.num_kv_heads > self.n_heads or self.n_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads} (0 means n_heads)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def num_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


# `diffusion.block_schedule`: (until_step, block_size) pairs, as YAML `[[until_step, block_size], ...]`.
BlockSchedule = tuple[tuple[int, int], ...]


def _normalize_block_schedule(raw: Any) -> BlockSchedule:
    """YAML/JSON `[[until_step, block_size], ...]` -> a tuple of int pairs, or a one-line ConfigError naming the
    entry. Until-steps are positive and strictly increasing, block sizes positive (cross-field rules: `Config`)."""
    where = "diffusion.block_schedule"
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"{where}={raw!r} must be a list of [until_step, block_size] pairs, e.g. "
                          f"[[200, 1], [1000, 4]]", field=where)
    out = []
    for i, entry in enumerate(raw):
        ok = (isinstance(entry, (list, tuple)) and len(entry) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in entry))
        if not ok or entry[0] < 1 or entry[1] < 1:
            raise ConfigError(f"{where}[{i}]={_plain(entry)!r} must be a pair [until_step, block_size] of ints >= 1",
                              field=where)
        if out and entry[0] <= out[-1][0]:
            raise ConfigError(f"{where}[{i}]={_plain(entry)!r}: until_step {entry[0]} must be larger than the "
                              f"previous entry's {out[-1][0]} (steps increase)", field=where)
        out.append((int(entry[0]), int(entry[1])))
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    """The absorbing-state forward process and the training objective.

    objective: `llada_sft` (prompt never masked, 1/p weight, normalised by answer length), `llada` (pre-training:
    1/p weight, normalised by B*L), `mdlm` (continuous-time NELBO with SUBS, normalised by valid tokens) or
    `bd3` (BD3-LM block diffusion: one noise level t per (row, block) drawn in [clip_min, clip_max], mask
    probability p = t, the model reads [x_t ; x_0]; prompts stay clean). bd3 fixes its own schedule (p = t,
    weight 1/t), so `schedule` and `eps` do not apply to it.

    block_size: bd3 block length L' (0 means data.seq_len, i.e. MDLM); 1 with clip_min = clip_max = 1 is
    exactly autoregressive. clip_min, clip_max: BD3's clipped schedule (beta, omega); (1e-3, 1) is unbiased.
    As in the reference, clip_min > 0.5 also replaces the 1/t weight by 1 (meant for the t = 1 AR check).

    block_times (bd3 only): how the per-block times are drawn in [clip_min, clip_max]. `independent` (BD3): one
    antithetic draw per (row, block). `monotonic` (D2F): per row, the first block's t_0 ~ U[clip_min, clip_max] and
    each later block adds an increment ~ U[0, (clip_max - t_0) / (n_blocks - 1)], so later blocks are never less
    noisy than earlier ones (D2F uses clip_min = 0.2, clip_max = 0.7).
    context (bd3 only): what a block is conditioned on. `clean` (BD3): the model reads [x_t ; x_0] and each block
    sees the clean earlier blocks. `noisy` (D2F): the model reads x_t alone (L slots) under the block-causal mask,
    so each block learns to denoise from earlier blocks that are themselves partly masked, as in pipelined
    decoding. Same per-token loss and normaliser; the held-out NELBO is always the clean-context, independent-time
    BD3 bound (`dlmjax.train.objective.nelbo_terms`). A D2F run:

        diffusion: {objective: bd3, block_size: 4, block_times: monotonic, context: noisy, clip_min: 0.2,
                    clip_max: 0.7}

    block_schedule (bd3 only): LLaDA2.0's block-size schedule, `[[until_step, block_size], ...]`: steps
    s < until_step of the first entry train with its block size, and so on (e.g. warm up from 1 to larger
    blocks, stay at the full row, decay back). The last until_step must cover train.steps and the last block
    size must be diffusion.block_size, which is what sampling and evaluation use. Empty: block_size throughout.
    See `dlmjax.train.adapt`.
    """

    objective: str = "llada_sft"
    schedule: str = "llada"
    eps: float = 1e-3
    antithetic: bool = True
    mask_id: int = 259
    block_size: int = 0
    clip_min: float = 1e-3
    clip_max: float = 1.0
    block_schedule: BlockSchedule = ()
    block_times: str = "independent"
    context: str = "clean"

    def __post_init__(self):
        _check_finite("diffusion", self)
        object.__setattr__(self, "block_schedule", _normalize_block_schedule(self.block_schedule))
        if self.block_schedule and self.objective != "bd3":
            raise ConfigError(f"diffusion.block_schedule applies to diffusion.objective=bd3, not "
                              f"{self.objective!r}; remove it or use objective bd3", field="diffusion.block_schedule")
        _check_choice("diffusion", "objective", self.objective, {"llada_sft", "llada", "mdlm", "bd3", "masked_ce"})
        _check_choice("diffusion", "block_times", self.block_times, {"independent", "monotonic"})
        _check_choice("diffusion", "context", self.context, {"clean", "noisy"})
        for name, default in (("block_times", "independent"), ("context", "clean")):
            if getattr(self, name) != default and self.objective != "bd3":
                raise ConfigError(f"diffusion.{name}={getattr(self, name)!r} applies to diffusion.objective=bd3, not "
                                  f"{self.objective!r}; remove it or use objective bd3", field=f"diffusion.{name}")
        _check_choice("diffusion", "schedule", self.schedule, {"linear", "loglinear", "cosine", "llada"})
        if not 0.0 <= self.eps < 0.5:
            raise ConfigError(f"diffusion.eps={self.eps} must be in [0, 0.5)")
        _check_positive("diffusion", "block_size", self.block_size, allow_zero=True)
        if not 0.0 <= self.clip_min <= self.clip_max <= 1.0:
            raise ConfigError(f"diffusion.clip_min={self.clip_min} and diffusion.clip_max={self.clip_max} must "
                              f"satisfy 0 <= clip_min <= clip_max <= 1")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the tokens come from.

    kind: `task` (a built-in generated task), `text` (local text files wrapped into rows, read from `path`), `corpus`
    (documents read per process from `path` in `format`, tokenized with `tokenizer` and packed with segment ids,
    see `dlmjax.data.sharded`), `packed` (`path` is a store of rows written by `dlmjax pack`, see
    `dlmjax.data.store`) or `sft` (`format=jsonl` records with `prompt_field` / `response_field`).
    format: text | jsonl | parquet | array_record (`record_type`: text, or int32 `tokens` for array_record).
    tokenizer: `byte`, a Hugging Face `tokenizer.json` path or a SentencePiece `.model` path.
    """

    kind: str = "task"
    task: str = "addition"
    digits: int = 3  # addition operands
    pad_answer: bool = False  # addition: zero-pad answers to digits + 1 characters
    min_digits: int = 0  # addition curriculum: train on operands of min_digits..digits digits (0: off)
    items: int = 24  # sort: digits in the prompt (the answer is the same digits in ascending order)
    path: str = ""  # kind=text|corpus|sft: a file, a folder or a glob; kind=packed: the store's folder
    format: str = "text"  # kind=corpus|sft: text | jsonl | parquet | array_record
    text_field: str = "text"  # jsonl field / parquet column holding a document
    prompt_field: str = "prompt"  # kind=sft
    response_field: str = "response"  # kind=sft
    record_type: str = "text"  # array_record records: text (UTF-8) or tokens (int32 ids)
    tokenizer: str = "byte"  # byte | path/to/tokenizer.json | path/to/spm.model
    packing: str = "wrap"  # kind=corpus: wrap (cut documents at row ends) | fit (never cut one that fits a row)
    seq_len: int = 16
    batch_size: int = 128
    eval_size: int = 500
    seed: int = 0

    def task_kwargs(self) -> dict:
        if self.task == "addition":
            return {"digits": self.digits, "pad_answer": self.pad_answer, "min_digits": self.min_digits}
        if self.task == "sort":
            return {"items": self.items}
        return {}

    def __post_init__(self):
        _check_choice("data", "kind", self.kind, {"task", "text", "corpus", "sft", "packed"})
        _check_choice("data", "task", self.task, {"addition", "sudoku", "sort"})
        _check_choice("data", "format", self.format, {"text", "jsonl", "parquet", "array_record"})
        _check_choice("data", "record_type", self.record_type, {"text", "tokens"})
        _check_choice("data", "packing", self.packing, {"wrap", "fit"})
        if self.kind != "task" and not self.path:
            what = "the folder of a store written by `dlmjax pack`" if self.kind == "packed" else \
                "a file, folder or glob"
            raise ConfigError(f"data.path is empty; data.kind={self.kind} needs {what}", field="data.path")
        if self.kind == "sft" and self.format != "jsonl":
            raise ConfigError(f"data.format={self.format!r} is not allowed with data.kind=sft; choose one of ['jsonl']")
        if self.record_type == "tokens" and self.format != "array_record":
            raise ConfigError(f"data.record_type='tokens' needs data.format=array_record, not {self.format!r}")
        if self.tokenizer != "byte" and not self.tokenizer.endswith((".json", ".model")):
            raise ConfigError(f"data.tokenizer={self.tokenizer!r} is not allowed; choose 'byte', a tokenizer.json "
                              "path or a SentencePiece .model path")
        if self.tokenizer != "byte" and self.kind not in ("corpus", "sft", "packed"):
            raise ConfigError(f"data.tokenizer={self.tokenizer!r} is not allowed with data.kind={self.kind} (task rows "
                              "are one byte per character, text rows are byte-level); use data.kind=corpus or sft")
        for name in ("text_field", "prompt_field", "response_field"):
            if not getattr(self, name):
                raise ConfigError(f"data.{name} is empty; name the field / column to read")
        for name in ("digits", "items", "seq_len", "batch_size", "eval_size"):
            _check_positive("data", name, getattr(self, name))
        if not 0 <= self.min_digits <= self.digits:
            raise ConfigError(f"data.min_digits={self.min_digits} must be in [0, data.digits={self.digits}] "
                              "(0: no curriculum)", field="data.min_digits")
        if self.kind == "text" and self.seq_len < 3:
            raise ConfigError(f"data.seq_len={self.seq_len} is too short for data.kind=text: a row needs at least 3 "
                              "tokens (BOS, one token, EOS)", field="data.seq_len")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup and a decay to `min_lr_ratio * lr`.

    decay: `cosine` or `linear` over all steps after warmup; `constant`; or `wsd` (warmup-stable-decay, as in
    LLaDA pre-training): constant, then a linear decay over the last `decay_fraction` of the steps. Keeping
    the rate up longer helps small models leave the loss plateau that algorithmic tasks start on.
    """

    lr: float = 1e-3
    warmup_steps: int = 100  # 0: no warmup
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping threshold; 0: no clipping

    def __post_init__(self):
        s = "optim"
        _check_finite(s, self)
        _check_choice(s, "decay", self.decay, {"cosine", "linear", "constant", "wsd"})
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"optim.decay_fraction={self.decay_fraction} must be in (0, 1]",
                              field="optim.decay_fraction")
        _check_positive(s, "lr", self.lr)
        _check_positive(s, "warmup_steps", self.warmup_steps, allow_zero=True)
        _check_positive(s, "grad_clip", self.grad_clip, allow_zero=True)
        _check_positive(s, "weight_decay", self.weight_decay, allow_zero=True)
        _check_positive(s, "eps", self.eps)
        _check_range(s, "b1", self.b1, 0.0, 1.0)
        _check_range(s, "b2", self.b2, 0.0, 1.0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]", field="optim.min_lr_ratio")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training loop.

    init_from: start the parameters (not the optimizer state, not the step) of a new run from a checkpoint: a
    training workdir (its newest committed step; e.g. an AR run, bd3 with block size 1) or a params-only export
    (`dlmjax convert --from-hf`, e.g. a Dream / Qwen2 release). Its model section must match this run's (see
    `dlmjax.train.adapt`). A run that already has checkpoints resumes from them and ignores init_from, so a
    resume after preemption is exact. Empty: random initialisation from `seed`.
    """

    steps: int = 1000
    seed: int = 0
    log_every: int = 50
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 4  # held-out batches for the periodic NELBO estimate
    progress: bool = True
    init_from: str = ""  # a training workdir or a params export; "" (default): random init

    def __post_init__(self):
        _check_positive("train", "steps", self.steps)
        _check_positive("train", "log_every", self.log_every)
        _check_positive("train", "eval_every", self.eval_every, allow_zero=True)
        _check_positive("train", "eval_batches", self.eval_batches)


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """When checkpoints are written and which ones are kept (see `dlmjax.checkpoint`).

    Every `every_steps` steps (and at the last step, and on SIGTERM) the run saves a checkpoint. Kept: the
    `max_to_keep` most recent committed steps, plus every step that is a multiple of `keep_every` (0: none).
    An older step is deleted only after a newer one has committed.
    """

    every_steps: int = 500
    max_to_keep: int = 3
    keep_every: int = 0  # steps that are multiples of this are never deleted; 0: off
    async_save: bool = True

    def __post_init__(self):
        _check_positive("checkpoint", "every_steps", self.every_steps)
        _check_positive("checkpoint", "max_to_keep", self.max_to_keep)
        _check_positive("checkpoint", "keep_every", self.keep_every, allow_zero=True)
        if self.keep_every and self.keep_every % self.every_steps:
            raise ConfigError(f"checkpoint.keep_every={self.keep_every!r} must be 0 (off) or a multiple of "
                              f"checkpoint.every_steps={self.every_steps!r}, otherwise no periodic checkpoint "
                              f"falls on it")


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """Defaults for `dlmjax sample` / `dlmjax eval` and the training loop's final evaluation.

    Models trained with `diffusion.objective=bd3` sample with the block sampler (`generate_blocks`, KV cache,
    blocks on the training grid, rows stop at EOS); every other objective with the masked sampler
    (`generate_masked`, LLaDA's semi-autoregressive blocks over the generated region). A length or step count
    left out (null) takes the default named beside it; 0 is not a length and is refused.
    """

    gen_length: int | None = None  # null: the rest of the row (data.seq_len - prompt)
    steps: int | None = None  # masked sampler: denoising steps over all blocks; null: one commit per step
    block_length: int | None = None  # masked sampler: null is one block (= gen_length); bd3: diffusion.block_size
    steps_per_block: int | None = None  # bd3 block sampler: null is one commit per step (= block length)
    # bd3 runs: null samples with the exact-cache block sampler; W >= 2 with D2F's pipelined sampler, W blocks in
    # flight per forward (for runs trained with diffusion.context=noisy, which see partly decoded earlier blocks).
    window_blocks: int | None = None
    remasking: str = "low_confidence"
    # Proposal defaults; null is the reference's own default for the sampler in use: LLaDA, Fast-dLLM and BD3-LM
    # decode greedily with no filter, Dream (as released, without a generation config) at temperature 1.0 with
    # top-k 50. `dlmjax convert` fills them from a release's generation_config.json when it sets them.
    temperature: float | None = None
    top_k: int | None = None  # 0 turns the filter off
    top_p: float | None = None  # 1.0 turns the filter off
    batch_size: int = 250

    def __post_init__(self):
        from dlmjax.sampling.choices import Confidence  # noqa: PLC0415 (a leaf module: enums only)

        _check_choice("sample", "remasking", self.remasking, {str(c) for c in Confidence})
        if self.window_blocks is not None and (isinstance(self.window_blocks, bool)
                                               or not isinstance(self.window_blocks, int) or self.window_blocks < 2):
            raise ConfigError(f"sample.window_blocks={self.window_blocks!r} is not allowed; use an int >= 2 (blocks "
                              "per forward of D2F's pipelined sampler), or null for the block sampler",
                              field="sample.window_blocks")
        for name in ("gen_length", "steps", "block_length", "steps_per_block"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"sample.{name}={value!r} is not allowed; use an int >= 1, or leave it out "
                                  f"(null) for the default", field=f"sample.{name}")
        if self.temperature is not None:
            _check_positive("sample", "temperature", self.temperature, allow_zero=True)
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 0):
            raise ConfigError(f"sample.top_k={self.top_k!r} is not allowed; use an int >= 0 (0 turns it off), or "
                              f"leave it out (null) for the sampler's default", field="sample.top_k")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and not isinstance(self.top_p, bool)
                                           and 0 < self.top_p <= 1):
            raise ConfigError(f"sample.top_p={self.top_p!r} is not allowed; use a number in (0, 1] (1 turns it "
                              f"off), or leave it out (null) for the sampler's default", field="sample.top_p")
        _check_positive("sample", "batch_size", self.batch_size)

    def proposal_defaults(self) -> dict:
        """The proposal fields this config sets (temperature, top_k, top_p), for the settings constructors."""
        return {k: getattr(self, k) for k in ("temperature", "top_k", "top_p") if getattr(self, k) is not None}


MESH_AXES = ("data", "fsdp", "tensor")

# A rules table: (logical axis name, mesh axis | tuple of mesh axes | None) pairs, at most one per name.
LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# The default `mesh.rules`. Batch is split over data and fsdp (FSDP shards the batch too); weights are sharded
# over fsdp along their model dimension and over tensor along heads / mlp / vocab. An array may use each mesh
# axis once: a later name that asks for an axis already taken in the same array stays unsharded (so `embed` of
# the [batch, length, embed] activations is not split, fsdp being taken by `batch`).
LOGICAL_RULES: LogicalRules = (
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
LOGICAL_AXES = tuple(name for name, _ in LOGICAL_RULES)  # every logical name the models use


def normalize_rules(raw: Any) -> LogicalRules:
    """YAML/JSON rules -> a validated LogicalRules tuple.

    Accepts a list of [name, axes] pairs (as written in YAML, or read back from config.json) or a mapping
    {name: axes}; axes is a mesh axis name, a list of them, or null (replicated). Raises a ConfigError naming
    the entry for unknown logical names, unknown mesh axes, an axis used twice in one entry, and a logical
    name listed twice (Flax would silently use the first entry and ignore the second).
    """
    if isinstance(raw, dict):
        raw = list(raw.items())
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"mesh.rules={raw!r} must be a list of [logical name, mesh axes] pairs")
    out, seen = [], {}
    for i, entry in enumerate(raw):
        where = f"mesh.rules[{i}]={_plain(entry)!r}"
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], str):
            raise ConfigError(f"{where} must be a pair [logical name, mesh axis | [mesh axes] | null]")
        name, axes = entry
        if name not in LOGICAL_AXES:
            raise ConfigError(f"{where}: unknown logical axis {name!r}; the models use {list(LOGICAL_AXES)}")
        if name in seen:
            raise ConfigError(f"{where}: logical axis {name!r} is already mapped by mesh.rules[{seen[name]}]; "
                              f"list each logical axis once")
        seen[name] = i
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            if len(axes) == 1:
                axes = axes[0]
            elif not axes:
                axes = None
        names = axes if isinstance(axes, tuple) else () if axes is None else (axes,)
        for a in names:
            if a not in MESH_AXES:
                raise ConfigError(f"{where}: unknown mesh axis {a!r}; mesh axes are {list(MESH_AXES)} "
                                  f"(or null for replicated)")
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: a mesh axis appears twice in one entry")
        out.append((name, axes))
    return tuple(out)


def _plain(x):
    """Tuples as lists, so error messages quote entries the way they are written in YAML."""
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x


def _check_block_schedule(d: DiffusionConfig, seq_len: int, steps: int) -> None:
    """`diffusion.block_schedule` against the row length, the run length and the block size sampling uses."""
    if not d.block_schedule:
        return
    where = "diffusion.block_schedule"
    for i, (until, size) in enumerate(d.block_schedule):
        if seq_len % size:
            raise ConfigError(f"{where}[{i}]=[{until}, {size}]: block size {size} must divide data.seq_len={seq_len}",
                              field=where)
    last_until, last_size = d.block_schedule[-1]
    if last_until < steps:
        raise ConfigError(f"{where}: the last entry's until_step {last_until} must cover train.steps={steps} "
                          f"(>= {steps})", field=where)
    if (d.block_size or seq_len) != last_size:
        raise ConfigError(f"{where}: the last block size {last_size} must equal diffusion.block_size={d.block_size} "
                          f"(what sampling and evaluation use; 0 means data.seq_len={seq_len})", field=where)


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh sizes along (data, fsdp, tensor); one of them may be -1 to take the remaining devices.

    rules: the logical-axis rules table (see `LOGICAL_RULES`, the default), as YAML pairs:
    `rules: [[batch, [data, fsdp]], [embed, fsdp], [vocab, null], ...]`. A given table replaces the default
    as a whole; logical names it leaves out are replicated. Parameters, optimizer state, activation constraints
    and batches are all placed by this one table.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: LogicalRules = LOGICAL_RULES

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1:
            raise ConfigError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
        for name, s in zip(("data", "fsdp", "tensor"), sizes):
            if s == 0 or s < -1:
                raise ConfigError(f"mesh.{name}={s} must be a positive size or -1")
        object.__setattr__(self, "rules", normalize_rules(self.rules))


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def __post_init__(self):
        # Cross-field rules live here, once.
        m, d = self.model, self.diffusion
        if not 0 <= d.mask_id < m.vocab_size:
            raise ConfigError(f"diffusion.mask_id={d.mask_id} must be a token id in [0, model.vocab_size={m.vocab_size})")
        if self.data.seq_len > m.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        if self.data.kind == "task":
            from dlmjax.data.tasks import get_task, min_seq_len  # light: numpy only

            task = get_task(self.data.task, **self.data.task_kwargs())
            if self.data.seq_len < min_seq_len(task):
                raise ConfigError(f"data.seq_len={self.data.seq_len} is too short for data.task={self.data.task}: "
                                  f"rows need at least {min_seq_len(task)} tokens")
        if d.objective == "llada_sft" and self.data.kind not in ("task", "sft"):
            raise ConfigError("diffusion.objective=llada_sft needs prompts: use data.kind=task or sft, or objective "
                              "llada/mdlm")
        if d.objective == "mdlm" and d.schedule == "llada":
            raise ConfigError("diffusion.objective=mdlm needs an alpha(t) schedule: linear, loglinear or cosine")
        if d.block_size and self.data.seq_len % d.block_size:
            raise ConfigError(f"diffusion.block_size={d.block_size} must divide data.seq_len={self.data.seq_len} "
                              f"(0 means one block of data.seq_len)")
        _check_block_schedule(d, self.data.seq_len, self.train.steps)
        if self.data.kind == "task":
            # The run ends by sampling the task's held-out prompts: settings that cannot sample them are refused
            # now, not after training.
            from dlmjax.inference import check_sample_config  # noqa: PLC0415 (inference imports this module)

            check_sample_config(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def _coerce(section: str, key: str, value: Any, typ: Any):
    """Return `value` as `typ`, or raise a ConfigError naming the key, the value and the expected type."""
    where = f"{section}.{key}"
    if typing.get_origin(typ) in (typing.Union, types.UnionType) and type(None) in typing.get_args(typ):
        if value is None:
            return None  # YAML `null`: the field's documented default
        (typ,) = [t for t in typing.get_args(typ) if t is not type(None)]
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{where}={value!r} is not allowed; give a finite number", field=where)
            return number
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ == LogicalRules:
        return value  # validated and normalised by MeshConfig
    elif typ == BlockSchedule:
        return value  # validated and normalised by DiffusionConfig
    else:
        raise ConfigError(f"{where}: unsupported field type {typ}")
    raise ConfigError(f"{where}={value!r} has type {type(value).__name__}; expected {typ.__name__}")


def _build_section(section: str, values: dict) -> Any:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown key {section}.{key}; allowed keys in [{section}]: {allowed}")
        kwargs[key] = _coerce(section, key, value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:  # pragma: no cover - dataclass signature mismatch
        raise ConfigError(f"[{section}]: {e}") from e


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value); the value is read as YAML (numbers, booleans, strings)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.steps=100")
    lhs, raw = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"override {text!r}: unknown section {section!r}; allowed: {sorted(SECTIONS)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(e)}); quote a string "
                          f"value, e.g. {lhs.strip()}='...'") from None
    return section, key, value


def config_from_dict(raw: dict) -> Config:
    """Build and validate a Config from nested dicts (as read from YAML or a checkpoint's config.json)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    raw = _upgrade_legacy(raw)
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}; allowed: {sorted(SECTIONS)}")
    sections = {}
    for section in SECTIONS:
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section [{section}] must be a mapping, got {values!r}")
        sections[section] = _build_section(section, values)
    return Config(**sections)


def _upgrade_legacy(raw: dict) -> dict:
    """Configs written before `data.text_path` became `data.path` (a checkpoint's config.json, an old YAML) read
    as they were meant: the old key moves to the new one."""
    data = raw.get("data")
    if not isinstance(data, dict) or "text_path" not in data:
        return raw
    data = dict(data)
    old = data.pop("text_path")
    if old and data.get("path") and data["path"] != old:
        raise ConfigError(f"data.text_path={old!r} and data.path={data['path']!r} are both set; data.text_path is "
                          "the old name of data.path: keep only data.path", field="data.path")
    if old:
        data["path"] = old
    return {**raw, "data": data}


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML file (sections model/diffusion/data/optim/train/checkpoint/sample/mesh) and apply overrides.

    A file may name another as `base: other.yaml` (relative to itself); its sections are merged key by key.
    """
    raw = _read_yaml(Path(path)) if path is not None else {}
    return config_from_dict(_merge_overrides(raw, overrides))


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """`cfg` with `section.key=value` overrides applied and everything re-validated."""
    return config_from_dict(_merge_overrides(cfg.to_dict(), overrides))


def _merge_overrides(raw: dict, overrides: typing.Sequence[str]) -> dict:
    for text in overrides:
        section, key, value = parse_override(text)
        raw[section] = {**(raw.get(section) or {}), key: value}
    return raw


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (line and column, 1-based)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{' '.join(str(problem).split())}"


def _read_yaml(path: Path, _seen: tuple = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"config file {str(path)!r} includes itself through 'base'")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    for section, values in raw.items():
        if section != "base" and values is not None and not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r}: section [{section}] must be a mapping of keys to values, "
                              f"got {values!r}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"config file {str(path)!r}: base={base!r} must be the path of another YAML file")
    merged = _read_yaml(path.parent / base, _seen + (path.resolve(),))
    for section, values in raw.items():
        merged[section] = {**(merged.get(section) or {}), **(values or {})}
    return merged


def replace(cfg: Config, **sections: dict) -> Config:
    """A copy of `cfg` with some fields of some sections changed, re-validated: replace(cfg, train={"steps": 5})."""
    raw = cfg.to_dict()
    for section, values in sections.items():
        raw[section].update(values)
    return config_from_dict(raw)

