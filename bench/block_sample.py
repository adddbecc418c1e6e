"""Block-diffusion sampling with and without the KV cache: tokens/s and NFE for AR (block 1), block diffusion
and full diffusion (block = generation length), on a small random-weight LLaDA-style model.

    .venv/bin/python bench/block_sample.py [--gen-lengths 256 1024] [--block-sizes 1 4 16 0] [--d-model 64]
        [--layers 2] [--batch 1] [--prompt-len 16] [--repeats 1]

Rows are `max_length = prompt_len + G` slots. Block size 0 means the whole row (MDLM-style, one block, the
prompt as clean context inside it: the cache has nothing to hold). The prompt length is a multiple of the
other block sizes, so every variant runs G denoising steps (one commit per step). The cached sampler also
runs a prefill pass and one commit pass per finished block; its NFE counts them. The fused variant
(`fuse_commits=True`) writes a finished block's K/V in the next block's first denoising forward instead: one pass
per block less. All three must give the same tokens ("same"). Each program is compiled
ahead of time (`lower().compile()`), then timed with `block_until_ready`, median of --repeats; no weights are
trained, so rows never stop at EOS and throughput is batch x G / seconds.
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

from dlmjax.config import ModelConfig  # noqa: E402
from dlmjax.models.transformer import count_params, init_params  # noqa: E402
from dlmjax.sampling import Denoiser, generate_blocks, generate_blocks_uncached  # noqa: E402
from dlmjax.sampling.settings import BlockSamplerSettings  # noqa: E402


def timed(jitted, cfg, params, prompt, settings, rng, repeats, **static):
    """(median seconds, (tokens, nfe)) of a compiled sampler; compilation is not timed and not run twice."""
    compiled = jitted.lower(cfg, params, prompt, settings, rng, **static).compile()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(params, prompt, rng))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gen-lengths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[1, 4, 16, 0])
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    rows = []
    for gen in a.gen_lengths:
        cfg = ModelConfig(vocab_size=260, d_model=a.d_model, n_layers=a.layers, n_heads=4, mlp_hidden=3 * a.d_model,
                          max_seq_len=a.prompt_len + gen)
        params = init_params(cfg, jax.random.PRNGKey(0))
        prompt = jax.random.randint(jax.random.PRNGKey(1), (a.batch, a.prompt_len), 0, 256, jnp.int32)
        for bs in a.block_sizes:
            block = bs or a.prompt_len + gen
            settings = BlockSamplerSettings.bd3(max_length=a.prompt_len + gen, block_length=block, mask_id=259)
            rng = jax.random.PRNGKey(2)
            row = {"bench": "block_sample", "params": count_params(params), "batch": a.batch,
                   "prompt_len": a.prompt_len, "gen_length": gen, "block_length": block}
            variants = (("cached", generate_blocks, {}), ("fused", generate_blocks, {"fuse_commits": True}),
                        ("uncached", generate_blocks_uncached, {}))
            for name, fn, static in variants:
                seconds, (tokens, nfe) = timed(fn, Denoiser(cfg), params, prompt, settings, rng, a.repeats, **static)
                row[f"{name}_s"] = round(seconds, 3)
                row[f"{name}_nfe"] = int(nfe)
                row[f"{name}_tokens_per_s"] = round(a.batch * gen / seconds, 1)
                row[f"{name}_tokens"] = tokens
            fused = row.pop("fused_tokens")
            row["same_tokens"] = bool(jnp.array_equal(row.pop("cached_tokens"), row["uncached_tokens"])
                                      and jnp.array_equal(fused, row.pop("uncached_tokens")))
            row["speedup"] = round(row["uncached_s"] / row["cached_s"], 2)
            row["fused_vs_cached"] = round(row["cached_s"] / row["fused_s"], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'G':>5s} {'block':>5s} {'cached s':>9s} {'NFE':>5s} {'tok/s':>8s} {'fused s':>8s} {'NFE':>5s}"
          f" {'tok/s':>8s} {'fused x':>7s} {'uncached s':>10s} {'NFE':>5s} {'tok/s':>8s} {'speed-up':>8s} {'same':>5s}")
    for r in rows:
        print(f"{r['gen_length']:5d} {r['block_length']:5d} {r['cached_s']:9.3f} {r['cached_nfe']:5d} "
              f"{r['cached_tokens_per_s']:8.1f} {r['fused_s']:8.3f} {r['fused_nfe']:5d} {r['fused_tokens_per_s']:8.1f} "
              f"{r['fused_vs_cached']:7.2f} {r['uncached_s']:10.3f} {r['uncached_nfe']:5d} "
              f"{r['uncached_tokens_per_s']:8.1f} {r['speedup']:8.2f} {str(r['same_tokens']):>5s}")


if __name__ == "__main__":
    main()
