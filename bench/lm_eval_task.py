"""Wall time of one lm-eval run of a shipped task on a dlmjax checkpoint, as a user runs it:

    python -m dlmjax.lm_eval --model dlmjax --model_args checkpoint=C,mc_num=M --batch_size B \\
        --tasks dlmjax_addition_mc --include_path <dlmjax/lm_eval_tasks> --output_path OUT

in a fresh process with the Hub and datasets offline, from a scratch working directory.

    .venv/bin/python bench/lm_eval_task.py [--checkpoint DIR] [--train-steps 1500] [--tasks dlmjax_addition_mc]
        [--mc-num 128] [--batch-size 32] [--model-args k=v,...] [--json-out F]

Without `--checkpoint` it first trains the demo model (`configs/demo.yaml`, `train.steps=--train-steps`) in a
temporary folder (not timed). Reported per task: the process's wall seconds (start-up, loading the checkpoint and
the task, compiling, scoring), lm-eval's own evaluation time (`total_evaluation_time_seconds`: model built to
results), the requests (counted in lm-eval's samples file: a multiple-choice document makes one per choice) and
the metric.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dlmjax.lm_eval_tasks import TASKS_DIR  # noqa: E402

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def train_demo(workdir: Path, steps: int) -> Path:
    """The demo model trained for `steps` steps in `workdir` (the trainer's own end-of-run eval included)."""
    cmd = [sys.executable, "-m", "dlmjax", "train", "--config", str(REPO / "configs" / "demo.yaml"),
           "--workdir", str(workdir), f"train.steps={steps}", "train.progress=false",
           f"checkpoint.every_steps={steps}"]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return workdir


def run_task(checkpoint: Path, task: str, mc_num: int, batch_size: int, extra: str, scratch: Path) -> dict:
    """One `python -m dlmjax.lm_eval` process on one task: wall seconds and lm-eval's results for the task."""
    out = scratch / f"out_{task}"
    model_args = f"checkpoint={checkpoint},mc_num={mc_num}" + (f",{extra}" if extra else "")
    cmd = [sys.executable, "-m", "dlmjax.lm_eval", "--model", "dlmjax", "--model_args", model_args,
           "--batch_size", str(batch_size), "--tasks", task, "--include_path", str(TASKS_DIR),
           "--output_path", str(out), "--log_samples"]
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(REPO)}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    metrics = {k.split(",")[0]: v for k, v in results["results"][task].items() if isinstance(v, float)}
    docs = results["n-samples"][task]["effective"]
    # One line per document, holding its requests (a multiple-choice document has one per choice).
    samples = [json.loads(line) for f in out.rglob(f"samples_{task}_*.jsonl") for line in f.read_text().splitlines()]
    requests = sum(len(s["arguments"]) for s in samples)
    return {"task": task, "wall_s": round(wall, 1),
            "lm_eval_s": round(float(results["total_evaluation_time_seconds"]), 1), "docs": docs,
            "requests": requests, "requests_per_s_wall": round(requests / wall, 1), "metrics": metrics,
            "load_avg_1min_start": round(load, 2), "load_avg_1min_end": round(os.getloadavg()[0], 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", help="a dlmjax run, checkpoint or converted release (default: train the demo)")
    ap.add_argument("--train-steps", type=int, default=1500)
    ap.add_argument("--tasks", default="dlmjax_addition_mc", help="comma-separated; each runs in its own process")
    ap.add_argument("--mc-num", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model-args", default="", help="more model args, k=v,... (e.g. is_check_greedy=false)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        train_s = None
        if args.checkpoint:
            checkpoint = Path(args.checkpoint).resolve()
        else:
            t0 = time.perf_counter()
            checkpoint = train_demo(scratch / "demo", args.train_steps)
            train_s = round(time.perf_counter() - t0, 1)
        rows = [run_task(checkpoint, task, args.mc_num, args.batch_size, args.model_args, scratch)
                for task in args.tasks.split(",")]
    summary = {"bench": "lm_eval_task", "checkpoint": args.checkpoint or f"demo, {args.train_steps} steps",
               "train_s": train_s, "mc_num": args.mc_num, "batch_size": args.batch_size,
               "model_args": args.model_args, "cpu_count": os.cpu_count(), "runs": rows}
    print(json.dumps(summary))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=1))
    print(f"\ncheckpoint: {summary['checkpoint']}; mc_num {args.mc_num}, batch_size {args.batch_size}"
          + (f", {args.model_args}" if args.model_args else "") + "\n")
    print("| task | docs | requests | wall s | lm-eval s | requests/s (wall) | metric | load |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        metric = ", ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items() if not k.endswith("_stderr"))
        print(f"| {r['task']} | {r['docs']} | {r['requests']} | {r['wall_s']} | {r['lm_eval_s']} | "
              f"{r['requests_per_s_wall']} | {metric} | {r['load_avg_1min_start']} -> {r['load_avg_1min_end']} |")


if __name__ == "__main__":
    main()
