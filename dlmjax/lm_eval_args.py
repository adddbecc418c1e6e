"""The arguments of the `dlmjax` lm-eval model, checked, and the generation plan of a batch of requests.

`ModelArgs` is `--model_args` (each field with its own parser, so an error names the arg or the CLI flag that
carried it); `encode_pair` is LLaDA's tokenization of a (context, continuation) request; `plan_generation` turns a
request's `max_gen_toks` into sampler settings; `GenerationTotals` counts what `generate_until` did. Pure Python:
importing this module does not import lm-eval.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

from dlmjax.errors import SettingsError
from dlmjax.sampling.choices import CacheKind, Confidence

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for a request without max_gen_toks
eval_logger = logging.getLogger("lm_eval.models.dlmjax")  # lm-eval's own models log under lm_eval.models


# ---------------------------------------------------------------------------------------------------------------
# Model args


def _model_arg(name: str) -> str:
    return f"model arg {name}"


def _fail(spell, name, value, allowed) -> SettingsError:
    return SettingsError(f"{spell(name)}={value!r} is not allowed; {allowed}", field=name)


# Each parser takes (spell, name, value): lm-eval hands values over as strings, numbers or booleans.
def _integer(low: int):
    def parse(spell, name, value):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _fail(spell, name, value, f"use an integer >= {low}")
        return value
    return parse


def _real(low: float, high: float | None = None, *, low_open: bool = False, what: str):
    def parse(spell, name, value):
        try:
            number = math.nan if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = math.nan
        if (not math.isfinite(number) or number < low or (low_open and number == low)
                or (high is not None and number > high)):
            raise _fail(spell, name, value, f"use {what}")
        return number
    return parse


def _choice(*choices: str):
    def parse(spell, name, value):
        if str(value) not in choices:
            raise _fail(spell, name, value, f"choose one of {list(choices)}")
        return str(value)
    return parse


def _boolean(spell, name, value):
    text = str(value).strip().lower()
    if text not in ("true", "1", "yes", "false", "0", "no"):
        raise _fail(spell, name, value, "use true or false")
    return text in ("true", "1", "yes")


def _batch_size(spell, name, value) -> int:
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        raise SettingsError(f"{spell(name)}={value!r} is not allowed: dlmjax has no memory probe; give a number "
                            "(rows per Monte Carlo round, prompts per generation batch) that divides mc_num",
                            field=name)
    return _integer(1)(spell, name, value)


def _arg(default, parse):
    return dataclasses.field(default=default, metadata={"parse": parse})


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """The `--model_args` of the `dlmjax` model, checked (see the module docstring); None keeps the run's default."""

    checkpoint: str = _arg(None, lambda spell, name, value: str(value))
    batch_size: int = _arg(1, _batch_size)
    mc_num: int = _arg(128, _integer(1))
    cfg_scale: float = _arg(0.0, _real(0.0, what="a number >= 0 (0 is off)"))
    is_check_greedy: bool = _arg(True, _boolean)
    dtype: str | None = _arg(None, _choice("bfloat16", "float32"))
    attention: str | None = _arg(None, _choice("xla", "pallas", "pallas_interpret"))
    seed: int = _arg(0, _integer(0))
    group: int = _arg(4, _integer(1))
    rolling_samples: int = _arg(1, _integer(1))
    gen_length: int | None = _arg(None, _integer(1))
    steps: int | None = _arg(None, _integer(1))
    steps_per_block: int | None = _arg(None, _integer(1))
    block_length: int | None = _arg(None, _integer(1))
    cache: str | None = _arg(None, _choice(*map(str, CacheKind)))
    threshold: float | None = _arg(None, _real(0.0, 1.0, low_open=True, what="a number in (0, 1]"))
    factor: float | None = _arg(None, _real(0.0, low_open=True, what="a number > 0"))
    temperature: float | None = _arg(None, _real(0.0, what="a number >= 0 (0 is greedy)"))
    remasking: str | None = _arg(None, _choice(*map(str, Confidence)))
    sub_block_length: int | None = _arg(None, _integer(1))
    window_blocks: int | None = _arg(None, _integer(2))

    @classmethod
    def parse(cls, raw: dict[str, Any], spell: Callable[[str], str] = _model_arg) -> "ModelArgs":
        """Checks every value of `raw` (None keeps the default); `spell(field)` names a field in errors (`model arg
        mc_num`, or a command-line flag). Raises SettingsError (one line) on the first bad one."""
        parsers = {f.name: f.metadata["parse"] for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if k not in parsers)
        if unknown:
            raise SettingsError(f"{spell(unknown[0])} is unknown; the dlmjax model takes {sorted(parsers)}",
                                field=unknown[0])
        if raw.get("checkpoint") in (None, ""):
            raise SettingsError(f"{spell('checkpoint')} is required: a dlmjax workdir, checkpoint or converted "
                                "release (checkpoint=PATH)", field="checkpoint")
        args = cls(**{k: parsers[k](spell, k, v) for k, v in raw.items() if v is not None})
        if args.mc_num % args.batch_size:
            raise SettingsError(f"{spell('mc_num')}={args.mc_num} is not a multiple of {spell('batch_size')}="
                                f"{args.batch_size} (each Monte Carlo round scores batch_size rows); use a "
                                "batch_size that divides mc_num", field="mc_num")
        return args


# ---------------------------------------------------------------------------------------------------------------
# Tokenization and generation plans (pure functions)


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as LLaDA's harness tokenizes a request: trailing spaces of the context move
    to the continuation; the context and context + continuation are tokenized separately, and the continuation is
    the tail of the second after the first's length (so a token straddling the boundary belongs to it)."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = list(encode(stripped))
    whole = list(encode(stripped + continuation))
    return context_ids, whole[len(context_ids):]


@dataclasses.dataclass(frozen=True)
class GenerationPlan:
    """One batch's sampler request and how many generated tokens each row keeps (`max_gen_toks`)."""

    request: Any  # dlmjax.inference.SampleRequest
    keep: int


def plan_generation(cfg, args: ModelArgs, longest: int, cap: int, overrides: dict | None = None) -> GenerationPlan:
    """The `SampleRequest` of a batch whose longest prompt has `longest` tokens, its rows keeping `cap` tokens.

    Lengths come from the model args, else the run's `sample.*` (an unset gen_length fills the rest of a training
    row, `data.seq_len - longest`, as `dlmjax sample` does). When `cap` (the request's max_gen_toks) is shorter,
    the masked sampler generates fewer slots: whole blocks of the set block length (rounded up) with the same
    steps per block, or one block of `cap` slots with the same steps per slot when no block length is set. The
    block sampler generates up to the first block boundary past `longest + cap` slots.
    """
    from dlmjax.inference import SampleRequest, uses_block_sampler  # noqa: PLC0415

    s = cfg.sample
    gen = args.gen_length or s.gen_length or max(cfg.data.seq_len - longest, 1)
    keep = min(gen, cap)
    fields = dict(steps=args.steps, steps_per_block=args.steps_per_block, block_length=args.block_length,
                  remasking=args.remasking, temperature=args.temperature, cache=args.cache,
                  threshold=args.threshold, factor=args.factor, sub_block_length=args.sub_block_length,
                  window_blocks=args.window_blocks,
                  cfg_scale=args.cfg_scale if args.cfg_scale > 0 else None)
    fields.update(overrides or {})
    if uses_block_sampler(cfg):
        if args.steps is not None:
            raise SettingsError(f"{_model_arg('steps')}={args.steps}: this checkpoint (diffusion.objective=bd3) "
                                "samples with the block sampler; give steps_per_block", field="steps")
        block = args.block_length or s.block_length or cfg.diffusion.block_size or cfg.data.seq_len
        total = -(-(longest + keep) // block) * block
        return GenerationPlan(SampleRequest(**{**fields, "gen_length": total - longest}), keep)
    if keep < gen:
        block = args.block_length or s.block_length
        steps = args.steps or s.steps
        if block is None:  # one block of `keep` slots, the same steps per slot
            fields["steps"] = None if steps is None else max(1, -(-steps * keep // gen))
            gen = keep
        elif gen % block == 0:  # whole blocks, the same steps per block
            blocks = -(-keep // block)
            fields["steps"] = None if steps is None else max(1, steps // (gen // block)) * blocks
            gen = blocks * block
    return GenerationPlan(SampleRequest(**{**fields, "gen_length": gen}), keep)


def _generation_kwargs(gen_kwargs: dict, warned: set) -> tuple[int, tuple[str, ...], dict]:
    """(max_gen_toks, until strings, sampler overrides) of one generate_until request's gen_kwargs."""
    gen_kwargs = dict(gen_kwargs or {})
    until = gen_kwargs.pop("until", None) or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    cap = gen_kwargs.pop("max_gen_toks", None)
    cap = DEFAULT_MAX_GEN_TOKS if cap is None else int(cap)
    overrides = {}
    if gen_kwargs.pop("do_sample", None) is False:
        gen_kwargs.pop("temperature", None)
        overrides["temperature"] = 0.0
    for key, kind in (("temperature", float), ("top_p", float), ("top_k", int)):
        if gen_kwargs.get(key) is not None:
            overrides[key] = kind(gen_kwargs.pop(key))
    ignored = sorted(set(gen_kwargs) - warned)
    if ignored:
        warned.update(ignored)
        eval_logger.warning("dlmjax ignores these generation kwargs: %s", ignored)
    if cap < 1:
        raise SettingsError(f"max_gen_toks={cap} is not allowed; use an integer >= 1", field="max_gen_toks")
    return cap, until, overrides


@dataclasses.dataclass(frozen=True)
class GenerationTotals:
    """What `generate_until` did so far: calls, requests, generated tokens (before EOS), seconds, forward passes."""

    calls: int = 0
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0
    nfe: int = 0

    def add(self, **counts) -> "GenerationTotals":
        return dataclasses.replace(self, **{k: getattr(self, k) + v for k, v in counts.items()})

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0
