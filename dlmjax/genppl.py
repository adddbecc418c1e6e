"""Generative perplexity: how likely a judge language model finds a checkpoint's unconditional samples.

The protocol is MDLM's (`compute_generative_perplexity`), in dlmjax's words:

1. Sample. N unconditional samples from the checkpoint through the sampler front door (`dlmjax.inference`):
   every row's prompt is what the run's rows start with (its BOS), `batch_size` rows per call, so every call has
   one shape and the sampler compiles once. A sample is its generated ids cut before the first stop token (EOS,
   or a chat template's end of turn): what follows is the sampler's fill, padding.
2. Decode and re-tokenise. Each sample is decoded with the checkpoint's own tokenizer (`Run.decode`, special
   tokens left out) and encoded again with the judge's (`Judge.encode`: a dlmjax run frames the text as its
   training rows, BOS first; a Hugging Face tokenizer adds what its post-processor adds, nothing for GPT-2).
3. Truncate and pad. The judge's ids are cut to L, the length of a sample row in the sampler's tokens (prompt +
   generated slots), and a shorter one is padded with the judge's EOS up to L (MDLM pads with EOS too).
4. Chunk. Positions 0..L-1 are split at multiples of the judge's context C; each chunk is scored on its own,
   with no context carried over from the chunk before. The first token of a chunk is context only.
5. Count. Position j of a chunk (j >= 1) scores `log p(x_j | x_<j within the chunk)` and counts if its token is
   not EOS, or if it is the sample's first EOS: a sample that ends before L is scored on ending there, the EOS
   padding after it is not scored at all.

gen-PPL = exp(total NLL / counted tokens), pooled over all samples' tokens (as MDLM's running mean does), not a
mean of per-sample perplexities. Beside it: the mean unigram entropy of the samples (in nats, of each sample's
histogram of the sampler's token ids; a collapsed sampler that repeats a few tokens scores low gen-PPL and low
entropy), the sample count, the sampler's NFE, and the judge's name and context: gen-PPL compares only at equal
judge, sample count, sampling precision and NFE.

Judges implement one small protocol (`Judge`): `name`, `context`, `eos_id`, `encode(text)` and
`token_log_probs(tokens, valid)`. `DlmjaxJudge` is any dlmjax AR run (diffusion.objective=bd3,
diffusion.block_size=1: exact next-token probabilities); `HuggingFaceJudge` a Hugging Face causal LM (`--judge
hf:gpt2-large`), which needs `torch` and `transformers` (imported only when such a judge is asked for).
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from dlmjax.errors import CheckpointError, InputError, SettingsError
from dlmjax.inference import SampleRequest, open_run, sample_generation

HF_PREFIX = "hf:"  # `--judge hf:NAME_OR_FOLDER` selects a Hugging Face causal LM; a plain path a dlmjax run


class Judge(Protocol):
    """A causal language model that scores text.

    Attributes:
      name: what the report calls it (the `--judge` value).
      context: the longest row it scores at once, in its tokens (chunks are at most this long).
      eos_id: its end-of-text id (pads short samples; None: no padding, the end of a sample is not scored).
    """

    name: str
    context: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        """The judge's ids of a text (with whatever its tokenizer puts first, e.g. a BOS)."""

    def token_log_probs(self, tokens: np.ndarray, valid: np.ndarray) -> Any:
        """float32[B, W]: log p(tokens[b, j] | tokens[b, :j]) in nats at valid slots j >= 1.

        tokens: int32[B, W]; valid: bool[B, W], a prefix of each row (right padding). Slot 0 and invalid slots
        may hold anything: they are never counted. May return a device array (read after every batch is
        dispatched).
        """


# -- the counting rule ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JudgeRows:
    """Samples in the judge's tokens, truncated and padded to one length L (steps 3 and 5 of the protocol).

    Attributes:
      tokens: int32[N, L], each sample's judge ids, then EOS padding.
      valid: bool[N, L], the slots a forward pass reads: the sample's ids and its first padding EOS.
      counted: bool[N, L], the slots whose log-probability enters the gen-PPL: not a chunk's first slot, and
        a non-EOS token or the sample's first EOS.
      context: C, the chunk length.
    """

    tokens: np.ndarray
    valid: np.ndarray
    counted: np.ndarray
    context: int


def judge_rows(samples: Sequence[Sequence[int]], *, length: int, context: int, eos_id: int | None) -> JudgeRows:
    """Judge ids of each sample (any lengths), cut to `length`, padded with `eos_id`, with the counting mask."""
    n = len(samples)
    tokens = np.full((n, length), 0 if eos_id is None else eos_id, np.int32)
    valid = np.zeros((n, length), bool)
    for i, ids in enumerate(samples):
        ids = list(ids)[:length]
        tokens[i, :len(ids)] = ids
        # The first padding EOS is read too: it is the token that says where the sample ended.
        valid[i, :min(len(ids) + (eos_id is not None), length)] = True
    if eos_id is None:
        counted = valid.copy()
    else:
        is_eos = tokens == eos_id
        first_eos = is_eos & (np.cumsum(is_eos, axis=1) == 1)
        counted = valid & (~is_eos | first_eos)
    counted[:, ::context] = False  # a chunk's first token is context only
    return JudgeRows(tokens=tokens, valid=valid, counted=counted, context=context)


def score_rows(judge: Judge, rows: JudgeRows, *, batch_size: int, progress: bool = False):
    """(nll float64[N], counted int64[N]): each sample's summed NLL (nats) over its counted tokens, and their count.

    Every chunk of C slots (the last one of a row may be shorter: rows are split at multiples of C) with something
    to count is one row of width min(C, L); they go `batch_size` at a time to `judge.token_log_probs`, the last
    batch filled with copies, so the judge sees one shape.
    """
    n, length = rows.tokens.shape
    width = min(rows.context, length)
    chunk_tokens, chunk_valid, chunk_counted, owner = [], [], [], []
    for start in range(0, length, rows.context):
        stop = min(start + rows.context, length)
        for i in np.flatnonzero(rows.counted[:, start:stop].any(axis=1)):
            pad = width - (stop - start)
            chunk_tokens.append(np.pad(rows.tokens[i, start:stop], (0, pad)))
            chunk_valid.append(np.pad(rows.valid[i, start:stop], (0, pad)))
            chunk_counted.append(np.pad(rows.counted[i, start:stop], (0, pad)))
            owner.append(i)
    nll, counted = np.zeros(n, np.float64), np.zeros(n, np.int64)
    if not owner:
        return nll, counted
    total = -(-len(owner) // batch_size) * batch_size
    fill = total - len(owner)
    tokens = np.stack(chunk_tokens + [chunk_tokens[-1]] * fill).astype(np.int32)
    valid = np.stack(chunk_valid + [chunk_valid[-1]] * fill)
    starts = range(0, total, batch_size)
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        starts = tqdm(starts, desc=f"judge {judge.name}", unit="batch")
    pending = [judge.token_log_probs(tokens[s:s + batch_size], valid[s:s + batch_size]) for s in starts]
    log_probs = np.concatenate([np.asarray(p, np.float64) for p in pending])[:len(owner)]  # one read, at the end
    mask = np.stack(chunk_counted)
    np.add.at(nll, owner, -np.where(mask, log_probs, 0.0).sum(axis=1))
    np.add.at(counted, owner, mask.sum(axis=1))
    return nll, counted


@dataclasses.dataclass(frozen=True)
class JudgeScore:
    """A judge's verdict on a set of texts (pooled over all their counted tokens)."""

    gen_ppl: float  # exp(nll / tokens); nan if nothing was counted
    nll: float  # summed over every counted token, nats
    tokens: int  # counted tokens
    sample_nll: np.ndarray  # float64[N], per text
    sample_tokens: np.ndarray  # int64[N]


def judge_texts(texts: Sequence[str], judge: Judge, *, length: int, batch_size: int,
                progress: bool = False) -> JudgeScore:
    """Steps 2-5 of the protocol on decoded texts: re-tokenise with the judge, cut to `length` judge tokens, pad
    with its EOS, chunk at its context, and pool the NLL of the counted tokens."""
    if length < 1:
        raise SettingsError(f"length={length}: samples are cut to this many judge tokens; use an int >= 1",
                            field="length")
    _check_batch_size(batch_size)
    rows = judge_rows([judge.encode(t) for t in texts], length=length, context=judge.context, eos_id=judge.eos_id)
    nll, counted = score_rows(judge, rows, batch_size=batch_size, progress=progress)
    total, tokens = float(nll.sum()), int(counted.sum())
    return JudgeScore(gen_ppl=math.exp(total / tokens) if tokens else math.nan, nll=total, tokens=tokens,
                      sample_nll=nll, sample_tokens=counted)


# -- unigram entropy --------------------------------------------------------------------------------------------


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy in nats of the histogram of `ids` (0 for an empty or constant sample; log k for k distinct ids
    once each)."""
    counts = np.array(list(Counter(int(i) for i in ids).values()), np.float64)
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def mean_unigram_entropy(samples: Sequence[Sequence[int]]) -> float:
    """The mean over samples of `unigram_entropy` (nan without samples)."""
    return float(np.mean([unigram_entropy(s) for s in samples])) if len(samples) else math.nan


# -- judges -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class DlmjaxJudge:
    """A dlmjax AR run (bd3, block size 1) as a judge: exact next-token log-probabilities
    (`dlmjax.rolling.ar_token_log_probs`), text through the run's own tokenizer (`Run.encode`: BOS first, as its
    training rows), context = its training row length `data.seq_len`."""

    name: str
    context: int
    eos_id: int | None
    run: Any  # dlmjax.inference.Run

    @classmethod
    def load(cls, path: str | Path, *, name: str | None = None) -> "DlmjaxJudge":
        """Opens the run at `path`, refusing (one line naming --judge) a missing path or a run that is not AR."""
        from dlmjax.checkpoint import read_config  # noqa: PLC0415 (orbax only when a judge is read)
        from dlmjax.rolling import is_autoregressive  # noqa: PLC0415

        name = str(path) if name is None else name
        where = Path(path).expanduser()
        if not where.exists():
            raise InputError(f"--judge {name}: no such file or directory; give a dlmjax AR run (a workdir or params "
                             f"export trained with diffusion.objective=bd3 diffusion.block_size=1) or "
                             f"{HF_PREFIX}NAME for a Hugging Face causal LM", field="judge")
        try:
            cfg = read_config(where)
        except (FileNotFoundError, CheckpointError) as e:
            raise InputError(f"--judge {name}: not a readable dlmjax checkpoint ({_one_line(e)})",
                             field="judge") from None
        if not is_autoregressive(cfg):
            d = cfg.diffusion
            raise SettingsError(
                f"--judge {name}: the run has diffusion.objective={d.objective} diffusion.block_size={d.block_size}; "
                "a judge must give exact next-token probabilities, so it must be an AR run (diffusion.objective=bd3 "
                "with diffusion.block_size=1, e.g. configs/text_ar.yaml)", field="judge")
        run = open_run(where)
        if run.text is None:
            raise SettingsError(f"--judge {name}: the run carries no tokenizer (data.tokenizer="
                                f"{cfg.data.tokenizer!r}), so it cannot read text", field="judge")
        return cls(name=name, context=min(cfg.data.seq_len, cfg.model.max_seq_len), eos_id=run.tokens.eos_id, run=run)

    def encode(self, text: str) -> list[int]:
        return self.run.encode(text)

    def token_log_probs(self, tokens: np.ndarray, valid: np.ndarray):
        from dlmjax.rolling import ar_token_log_probs  # noqa: PLC0415

        return ar_token_log_probs(self.run.config, self.run.params, tokens, valid)


@dataclasses.dataclass(frozen=True, eq=False)
class HuggingFaceJudge:
    """A Hugging Face causal LM (`AutoModelForCausalLM` + `AutoTokenizer`, float32 on the CPU) as a judge."""

    name: str
    context: int
    eos_id: int | None
    tokenizer: Any
    model: Any

    @classmethod
    def load(cls, name_or_path: str, *, name: str | None = None) -> "HuggingFaceJudge":
        name = HF_PREFIX + name_or_path if name is None else name
        try:
            import torch  # noqa: PLC0415 (only a Hugging Face judge needs torch)
            import transformers  # noqa: PLC0415
        except ImportError as e:
            raise SettingsError(f"--judge {name} needs torch and transformers ({_one_line(e)}): pip install torch "
                                "transformers", field="judge") from None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
            model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path).to(torch.float32).eval()
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"--judge {name}: cannot load a Hugging Face causal LM from {name_or_path!r} "
                             f"({_one_line(e)})", field="judge") from None
        config = model.config
        context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if not context:
            raise InputError(f"--judge {name}: its config.json gives no context length (n_positions or "
                             "max_position_embeddings)", field="judge")
        return cls(name=name, context=int(context), eos_id=tokenizer.eos_token_id, tokenizer=tokenizer, model=model)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])  # as MDLM calls it: the post-processor's specials included

    def token_log_probs(self, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
        import torch  # noqa: PLC0415

        ids = torch.as_tensor(np.asarray(tokens, np.int64))
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=torch.as_tensor(np.asarray(valid, np.int64))).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            picked = torch.gather(logp[:, :-1], -1, ids[:, 1:, None])[..., 0]  # slot j given slots < j
        out = np.zeros(tokens.shape, np.float32)
        out[:, 1:] = picked.numpy()
        return np.where(valid, out, 0.0)


def load_judge(spec: str) -> Judge:
    """The judge `--judge` names: `hf:NAME_OR_FOLDER` a Hugging Face causal LM, anything else a dlmjax AR run."""
    if not isinstance(spec, str) or not spec.strip():
        raise SettingsError(f"--judge {spec!r}: give a dlmjax AR run's path or {HF_PREFIX}NAME", field="judge")
    if spec.startswith(HF_PREFIX):
        if not spec[len(HF_PREFIX):]:
            raise SettingsError(f"--judge {spec} names no model; give {HF_PREFIX}NAME_OR_FOLDER (e.g. "
                                f"{HF_PREFIX}gpt2-large, or a local folder)", field="judge")
        return HuggingFaceJudge.load(spec[len(HF_PREFIX):], name=spec)
    return DlmjaxJudge.load(spec, name=spec)


# -- sampling ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Samples:
    """Unconditional samples of a checkpoint.

    Attributes:
      ids: per sample, its generated sampler ids before the first stop token.
      texts: per sample, those ids decoded by the checkpoint's tokenizer.
      length: L, the slots of a sample row (prompt + generated), in the sampler's tokens.
      nfe: per sampler call, its forward passes.
    """

    ids: tuple[tuple[int, ...], ...]
    texts: tuple[str, ...]
    length: int
    nfe: tuple[int, ...]


def batch_seed(seed: int, index: int) -> int:
    """The sampler seed of batch `index` of a run seeded `seed`: distinct over (seed, index) pairs, unlike seed +
    index (seed 0's second batch would be seed 1's first)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SettingsError(f"--seed={seed!r} is not allowed; use an int >= 0", field="seed")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0] >> 1)


def sample_texts(run, samples: int, *, seed: int = 0, batch_size: int, request: SampleRequest = SampleRequest(),
                 progress: bool = False) -> Samples:
    """`samples` unconditional samples of an open run (`dlmjax.open_run`), `batch_size` rows per sampler call.

    Each row's prompt is the run's BOS. The last call is filled to `batch_size` rows and its extra rows dropped.
    Raises `SettingsError` before sampling if the run has no BOS or no tokenizer, or the request does not fit it.
    """
    _check_count("samples", samples)
    _check_batch_size(batch_size)
    bos = run.tokens.bos_id
    if bos is None:
        raise SettingsError(f"{run.path} has no BOS token to start unconditional samples with", field="checkpoint")
    if run.text is None:
        raise SettingsError(f"{run.path} carries no tokenizer (data.tokenizer={run.config.data.tokenizer!r}): its "
                            "samples cannot be decoded to text for the judge", field="checkpoint")
    run.settings(1, request)  # refuses a bad request before the first call
    stops = run.text.stop_ids() | {i for i in (run.tokens.eos_id, run.tokens.eot_id) if i is not None}
    calls = range(-(-samples // batch_size))
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        calls = tqdm(calls, desc="sample", unit="batch")
    ids, nfe, length = [], [], None
    for b in calls:
        generation = sample_generation(run, [[bos]] * batch_size, request, seed=batch_seed(seed, b))
        for row in generation.generated():
            cut = next((j for j, t in enumerate(row) if t in stops), len(row))
            ids.append(tuple(row[:cut]))
        length = len(generation.rows()[0])
        nfe.append(int(generation.nfe))
    ids = ids[:samples]
    return Samples(ids=tuple(ids), texts=tuple(run.decode(s) for s in ids), length=length, nfe=tuple(nfe))


def generative_perplexity_of_checkpoint(checkpoint: str | Path, judge: str | Judge, *, samples: int, seed: int = 0,
                                        batch_size: int | None = None, request: SampleRequest | None = None,
                                        log: Callable[[str], None] = print, progress: bool = True,
                                        examples: int = 3) -> dict:
    """The `dlmjax eval --gen-ppl --judge J --samples N` library call: samples, judges and reports.

    Args:
      checkpoint: the run to sample (any path `dlmjax.open_run` takes).
      judge: a `--judge` value (`load_judge`: a dlmjax AR run's path, or `hf:NAME_OR_FOLDER`), or a `Judge`.
      samples: N, the number of unconditional samples.
      seed: sampler seed; batch b samples with `batch_seed(seed, b)`.
      batch_size: rows per sampler call and per judge call (default: the run's `sample.batch_size`, at most N).
      request: the sampler settings asked for (`--temperature`, `--top-p`, `--steps`, ...); None: the run's own.
      log: receives one line per stage.
      progress: tqdm bars over the sampler and judge calls.
      examples: how many sample texts to return under "examples".

    Returns:
      {"gen_ppl": pooled exp(NLL / counted judge tokens), "nll_per_token", "judge_tokens" (counted),
       "unigram_entropy" (mean over samples, nats, of the sampler's ids), "samples", "sample_length" (L, sampler
       tokens), "nfe" (forward passes per sampler call, mean over calls), "batch_size", "seed", "judge",
       "judge_context", "examples"}.

    The judge is checked and loaded before anything is sampled: a bad `--judge` costs no sampling.
    """
    _check_count("samples", samples)
    if batch_size is not None:
        _check_batch_size(batch_size)
    batch_seed(seed, 0)  # refuses a bad seed before anything is loaded
    request = SampleRequest() if request is None else request
    if isinstance(judge, str):
        judge = load_judge(judge)
    log(f"judge: {judge.name} (context {judge.context} tokens)")
    run = open_run(checkpoint)
    batch_size = min(batch_size or run.config.sample.batch_size, samples)
    log(f"sampling {samples} unconditional samples from {checkpoint} ({batch_size} per call)")
    drawn = sample_texts(run, samples, seed=seed, batch_size=batch_size, request=request, progress=progress)
    score = judge_texts(drawn.texts, judge, length=drawn.length, batch_size=batch_size, progress=progress)
    return {
        "gen_ppl": score.gen_ppl,
        "nll_per_token": score.nll / score.tokens if score.tokens else math.nan,
        "judge_tokens": score.tokens,
        "unigram_entropy": mean_unigram_entropy(drawn.ids),
        "samples": samples,
        "sample_length": drawn.length,
        "nfe": float(np.mean(drawn.nfe)),
        "batch_size": batch_size,
        "seed": seed,
        "judge": judge.name,
        "judge_context": judge.context,
        "examples": list(drawn.texts[:examples]),
    }


# -- checks -----------------------------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _check_count(flag: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SettingsError(f"--{flag.replace('_', '-')}={value!r} is not allowed; use an int >= 1", field=flag)


def _check_batch_size(value) -> None:
    _check_count("batch_size", value)


__all__ = ["DlmjaxJudge", "HF_PREFIX", "HuggingFaceJudge", "Judge", "JudgeRows", "JudgeScore", "Samples",
           "batch_seed", "generative_perplexity_of_checkpoint", "judge_rows", "judge_texts", "load_judge",
           "mean_unigram_entropy", "sample_texts", "score_rows", "unigram_entropy"]
