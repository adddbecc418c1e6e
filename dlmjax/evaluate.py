"""Held-out evaluation: NELBO per token (and its perplexity) and task exact match with the jitted sampler."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dlmjax.config import Config
from dlmjax.models.transformer import Denoiser
from dlmjax.sampling import SamplerSettings, generate


def sampler_settings(cfg: Config, prompt_len: int) -> SamplerSettings:
    """The run's sampler: defaults fill the answer region of a task (seq_len - prompt) one token per step."""
    gen = cfg.sample.gen_length or (cfg.data.seq_len - prompt_len)
    if gen <= 0:
        raise ValueError(f"sample.gen_length resolves to {gen}: the prompt ({prompt_len} tokens) fills "
                         f"data.seq_len={cfg.data.seq_len}; set sample.gen_length")
    return SamplerSettings(gen_length=gen, steps=cfg.sample.steps or gen,
                           block_length=cfg.sample.block_length or gen, remasking=cfg.sample.remasking,
                           temperature=cfg.sample.temperature, mask_id=cfg.diffusion.mask_id)


def heldout_nelbo(eval_step, params, batches, rng) -> dict:
    """Mean NELBO per scored token over held-out batches (float64 accumulation on the host)."""
    total, count = 0.0, 0
    pending = [eval_step(params, b, jax.random.fold_in(rng, i)) for i, b in enumerate(batches)]
    for s, n in pending:  # dispatch everything first, then read back once
        total += float(s)
        count += int(n)
    nelbo = total / max(count, 1)
    return {"nelbo_per_token": nelbo, "ppl": math.exp(min(nelbo, 50.0)), "eval_tokens": count}


def task_exact_match(cfg: Config, params, task, problems, tokenizer, rng, *, return_predictions=False):
    """Exact match of generated answers on `problems` (prompt -> answer), sampled in fixed-size batches.

    Every batch has the same shapes (the last one is padded with repeats), so the sampler compiles once.
    """
    prompts = np.asarray([tokenizer.encode(p.prompt, bos=True) for p in problems], np.int32)
    settings = sampler_settings(cfg, prompts.shape[1])
    denoiser = Denoiser(cfg.model)
    bs = min(cfg.sample.batch_size, len(problems))
    outputs = []
    for start in range(0, len(problems), bs):
        chunk = prompts[start:start + bs]
        pad = bs - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        tokens, _ = generate(denoiser, params, jnp.asarray(chunk), settings, jax.random.fold_in(rng, start))
        outputs.append(np.asarray(tokens)[: bs - pad, prompts.shape[1]:])
    generated = np.concatenate(outputs)
    predictions = [tokenizer.decode(row.tolist()) for row in generated]
    correct = [task.score(pred, prob) for pred, prob in zip(predictions, problems)]
    result = {"exact_match": float(np.mean(correct)), "eval_problems": len(problems)}
    if return_predictions:
        return result, predictions
    return result
