"""Held-out evaluation: NELBO per token (and its perplexity) and task exact match with the jitted samplers.

`sample(cfg, params, prompt, rng)` is the one place that picks the sampler a run was trained for: the block
sampler (`generate_blocks`, exact KV cache) for `diffusion.objective=bd3`, the masked sampler (`generate`)
otherwise. `dlmjax eval`, `dlmjax sample` and the training loop's final evaluation all go through it.
"""
from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from dlmjax.config import Config
from dlmjax.data.tokenizer import ByteTokenizer
from dlmjax.models.transformer import Denoiser
from dlmjax.sampling import BlockSamplerSettings, SamplerSettings, generate, generate_blocks, generate_blocks_uncached


def uses_block_sampler(cfg: Config) -> bool:
    return cfg.diffusion.objective == "bd3"


def sampler_settings(cfg: Config, prompt_len: int) -> SamplerSettings | BlockSamplerSettings:
    """The run's sampler settings for prompts of `prompt_len` slots (padding included).

    Defaults fill the rest of a training row (`data.seq_len - prompt_len` slots) one token per step.
    """
    gen = cfg.sample.gen_length or (cfg.data.seq_len - prompt_len)
    if gen <= 0:
        raise ValueError(f"sample.gen_length resolves to {gen}: the prompt ({prompt_len} tokens) fills "
                         f"data.seq_len={cfg.data.seq_len}; set sample.gen_length")
    if uses_block_sampler(cfg):
        block = cfg.sample.block_length or cfg.diffusion.block_size or cfg.data.seq_len
        max_length = prompt_len + gen
        if max_length % block:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + sample.gen_length ({gen}) = {max_length} is not a multiple of the "
                f"block length {block} (sample.block_length, else diffusion.block_size); choose gen_length so that "
                f"the row ends on a block boundary, e.g. {gen + (-max_length % block)}")
        return BlockSamplerSettings(max_length=max_length, block_length=block,
                                    steps_per_block=cfg.sample.steps_per_block or None,
                                    remasking=cfg.sample.remasking, temperature=cfg.sample.temperature,
                                    mask_id=cfg.diffusion.mask_id, eos_id=ByteTokenizer.eos_id)
    return SamplerSettings(gen_length=gen, steps=cfg.sample.steps or gen,
                           block_length=cfg.sample.block_length or gen, remasking=cfg.sample.remasking,
                           temperature=cfg.sample.temperature, mask_id=cfg.diffusion.mask_id)


def sample(cfg: Config, params, prompt, rng, *, settings=None, prompt_mask=None, cached: bool = True):
    """Samples continuations of equal-width `prompt` int[B, W] with the run's sampler.

    Returns (tokens int32[B, W + G]: prompt then generated slots, nfe int32). With `prompt_mask` (left padding)
    the block sampler returns each row's prompt without padding followed by its generation (see
    `generate_blocks`); the masked sampler keeps the padding in place. `cached=False` runs the block sampler's
    uncached twin (same tokens, for checking and benchmarks).
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    settings = settings or sampler_settings(cfg, prompt.shape[1])
    if isinstance(settings, SamplerSettings) and prompt.shape[1] + settings.gen_length > cfg.model.max_seq_len:
        raise ValueError(f"prompt ({prompt.shape[1]} tokens) + gen_length ({settings.gen_length}) = "
                         f"{prompt.shape[1] + settings.gen_length} exceeds the model's context "
                         f"model.max_seq_len={cfg.model.max_seq_len}")
    if isinstance(settings, BlockSamplerSettings):
        fn = generate_blocks if cached else generate_blocks_uncached
        return fn(cfg.model, params, prompt, settings, rng, prompt_mask=prompt_mask)
    return generate(Denoiser(cfg.model), params, prompt, settings, rng, prompt_mask=prompt_mask)


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
    """Generated tokens before each row's first EOS, summed (the throughput numerator, ALGORITHMS.md §6.4)."""
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
    settings = sampler_settings(cfg, prompts.shape[1])
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
              "sampler": "block" if isinstance(settings, BlockSamplerSettings) else "masked",
              "sample_nfe": nfe, "sample_seconds": round(seconds, 4), "sample_tokens": n_tokens,
              "sample_tokens_per_s": round(n_tokens / seconds, 1)}
    if return_predictions:
        return result, predictions
    return result
