"""AR vs block vs full diffusion on the addition task: exact match and sampling throughput of trained runs.

    .venv/bin/python bench/addition_compare.py RUN_DIR [RUN_DIR ...] [--problems 500] [--batch 500] [--repeats 3]

Each RUN_DIR is a training workdir (e.g. `dlmjax train --config configs/addition_bd4.yaml --workdir
runs/addition_bd4`). For every run: exact match on the held-out problems with the run's own sampler (the
block sampler with its KV cache for bd3 runs, the masked sampler otherwise), NFE, seconds and throughput
(generated tokens before EOS per second, compile excluded, median of --repeats); for bd3 runs also the
uncached twin, whose tokens must be identical. Prints one JSON line per run and then a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from dlmjax.checkpoint import load  # noqa: E402
from dlmjax.data.tasks import get_task, heldout  # noqa: E402
from dlmjax.data.tokenizer import ByteTokenizer  # noqa: E402
from dlmjax.evaluate import task_exact_match
from dlmjax.inference import uses_block_sampler  # noqa: E402
from dlmjax.models.transformer import count_params  # noqa: E402


def measure(cfg, params, task, problems, tok, repeats, cached):
    runs = [task_exact_match(cfg, params, task, problems, tok, jax.random.PRNGKey(0), return_predictions=True,
                             cached=cached) for _ in range(repeats)]
    result, predictions = runs[0]
    assert all(p == predictions for _, p in runs), "sampling is not deterministic across repeats"
    seconds = statistics.median(r["sample_seconds"] for r, _ in runs)
    return {**result, "sample_seconds": seconds,
            "sample_tokens_per_s": round(result["sample_tokens"] / seconds, 1)}, predictions


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    tok = ByteTokenizer()
    rows = []
    for run in a.runs:
        cfg, params = load(run)
        cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, batch_size=a.batch))
        task = get_task(cfg.data.task, **cfg.data.task_kwargs())
        problems = heldout(task, a.problems, cfg.data.seed)
        result, preds = measure(cfg, params, task, problems, tok, a.repeats, cached=True)
        d = cfg.diffusion
        row = {"bench": "addition_compare", "run": run, "objective": d.objective,
               "block_size": (d.block_size or cfg.data.seq_len) if d.objective == "bd3" else None,
               "params": count_params(params), **result}
        if uses_block_sampler(cfg):
            uncached, twin = measure(cfg, params, task, problems, tok, a.repeats, cached=False)
            row.update(uncached_seconds=uncached["sample_seconds"], uncached_nfe=uncached["sample_nfe"],
                       uncached_tokens_per_s=uncached["sample_tokens_per_s"], same_as_uncached=twin == preds)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'run':28s} {'objective':10s} {'block':>5s} {'exact':>6s} {'NFE':>5s} {'seconds':>8s} {'tok/s':>9s}"
          f" {'uncached tok/s':>15s} {'same':>5s}")
    for r in rows:
        print(f"{r['run']:28s} {r['objective']:10s} {str(r['block_size'] or '-'):>5s} {r['exact_match']:6.3f} "
              f"{r['sample_nfe']:5d} {r['sample_seconds']:8.3f} {r['sample_tokens_per_s']:9.1f} "
              f"{str(r.get('uncached_tokens_per_s', '-')):>15s} {str(r.get('same_as_uncached', '-')):>5s}")


if __name__ == "__main__":
    main()
