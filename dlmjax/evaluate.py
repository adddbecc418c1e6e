"""Evaluation: held-out NELBO and exact match of a run, and the likelihood scores the field reports.

`evaluate(cfg, params, eval_data)` reads only held-out rows (`dlmjax.data.load_eval_data`, or the ones the
training loop already holds); `evaluate_checkpoint(path, overrides)` is `dlmjax eval`. Exact match samples the
task's held-out prompts through the sampler front door (`dlmjax.inference`), with the sampler the run was trained
for and the token ids of its tokenizer.

The notebook's scoring calls, each taking the model as `dlmjax.generate` does (a run `Config`, an opened `Run`, or
a `ModelConfig` / `Denoiser` with an explicit `mask_id`) and its parameters:

- `log_likelihood(model, params, prompt_ids, answer_ids, *, mc_num, batch_size, cfg_scale, rng)`: LLaDA's Monte
  Carlo estimate of log p(answer | prompt) (`dlmjax.likelihood`; `log_likelihoods` for many requests at once);
- `greedy_check(...)`: whether filling the masked answer greedily reproduces it (lm-eval's `is_greedy`);
- `rolling_log_likelihood(cfg, params, token_ids, *, rng, samples)`: a whole text's log-likelihood, minus the NELBO
  for diffusion runs and exact for AR runs (`dlmjax.rolling`).

`dlmjax.lm_eval` wraps them as an lm-evaluation-harness model; `dlmjax.genppl` scores samples with a judge.
"""
from __future__ import annotations

import functools
import math
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from dlmjax import likelihood, rolling
from dlmjax.config import Config, apply_overrides
from dlmjax.data.build import EvalData, load_eval_data, per_process
from dlmjax.data.pipeline import make_eval_batches
from dlmjax.data.tasks import heldout
from dlmjax.inference import sample, sampler_name, sampler_settings, special_tokens
from dlmjax.text import RunText


def evaluate(cfg: Config, params, eval_data: EvalData | None = None, *, eval_step=None, n_batches=None,
             exact_match: bool = True, show_examples: int = 0, log=print) -> dict:
    """Held-out NELBO per token and, for tasks, exact match of the jitted sampler on `data.eval_size` problems.

    `eval_data` defaults to `load_eval_data(cfg)` (held-out rows only). With the per-process kinds (corpus, sft,
    packed) in a multi-process job each process holds out its own rows and the NELBO is pooled over all of them
    (every process must call this). `n_batches` limits the NELBO to the first eval batches (the periodic
    estimate during training); `exact_match=False` skips sampling.
    """
    from dlmjax.train.step import as_batch, make_eval_step  # noqa: PLC0415 (train imports this module)

    records, tokenizer, task = eval_data if eval_data is not None else load_eval_data(cfg)
    eval_step = eval_step or make_eval_step(cfg.model, cfg.diffusion)
    batches = [as_batch(b) for b in make_eval_batches(records, cfg.data.batch_size)]
    if n_batches is not None:
        batches = batches[:n_batches]
    rng = jax.random.PRNGKey(cfg.train.seed + 1)
    result = heldout_nelbo(eval_step, params, batches, rng)
    if per_process(cfg) and jax.process_count() > 1:
        result = pooled_over_processes(result)  # each process held out its own rows: report all of them
    if task is not None and exact_match:
        problems = heldout(task, cfg.data.eval_size, cfg.data.seed)
        em, preds = task_exact_match(cfg, params, task, problems, tokenizer, jax.random.fold_in(rng, 7),
                                     return_predictions=True)
        result.update(em)
        for prob, pred in list(zip(problems, preds))[:show_examples]:
            mark = "ok " if task.score(pred, prob) else "BAD"
            log(f"  {mark} {prob.prompt}{pred}   (expected {prob.answer})")
    return result


def evaluate_checkpoint(path, overrides=(), *, show_examples: int = 5, log=print) -> dict:
    """`dlmjax eval`: `evaluate` the checkpoint at `path` (a workdir, its checkpoints/ folder or an export) with
    `section.key=value` overrides applied to its config; reads only the held-out rows."""
    from dlmjax.checkpoint import load  # noqa: PLC0415 (orbax only when a checkpoint is read)

    cfg, params = load(path)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return evaluate(cfg, params, load_eval_data(cfg), show_examples=show_examples, log=log)


def params_for_evaluation(params):
    """Parameters usable by this process's evaluation and sampler alone (a full host copy when they span
    several processes). Every process evaluates its held-out rows (the same for tasks and text; its own shard's
    for corpus/sft/packed, pooled by `pooled_over_processes`); only process 0 reports."""
    if jax.process_count() == 1:
        return params
    return multihost_utils.process_allgather(params, tiled=True)


def pooled_over_processes(result: dict) -> dict:
    """The held-out NELBO over every process's eval rows: a token-weighted mean of the per-process means (one
    collective; every process calls it, with eval batch counts that may differ)."""
    nelbos = np.asarray(multihost_utils.process_allgather(np.float32(result["nelbo_per_token"])), np.float64)
    counts = np.asarray(multihost_utils.process_allgather(np.int32(result["eval_tokens"])), np.int64)
    count = int(counts.sum())
    nelbo = float((nelbos * counts).sum() / max(count, 1))
    return {**result, "nelbo_per_token": nelbo, "ppl": math.exp(min(nelbo, 50.0)), "eval_tokens": count}


def heldout_nelbo(eval_step, params, batches, rng) -> dict:
    """Mean NELBO per scored token over held-out batches (float64 accumulation on the host)."""
    total, count = 0.0, 0
    pending = [eval_step(params, b, jax.random.fold_in(rng, i)) for i, b in enumerate(batches)]
    for s, n in pending:  # dispatch everything first, then read back once
        total += float(s)
        count += int(n)
    nelbo = total / max(count, 1)
    return {"nelbo_per_token": nelbo, "ppl": math.exp(min(nelbo, 50.0)), "eval_tokens": count}


def tokens_before_eos(generated: np.ndarray, eos_id: int) -> int:
    """Generated tokens before each row's first EOS, summed: the numerator of sampling throughput (tokens after
    EOS are padding, not output, so they do not count)."""
    is_eos = generated == eos_id
    first = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), generated.shape[1])
    return int(first.sum())


def task_exact_match(cfg: Config, params, task, problems, tokenizer, rng, *, return_predictions=False,
                     cached: bool = True):
    """Exact match of generated answers on `problems` (prompt -> answer), sampled in fixed-size batches.

    Every batch has the same shapes (the last one is padded with repeats), so the sampler compiles once; the
    first batch is run twice, so the reported sampling time and throughput exclude compilation. Throughput
    counts generated tokens before EOS.
    """
    prompts = np.asarray([tokenizer.encode(p.prompt, bos=True) for p in problems], np.int32)
    settings = sampler_settings(cfg, special_tokens(cfg, text=RunText(tokenizer)), prompts.shape[1])
    bs = min(cfg.sample.batch_size, len(problems))
    chunks = []
    for start in range(0, len(problems), bs):
        chunk = prompts[start:start + bs]
        pad = bs - len(chunk)
        chunks.append((start, pad, np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk))
    run = functools.partial(sample, cfg, params, settings=settings, cached=cached)
    jax.block_until_ready(run(chunks[0][2], rng))  # compile
    outputs, nfe = [], 0
    t0 = time.perf_counter()
    for start, pad, chunk in chunks:
        tokens, n = run(chunk, jax.random.fold_in(rng, start))
        outputs.append(np.asarray(tokens)[: bs - pad, prompts.shape[1]:])
        nfe += int(n)
    seconds = time.perf_counter() - t0
    generated = np.concatenate(outputs)
    predictions = [tokenizer.decode(row.tolist()) for row in generated]
    correct = [task.score(pred, prob) for pred, prob in zip(predictions, problems)]
    n_tokens = tokens_before_eos(generated, tokenizer.eos_id)
    result = {"exact_match": float(np.mean(correct)), "eval_problems": len(problems),
              "sampler": sampler_name(settings),
              "sample_nfe": nfe, "sample_seconds": round(seconds, 4), "sample_tokens": n_tokens,
              "sample_tokens_per_s": round(n_tokens / seconds, 1)}
    if return_predictions:
        return result, predictions
    return result


# ---------------------------------------------------------------------------------------------------------------
# Likelihood scores (the notebook API; `dlmjax.lm_eval` calls the batched functions directly)


def scorer(model, mask_id: int | None = None):
    """(denoiser, mask id) for the likelihood functions: from a run `Config` or `Run` (its mask id), or from a
    `ModelConfig` / `Denoiser` with `mask_id` given."""
    from dlmjax.sampling.api import as_denoiser  # noqa: PLC0415

    config = getattr(model, "config", model)  # a Run carries its Config
    if isinstance(config, Config):
        return as_denoiser(config), int(config.diffusion.mask_id if mask_id is None else mask_id)
    if mask_id is None:
        raise TypeError("give mask_id= with a ModelConfig or Denoiser (a run Config or Run carries its own)")
    return as_denoiser(model), int(mask_id)


def log_likelihood(model, params, prompt_ids, answer_ids, *, mc_num: int = 128, batch_size: int = 16,
                   cfg_scale: float = 0.0, rng: jax.Array, mask_id: int | None = None) -> float:
    """LLaDA's Monte Carlo estimate of log p(answer_ids | prompt_ids) in nats (see `dlmjax.likelihood`): the
    prompt never masked, `mc_num` rows in rounds of `batch_size` stratified over mask counts, 1/p weights, CFG as
    in `generate`. Exact for a one-token answer."""
    denoiser, mask = scorer(model, mask_id)
    return likelihood.log_likelihood(denoiser, params, prompt_ids, answer_ids, mask_id=mask, mc_num=mc_num,
                                     batch_size=batch_size, cfg_scale=cfg_scale, rng=rng)


def log_likelihoods(model, params, requests, *, mc_num: int = 128, batch_size: int = 16, cfg_scale: float = 0.0,
                    rng: jax.Array, mask_id: int | None = None) -> np.ndarray:
    """float64[R]: `log_likelihood` of many (prompt_ids, answer_ids) requests, batched in width buckets."""
    denoiser, mask = scorer(model, mask_id)
    return likelihood.log_likelihoods(denoiser, params, requests, mask_id=mask, mc_num=mc_num,
                                      batch_size=batch_size, cfg_scale=cfg_scale, rng=rng)


def greedy_check(model, params, prompt_ids, answer_ids, *, cfg_scale: float = 0.0,
                 mask_id: int | None = None) -> bool:
    """LLaDA's `suffix_greedy_prediction`: does filling the masked answer one most-confident slot per forward give
    `answer_ids`?"""
    denoiser, mask = scorer(model, mask_id)
    return likelihood.greedy_check(denoiser, params, prompt_ids, answer_ids, mask_id=mask, cfg_scale=cfg_scale)


def rolling_log_likelihood(cfg, params, token_ids, *, rng: jax.Array, samples: int = 1,
                           bos_id: int | None = None) -> float:
    """A whole text's log-likelihood in nats: minus its NELBO (a lower bound; mean of `samples` draws) for diffusion
    runs, exact for AR runs (bd3 with block size 1). `cfg` is a run `Config` or `Run`. See `dlmjax.rolling`."""
    cfg = getattr(cfg, "config", cfg)
    return float(rolling.rolling_log_likelihoods(cfg, params, [token_ids], rng=rng, samples=samples,
                                                 bos_id=bos_id)[0])
