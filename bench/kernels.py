"""block_attention kernels: tile skipping everywhere, device throughput where there is a device.

    .venv/bin/python bench/kernels.py [--lengths 2048 4096 8192 16384 32768] [--block 16] [--iters 10]

Prints one JSON object per row and a table.
- Always: for the block-causal and BD3 masks, the fraction of (q tile, kv tile) pairs the kernels skip at the
  tile sizes of each backend's table, next to the mask's own sparsity (the ceiling tile skipping approaches
  as tiles shrink to the mask's block). L is the attention length (for BD3: 2 x the sequence length).
- On TPU/GPU: ms and TFLOP/s of block_attention (forward, forward+backward) and of
  `jax.nn.dot_product_attention` with the dense mask (the baseline; it may run out of memory at 32k).
  TFLOP/s counts the FLOPs the mask allows (4 * B * H * L^2 * Dh * density forward, x 3.5 with backward),
  so a kernel that skips nothing and one that skips everything are compared on useful work.
- On CPU: an interpret-mode spot check of the Pallas kernels against the dense reference; device timings
  are pending (no accelerator here).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import kernels_pallas as kp  # noqa: E402
from kernels_pallas import reference  # noqa: E402


def _masks(length: int, block: int):
    return {"block_causal": kp.BlockCausal(block), "bd3": kp.Bd3Training(length // 2, block)}


def mask_density(name: str, length: int, block: int) -> float:
    """Fraction of (q, kv) pairs the mask allows, in closed form (length a multiple of the block)."""
    if name == "block_causal":
        nb = length // block
        return (nb + 1) / (2 * nb)
    nb = length // 2 // block  # bd3: nb diagonal + nb(nb-1)/2 + nb(nb+1)/2 blocks of 4 nb^2
    return (nb + 1) / (4 * nb)


def skip_rows(lengths, block):
    rows = []
    for length in lengths:
        for name, mask in _masks(length, block).items():
            row = {"bench": "tile_skip", "mask": name, "L": length, "mask_block": block,
                   "mask_sparsity": round(1 - mask_density(name, length, block), 4)}
            for impl, sizes in (("mosaic", kp.BLOCK_SIZES["mosaic"]), ("triton", kp.BLOCK_SIZES["triton"])):
                bq, bk = sizes["block_q"], sizes["block_k"]
                row[f"skip_{impl}_{bq}x{bk}"] = round(kp.skipped_fraction(mask, length, length, bq, bk), 4)
            rows.append(row)
    return rows


def interpret_spot_check():
    """Forward and gradients of both Pallas kernels in interpret mode vs the dense reference (max abs error)."""
    rows = []
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    b, n, h, hkv, dh = 1, 64, 4, 2, 32
    q = jax.random.normal(ks[0], (b, n, h, dh))
    k, v = (jax.random.normal(key, (b, n, hkv, dh)) for key in ks[1:3])
    ct = jax.random.normal(ks[3], q.shape)
    for name, mask in _masks(n, 8).items():
        def run(fn):
            out, vjp = jax.vjp(fn, q, k, v)
            return out, vjp(ct)
        want = jax.jit(lambda: run(lambda q, k, v: reference.block_attention(q, k, v, mask=mask)))()
        for impl in ("mosaic", "triton"):
            got = jax.jit(lambda: run(lambda q, k, v: kp.block_attention(
                q, k, v, mask=mask, impl=impl, block_q=16, block_k=16, interpret=True)))()
            err = max(float(jnp.max(jnp.abs(a - w))) for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
            rows.append({"bench": "interpret_check", "impl": impl, "mask": name, "L": n, "max_abs_err": err})
    return rows


def _time(fn, *args, iters):
    out = fn(*args)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def device_rows(lengths, block, iters, batch=1, heads=8, head_dim=128):
    rows = []
    for length in lengths:
        x = jax.random.normal(jax.random.PRNGKey(0), (batch, length, heads, head_dim), jnp.bfloat16)
        for name, mask in _masks(length, block).items():
            flops = 4 * batch * heads * length * length * head_dim * mask_density(name, length, block)

            def dense(q, k, v, mask=mask):
                allowed = jnp.asarray(mask.dense(length, length))[None, None]
                return jax.nn.dot_product_attention(q, k, v, mask=allowed)

            def kernel(q, k, v, mask=mask):
                return kp.block_attention(q, k, v, mask=mask)

            for impl, fn in (("block_attention", kernel), ("dot_product_attention", dense)):
                row = {"bench": "attention", "impl": impl, "mask": name, "L": length, "backend": jax.default_backend()}
                try:
                    fwd = jax.jit(fn)
                    grad = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
                    t_f, t_fb = _time(fwd, x, x, x, iters=iters), _time(grad, x, x, x, iters=iters)
                    row.update(fwd_ms=round(t_f * 1e3, 3), fwd_bwd_ms=round(t_fb * 1e3, 3),
                               tflops_fwd=round(flops / t_f / 1e12, 2),
                               tflops_fwd_bwd=round(3.5 * flops / t_fb / 1e12, 2))
                except Exception as e:  # the dense baseline may not fit at 32k: record it, keep going
                    row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                rows.append(row)
    return rows


def _table(rows):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys and k != "bench"]
    lines = [" | ".join(keys), " | ".join("---" for _ in keys)]
    lines += [" | ".join(str(r.get(k, "")) for k in keys) for r in rows]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--block", type=int, default=16, help="the mask's block size (BD3-LM uses 4..16)")
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    backend = jax.default_backend()
    sections = [("tile skipping (fraction of tiles never computed nor loaded)", skip_rows(a.lengths, a.block))]
    if backend in ("tpu", "gpu"):
        sections.append((f"device throughput on {backend}", device_rows(a.lengths, a.block, a.iters)))
    else:
        sections.append(("interpret-mode spot check (CPU)", interpret_spot_check()))
        sections.append(("device throughput", [{"bench": "attention", "status":
                         f"pending: no accelerator (backend={backend}); run this script on a TPU or GPU"}]))
    for title, rows in sections:
        for r in rows:
            print(json.dumps(r), flush=True)
    for title, rows in sections:
        print(f"\n## {title}\n")
        print(_table(rows))


if __name__ == "__main__":
    main()
