"""Train-step throughput: tokens/s and achieved GFLOP/s of the jitted, donated train step.

    .venv/bin/python bench/train_step.py [--config configs/demo.yaml] [--steps 30] [section.key=value ...]

Prints one JSON object per configuration and a table. The FLOP count is the usual 6 * params * tokens
plus the attention score/value matmuls (12 * layers * d_model * L^2 per row); it is an estimate.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from dlmjax.config import load_config  # noqa: E402
from dlmjax.models.transformer import count_params  # noqa: E402
from dlmjax.sharding import batch_sharding, make_mesh  # noqa: E402
from dlmjax.train.loop import load_data  # noqa: E402
from dlmjax.train.state import init_train_state, make_optimizer  # noqa: E402
from dlmjax.train.adapt import diffusion_at  # noqa: E402
from dlmjax.train.step import as_batch, make_train_step  # noqa: E402


def bench(cfg, steps: int) -> dict:
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.optim, max(steps, 2))
    state, shardings = init_train_state(cfg.model, tx, 0, mesh, cfg.mesh.rules)
    bsh = batch_sharding(mesh, cfg.mesh.rules)
    it = iter(load_data(cfg)[0])
    batches = [jax.device_put(as_batch(next(it)), bsh) for _ in range(steps)]
    t0 = time.perf_counter()
    # A block-size schedule times the step of the size the run samples with (its last).
    diffusion = diffusion_at(cfg.diffusion, cfg.diffusion.block_size) if cfg.diffusion.block_schedule else cfg.diffusion
    step = make_train_step(tx, cfg.model, diffusion, shardings, bsh, cfg.mesh.rules).lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    state, m = step(state, batches[0])  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for b in batches:
        state, m = step(state, b)
    jax.block_until_ready((state, m))
    dt = (time.perf_counter() - t0) / steps
    b, length = cfg.data.batch_size, cfg.data.seq_len
    n = count_params(state.params)
    flops = 6 * n * b * length + 12 * cfg.model.n_layers * cfg.model.d_model * length * length * b
    return {"bench": "train_step", "params": n, "batch": b, "seq_len": length, "ms_per_step": round(dt * 1e3, 2),
            "tokens_per_s": round(b * length / dt), "gflops_per_s": round(flops / dt / 1e9, 1),
            "compile_s": round(compile_s, 2), "backend": jax.default_backend(), "devices": jax.device_count(),
            "cpu": platform.processor() or platform.machine(), "jax": jax.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    rows = []
    for extra in ([], ["model.scan_layers=true"], ["model.remat=true"]):
        cfg = load_config(a.config, list(a.overrides) + extra + ["train.progress=false"])
        row = dict(bench(cfg, a.steps), variant=" ".join(extra) or "default")
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'variant':28s} {'params':>9s} {'batch x L':>10s} {'ms/step':>8s} {'tokens/s':>9s} {'GFLOP/s':>8s}"
          f" {'compile s':>9s}")
    for r in rows:
        print(f"{r['variant']:28s} {r['params']:9d} {str(r['batch']) + 'x' + str(r['seq_len']):>10s} "
              f"{r['ms_per_step']:8.1f} {r['tokens_per_s']:9d} {r['gflops_per_s']:8.1f} {r['compile_s']:9.2f}")


if __name__ == "__main__":
    main()
