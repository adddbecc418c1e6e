"""Sampler throughput: the one-jit `generate` (nested lax.while_loop) against a Python loop that
dispatches one jitted denoising step at a time, and against a bare jitted forward pass of the same shapes.

    .venv/bin/python bench/sample.py [--config configs/demo.yaml] [--checkpoint DIR] [--batch 64]
        [--prompt-len 9] [--gen-length 7] [--steps 7] [--block-length 7] [--repeats 5]

Throughput counts generated tokens before the first EOS per row (ALGORITHMS.md §6.4); the all-slots count
is reported too. With random weights (no --checkpoint) EOS appears at random, so compare the `all` figure.
Everything is timed after compilation, with `block_until_ready`, as the median of `--repeats` runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dlmjax.config import load_config  # noqa: E402
from dlmjax.data.tokenizer import EOS_ID  # noqa: E402
from dlmjax.models.transformer import Denoiser, count_params, init_params  # noqa: E402
from dlmjax.sampling import SamplerSettings, generate  # noqa: E402
from dlmjax.sampling.generate import denoise_step, step_keys  # noqa: E402
from dlmjax.sampling.schedule import transfer_counts  # noqa: E402


def timed(fn, repeats):
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def per_step_python_loop(denoiser, params, prompt, settings, rng):
    """The same algorithm with the loops in Python: one jitted dispatch per denoising step."""
    b, lp = prompt.shape
    key_mask = jnp.ones((b, lp + settings.gen_length), bool)
    canvas = jnp.concatenate([prompt, jnp.full((b, settings.gen_length), settings.mask_id, jnp.int32)], 1)
    step = jax.jit(denoise_step, static_argnames=("denoiser", "settings", "prompt_length", "block_start"))
    count = jax.jit(lambda c, s: jnp.sum(c[:, s:s + settings.block_length] == settings.mask_id, 1), static_argnums=1)
    for blk in range(settings.num_blocks):
        start = lp + blk * settings.block_length
        table = transfer_counts(count(canvas, start), settings.steps_per_block)
        for s in range(settings.steps_per_block):
            rng, gk, ck = step_keys(rng)
            canvas = step(denoiser, params, canvas, key_mask, settings=settings, prompt_length=lp,
                          block_start=start, k=table[:, s], gumbel_key=gk, confidence_key=ck)
    return canvas


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--checkpoint", help="a training workdir; default: random weights of --config's model")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=9)
    ap.add_argument("--gen-length", type=int, default=7)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--block-length", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if a.checkpoint:
        from dlmjax.checkpoint import load
        cfg, params = load(a.checkpoint)
    else:
        cfg = load_config(a.config, a.overrides)
        params = init_params(cfg.model, jax.random.PRNGKey(0))
    den = Denoiser(cfg.model)
    settings = SamplerSettings(gen_length=a.gen_length, steps=a.steps, block_length=a.block_length or a.gen_length,
                               mask_id=cfg.diffusion.mask_id)
    rng = jax.random.PRNGKey(0)
    prompt = jax.random.randint(rng, (a.batch, a.prompt_len), 0, 256, jnp.int32)
    tokens = np.asarray(generate(den, params, prompt, settings, rng)[0])[:, a.prompt_len:]
    loop_s = timed(lambda: generate(den, params, prompt, settings, rng)[0], a.repeats)
    py_s = timed(lambda: per_step_python_loop(den, params, prompt, settings, rng), a.repeats)
    canvas = jnp.concatenate([prompt, jnp.full((a.batch, a.gen_length), settings.mask_id, jnp.int32)], 1)
    fwd = jax.jit(den)
    fwd_s = timed(lambda: fwd(params, canvas), a.repeats)
    before_eos = int(sum(int(np.argmax(r == EOS_ID)) if (r == EOS_ID).any() else len(r) for r in tokens))
    row = {"bench": "sample", "params": count_params(params), "batch": a.batch, "prompt_len": a.prompt_len,
           "gen_length": a.gen_length, "steps": a.steps, "block_length": settings.block_length, "nfe": a.steps,
           "while_loop_s": round(loop_s, 4), "python_loop_s": round(py_s, 4),
           "tokens_per_s_before_eos": round(before_eos / loop_s, 1),
           "tokens_per_s_all": round(a.batch * a.gen_length / loop_s, 1),
           "ms_per_step_while_loop": round(loop_s / a.steps * 1e3, 3),
           "ms_per_forward_bare": round(fwd_s * 1e3, 3),
           "step_over_forward": round(loop_s / a.steps / fwd_s, 3),
           "python_loop_over_while_loop": round(py_s / loop_s, 3), "backend": jax.default_backend()}
    print(json.dumps(row))
    print(f"\n{'':30s} {'seconds':>9s} {'ms/step':>9s} {'tokens/s (all)':>15s}")
    print(f"{'generate (one jit, while loops)':30s} {loop_s:9.4f} {loop_s / a.steps * 1e3:9.3f} "
          f"{row['tokens_per_s_all']:15.1f}")
    print(f"{'python loop of jitted steps':30s} {py_s:9.4f} {py_s / a.steps * 1e3:9.3f} "
          f"{a.batch * a.gen_length / py_s:15.1f}")
    print(f"{'bare jitted forward (1 pass)':30s} {fwd_s:9.4f} {fwd_s * 1e3:9.3f} {'':>15s}")


if __name__ == "__main__":
    main()
