"""Masked-sampler speed: vanilla / prefix-cache / dual-cache decoding, fixed steps and threshold 0.9, on a
LLaDA-architecture model of ~28M parameters (d_model 512, 8 layers, random weights), against the reference
PyTorch figures measured on the same kind of 2-core CPU (../shared/golden/reference_speed.json, copied to
bench/reference_speed.json).

    .venv/bin/python bench/sample.py [--gen-length 256] [--block-length 32] [--prompt-len 64] [--repeats 1]
        [--modes none,prefix,dual] [--thresholds none,0.9] [--json-out bench/sample.json]

For each case: wall seconds of one warm call (compiled ahead of time, so the timed call is all sampling),
NFE, tokens/s = gen_length / seconds (the reference's definition; with random weights no EOS is special), the
speed-up over the reference case with the same settings, and ms per forward. Also, in the same run:
  - the per-step overhead of the while loop: (vanilla seconds / NFE) / (bare jitted forward of the same
    [1, prompt + gen] canvas), target <= 1.1;
  - this CPU's float32 matmul peak (a 2048^3 matmul) and the fraction of it the vanilla forward reaches
    (FLOPs counted from the shapes: 2 x matmul params x tokens + attention).
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

from dlmjax.config import ModelConfig  # noqa: E402
from dlmjax.models.transformer import count_params, init_params  # noqa: E402
from dlmjax.sampling import Denoiser, SamplerSettings  # noqa: E402
from dlmjax.sampling import generate_masked as generate  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = {("none", None): "llada_generate", ("prefix", None): "prefix_fixed", ("dual", None): "dual_fixed",
             ("dual", 0.9): "dual_threshold", ("none", 0.9): "nocache_threshold"}


def reference_model(max_len: int) -> ModelConfig:
    """The reference's model shape: LLaDA blocks, d 512, 8 heads, 8 layers, SwiGLU 1536, vocab 512."""
    return ModelConfig(arch="llada", vocab_size=512, d_model=512, n_layers=8, n_heads=8, mlp_hidden=1536,
                       max_seq_len=max_len, rope_theta=500000.0, norm_eps=1e-5)


def forward_flops(cfg: ModelConfig, tokens: int, keys: int) -> float:
    """Multiply-adds x 2 of one forward of `tokens` queries against `keys` keys."""
    d, f = cfg.d_model, cfg.mlp_hidden
    per_layer = 4 * d * d + 3 * d * f
    matmul = 2 * tokens * (cfg.n_layers * per_layer + d * cfg.vocab_size)
    attention = 2 * 2 * tokens * keys * d * cfg.n_layers
    return float(matmul + attention)


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times)


def gemm_chain_seconds(cfg: ModelConfig, tokens: int, repeats: int = 9) -> float:
    """Only the forward's weight matmuls ([tokens, d] through every layer's q, k, v, o, gate, up, down and the head),
    with nothing else: the ceiling a forward of `tokens` tokens can reach on this CPU with XLA's float32 GEMMs."""
    d, f = cfg.d_model, cfg.mlp_hidden
    rng = np.random.default_rng(0)
    w = lambda *shape: jnp.asarray(0.02 * rng.standard_normal(shape), jnp.float32)  # noqa: E731
    layers = [[w(d, d), w(d, d), w(d, d), w(d, d), w(d, f), w(d, f), w(f, d)] for _ in range(cfg.n_layers)]
    head = w(d, cfg.vocab_size)

    def chain(layers, head, x):
        for q, k, v, o, g, u, dn in layers:
            x = x + (x @ q + x @ k + x @ v) @ o
            x = x + ((x @ g) * (x @ u)) @ dn
        return x @ head

    fn = jax.jit(chain)
    x = jnp.ones((tokens, d), jnp.float32)
    jax.block_until_ready(fn(layers, head, x))
    return timed(lambda: fn(layers, head, x), repeats)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--modes", default="none,prefix,dual")
    ap.add_argument("--thresholds", default="none,0.9")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    g, bl, lp = args.gen_length, args.block_length, args.prompt_len
    cfg = reference_model(lp + g)
    params = init_params(cfg, jax.random.PRNGKey(0))
    prompt = jnp.asarray(np.random.default_rng(123).integers(0, 500, size=(1, lp)), jnp.int32)
    denoiser = Denoiser(cfg)
    rng = jax.random.PRNGKey(0)
    with open(os.path.join(HERE, "reference_speed.json")) as f:
        reference = json.load(f)["cases"]

    peak = matmul_peak()
    canvas = jnp.concatenate([prompt, jnp.full((1, g), 500, jnp.int32)], axis=1)
    bare = jax.jit(lambda p, x: denoiser(p, x, jnp.ones(x.shape, bool)))
    jax.block_until_ready(bare(params, canvas))
    bare_s = timed(lambda: bare(params, canvas), max(5, args.repeats))
    full_flops = forward_flops(cfg, lp + g, lp + g)
    gemm_full_s, gemm_block_s = gemm_chain_seconds(cfg, lp + g), gemm_chain_seconds(cfg, bl)
    # The dual cache's steps forward one block: an uncached forward of `bl` tokens is their floor on this CPU.
    block_canvas = canvas[:, :bl]
    jax.block_until_ready(bare(params, block_canvas))
    bare_block_s = timed(lambda: bare(params, block_canvas), max(9, args.repeats))

    rows = []
    for mode in args.modes.split(","):
        for th in args.thresholds.split(","):
            threshold = None if th == "none" else float(th)
            settings = SamplerSettings.llada(gen_length=g, steps=g, block_length=bl, remasking="low_confidence",
                                             cache=mode, threshold=threshold, mask_id=500)
            t0 = time.perf_counter()
            compiled = generate.lower(denoiser, params, prompt, settings, rng).compile()
            compile_s = time.perf_counter() - t0
            out = {}

            def run():
                out["r"] = compiled(params, prompt, rng)
                return out["r"]

            seconds = timed(run, args.repeats)
            nfe = int(out["r"][1])
            ref_name = REFERENCE.get((mode, threshold))
            ref = reference.get(ref_name) if ref_name else None
            row = {"cache": mode, "threshold": threshold, "nfe": nfe, "seconds": round(seconds, 2),
                   "tokens_per_s": round(g / seconds, 2), "ms_per_forward": round(1000 * seconds / nfe, 1),
                   "compile_s": round(compile_s, 1),
                   "reference": ref_name, "reference_tokens_per_s": ref and round(ref["tokens_per_s"], 2),
                   "speedup_vs_reference": ref and round((g / seconds) / ref["tokens_per_s"], 2)}
            if mode == "dual":
                blocks = g // bl
                floor = blocks * bare_s + (nfe - blocks) * bare_block_s
                row["tokens_per_s_if_steps_cost_a_bare_block_forward"] = round(g / floor, 2)
                row["bound_speedup_vs_reference"] = ref and round((g / floor) / ref["tokens_per_s"], 2)
                gemm_floor = blocks * gemm_full_s + (nfe - blocks) * gemm_block_s
                row["bound_speedup_if_only_gemms"] = ref and round((g / gemm_floor) / ref["tokens_per_s"], 2)
            if mode == "none" and threshold is None:
                row["step_over_bare_forward"] = round((seconds / nfe) / bare_s, 3)
                row["forward_fraction_of_matmul_peak"] = round(full_flops / (seconds / nfe) / peak, 3)
                row["step_over_gemm_only_forward"] = round((seconds / nfe) / gemm_full_s, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)

    summary = {"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(), "jax": jax.__version__,
               "n_params": count_params(params), "prompt_len": lp, "gen_length": g, "block_length": bl,
               "matmul_peak_gflops": round(peak / 1e9, 1), "bare_forward_ms": round(1000 * bare_s, 1),
               "bare_block_forward_ms": round(1000 * bare_block_s, 1),
               "gemm_only_forward_ms": round(1000 * gemm_full_s, 1), "gemm_only_block_ms": round(1000 * gemm_block_s, 1),
               "bare_block_forward_fraction_of_peak": round(forward_flops(cfg, bl, bl) / bare_block_s / peak, 3),
               "bare_forward_fraction_of_peak": round(full_flops / bare_s / peak, 3), "cases": rows}
    print(json.dumps(summary))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=1)
    print(f"\nmatmul peak {summary['matmul_peak_gflops']} GFLOP/s; bare forward [1, {lp + g}] "
          f"{summary['bare_forward_ms']} ms = {summary['bare_forward_fraction_of_peak']:.0%} of peak; bare forward "
          f"[1, {bl}] {summary['bare_block_forward_ms']} ms = {summary['bare_block_forward_fraction_of_peak']:.0%}")
    print(f"the same forwards' weight matmuls alone: {summary['gemm_only_forward_ms']} ms ([{lp + g}, d]), "
          f"{summary['gemm_only_block_ms']} ms ([{bl}, d])")
    print(f"{'cache':7} {'threshold':>9} {'NFE':>5} {'s':>7} {'tok/s':>7} {'ms/fwd':>7} {'ref tok/s':>9} {'x ref':>6}")
    for r in rows:
        print(f"{r['cache']:7} {str(r['threshold']):>9} {r['nfe']:5d} {r['seconds']:7.2f} {r['tokens_per_s']:7.2f} "
              f"{r['ms_per_forward']:7.1f} {str(r['reference_tokens_per_s']):>9} {str(r['speedup_vs_reference']):>6}")
    for r in rows:
        if "bound_speedup_vs_reference" in r:
            print(f"dual threshold={r['threshold']}: if every cached step cost only a bare [1, {bl}] forward: "
                  f"{r['tokens_per_s_if_steps_cost_a_bare_block_forward']} tok/s = "
                  f"{r['bound_speedup_vs_reference']}x the reference; if only its matmuls: "
                  f"{r['bound_speedup_if_only_gemms']}x")
    vanilla = next((r for r in rows if r["cache"] == "none" and r["threshold"] is None), None)
    if vanilla:
        print(f"while-loop step / bare forward = {vanilla['step_over_bare_forward']}; / its matmuls alone = "
              f"{vanilla['step_over_gemm_only_forward']} "
              f"(vanilla forward at {vanilla['forward_fraction_of_matmul_peak']:.0%} of the matmul peak)")


if __name__ == "__main__":
    main()
