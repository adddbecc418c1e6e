"""KV-cache bytes read per cached sampling step: the dense attention path vs the cache kernel.

    .venv/bin/python bench/kv_cache_bytes.py [--gen-length 1024] [--block-length 32] [--width 256]
        [--prompt-lengths 256,128,64,16] [--bd3-block 16] [--json-out bench/kv_cache_bytes.json]

Counted, not timed (no accelerator here): per cached step, summed over the batch and the layers, the bytes of K and
V read from the cache. The masked sampler's canvas is `width` prompt slots (each row left-padded to it) + G
generated slots; the block sampler's rows are left-aligned in `width + G` slots (no padding). Visible slots per
row, as the samplers pass them (`cache_ranges`):

    dual cache     [pad, block_start) U [block_end, N)    chunk = the block (Lb = block_length)
    prefix cache   [pad, block_start)                     chunk = the block and everything after it
    block cache    [0, b * L')                            chunk = block b (Lb = L')

- dense (`attention_impl=xla`): the einsum reads every slot of the cache, S x Hkv x Dh x 2 (K, V) per row and
  layer, whatever is visible (counted once, the best case for XLA's tiling). Its NaN guard (`where` on V) can add
  one more pass over V where XLA does not fuse it into the dot.
- kernel: the tiles `kernels_pallas.ranges.visit_plan` lists for the step's ranges, i.e. exactly the tiles the
  kernel reads, at the tile sizes of `kernels_pallas.BLOCK_SIZES` fitted as the kernel fits them. TPU: in-bounds
  rows of each visited tile, once per query head and per RESIDENT_Q_ROWS queries. GPU: block_k rows per visited
  tile, once per query head and per q tile (`kernel`: every program's reads counted as HBM reads, the upper
  bound) or once per row and head (`kernel_l2`: the programs of one row and head share them through L2).
  `tpu-bk128`: the TPU kernel with 128-slot cache tiles instead of the table's 512 (finer skipping, 4x the grid
  steps of ~0.35 us each).
Every cached step of a block reads the same slots, so the average over blocks is the average per step.

Models: LLaDA-8B's attention shape (32 layers, 32 heads = 32 KV heads, head_dim 128, bfloat16), computed
analytically, and the 27.8M LLaDA of bench/sample.py (8 layers, 8 heads, head_dim 64, float32; the TPU kernels
need head_dim % 128 == 0, so only the GPU count applies to it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels_pallas import ranges  # noqa: E402
from kernels_pallas.cached import RESIDENT_Q_ROWS  # noqa: E402
from kernels_pallas.dispatch import fit_block  # noqa: E402

MODELS = {
    "llada-8b": dict(layers=32, heads=32, kv_heads=32, head_dim=128, bytes=2, backends=("tpu", "tpu-bk128", "gpu")),
    "sample-27.8m": dict(layers=8, heads=8, kv_heads=8, head_dim=64, bytes=4, backends=("gpu",)),
}
BACKENDS = {"tpu": ("mosaic", None), "tpu-bk128": ("mosaic", 128), "gpu": ("triton", None)}  # (impl, block_k)


def masked_steps(mode: str, width: int, gen: int, block: int, prompt_lengths):
    """[(cache_ranges int32[B, R, 2], chunk length, slots)] per block of the masked sampler's cached steps."""
    n = width + gen
    pad = np.asarray([width - p for p in prompt_lengths], np.int32)
    steps = []
    for start in range(width, width + gen, block):
        lo = np.stack([pad, np.full_like(pad, start)], axis=-1)[:, None]
        if mode == "dual":
            hi = np.stack([np.full_like(pad, start + block), np.full_like(pad, n)], axis=-1)[:, None]
            steps.append((np.concatenate([lo, hi], axis=1), block, n))
        else:
            steps.append((lo, n - start, n))
    return steps


def block_steps(width: int, gen: int, block: int, prompt_lengths):
    """[(cache_ranges, chunk length, slots)] per block of the block sampler's denoising steps."""
    total = width + gen
    slots = total - block  # the last block is never committed
    batch = len(prompt_lengths)
    first = min(prompt_lengths) // block
    return [(np.asarray([[[0, b * block]]] * batch, np.int32), block, slots) for b in range(first, total // block)]


def kernel_slots(backend: str, cache_ranges, chunk: int, slots: int, *, shared_l2: bool = False) -> int:
    """Cache slots the kernel reads for one layer and one query head, summed over rows (`shared_l2`: a GPU row and
    head's q-tile programs read each tile from HBM once)."""
    impl, block_k = BACKENDS[backend]
    block_k = fit_block(impl, "cached_block_k", block_k, slots)
    block_q = fit_block(impl, "cached_block_q", None, chunk)
    n_tiles = -(-slots // block_k)
    lo, hi = ranges.normalize(jnp.asarray(cache_ranges), slots)
    tiles, _, counts = (np.asarray(x) for x in ranges.visit_plan(lo, hi, block_k, n_tiles))
    total = 0
    for row_tiles, count in zip(tiles, counts):
        visited = row_tiles[:count]
        if impl == "mosaic":
            bq = block_q if chunk > block_q else chunk
            passes = -(-chunk // (max(RESIDENT_Q_ROWS // bq, 1) * bq))
            rows = np.minimum((visited + 1) * block_k, slots) - visited * block_k
        else:
            bq = min(block_q, max(16, 1 << (chunk - 1).bit_length()))
            passes = 1 if shared_l2 else -(-chunk // bq)
            rows = np.full(visited.shape, block_k)
        total += passes * int(rows.sum())
    return total


def per_step_bytes(model: dict, backend: str, steps) -> dict:
    row_bytes = model["head_dim"] * 2 * model["bytes"] * model["layers"]  # K and V of one slot, one head, all layers
    dense = [len(r) * slots * model["kv_heads"] * row_bytes for r, _, slots in steps]
    kernel = [kernel_slots(backend, r, chunk, slots) * model["heads"] * row_bytes for r, chunk, slots in steps]
    kernel_l2 = [kernel_slots(backend, r, chunk, slots, shared_l2=True) * model["heads"] * row_bytes
                 for r, chunk, slots in steps]
    visible = [int(np.asarray(ranges.slot_mask(jnp.asarray(r), slots)).sum()) * model["kv_heads"] * row_bytes
               for r, _, slots in steps]
    return {"dense_mb": float(np.mean(dense)) / 1e6, "kernel_mb": float(np.mean(kernel)) / 1e6,
            "kernel_l2_mb": float(np.mean(kernel_l2)) / 1e6, "visible_mb": float(np.mean(visible)) / 1e6,
            "kernel_over_dense": float(np.sum(kernel) / np.sum(dense)),
            "kernel_l2_over_dense": float(np.sum(kernel_l2) / np.sum(dense))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gen-length", type=int, default=1024)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--prompt-lengths", default="256,128,64,16")
    parser.add_argument("--bd3-block", type=int, default=16)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    prompts = [int(x) for x in args.prompt_lengths.split(",")]
    if max(prompts) > args.width:
        parser.error(f"--prompt-lengths {prompts} must fit --width {args.width}")
    workloads = {
        "dual": masked_steps("dual", args.width, args.gen_length, args.block_length, prompts),
        "prefix": masked_steps("prefix", args.width, args.gen_length, args.block_length, prompts),
        "block": block_steps(args.width, args.gen_length, args.bd3_block, prompts),
    }
    results = []
    for model_name, model in MODELS.items():
        for backend in model["backends"]:
            for mode, steps in workloads.items():
                row = {"model": model_name, "backend": backend, "mode": mode, "gen_length": args.gen_length,
                       "width": args.width, "prompt_lengths": prompts, "batch": len(prompts),
                       "block_length": args.bd3_block if mode == "block" else args.block_length,
                       **per_step_bytes(model, backend, steps)}
                results.append(row)
                print(json.dumps(row))
    print()
    print(f"KV-cache MB read per cached step (all layers, batch {len(prompts)}, prompts {prompts} in {args.width} "
          f"slots, G = {args.gen_length})")
    print(f"{'model':<14}{'backend':<11}{'mode':<8}{'dense':>9}{'visible':>9}{'kernel':>9}{'kernel_l2':>10}"
          f"{'kernel/dense':>14}{'l2/dense':>10}")
    for r in results:
        print(f"{r['model']:<14}{r['backend']:<11}{r['mode']:<8}{r['dense_mb']:>9.1f}{r['visible_mb']:>9.1f}"
              f"{r['kernel_mb']:>9.1f}{r['kernel_l2_mb']:>10.1f}{r['kernel_over_dense']:>14.3f}"
              f"{r['kernel_l2_over_dense']:>10.3f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
