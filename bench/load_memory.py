"""Peak host memory of `dlmjax.load` as a multiple of the parameter bytes, old whole-state path vs params only.

    .venv/bin/python bench/load_memory.py [--layers 7] [--d-model 512] [--mlp-hidden 1536] [--repeats 3]
        [--out FILE.json]

Makes a run checkpoint in a temporary folder (a float32 TrainState with Adam's two moments, saved by
`Checkpointer` with its config, ~24M parameters by default) and a params-only export of the same parameters, then
measures each way of loading in a fresh subprocess:

  whole_state       what `load` did before: restore the full TrainState (parameters + Adam moments) onto one
                    device and keep `.params`
  params_only       `dlmjax.checkpoint.load(run)`: the params subtree alone (orbax partial restore)
  params_only_bf16  `load(run, dtype="bfloat16")`: cast while reading (ratio still over the float32 bytes)
  export            `load(export)` of the `save_params` export

Each subprocess imports everything, loads a tiny checkpoint the same way (so one-time library set-up is not
counted), resets the kernel's peak-RSS counter (`/proc/self/clear_refs`), records its resident memory, loads, and
reports `ru_maxrss - baseline`. On CPU the "device" is host memory, so the loaded parameters themselves count:
1.0x is the floor. Each mode runs in `--repeats` fresh subprocesses (the peak varies with how the read threads
interleave); the median is reported with every run's ratio. Prints one JSON object and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

MODES = ("whole_state", "params_only", "params_only_bf16", "export")


def _config(layers: int, d_model: int, mlp_hidden: int):
    from dlmjax.config import Config, ModelConfig

    heads = max(d_model // 64, 1)
    return Config(model=ModelConfig(d_model=d_model, n_layers=layers, n_heads=heads, mlp_hidden=mlp_hidden))


def make(root: Path, layers: int, d_model: int, mlp_hidden: int) -> dict:
    """A run checkpoint (full TrainState) and a params export under `root`, plus tiny warm-up copies of both."""
    import jax

    from dlmjax.checkpoint import Checkpointer, save_params
    from dlmjax.sharding import make_mesh
    from dlmjax.train.state import init_train_state, make_optimizer

    out = {}
    for name, cfg in (("warm", _config(1, 64, 128)), ("big", _config(layers, d_model, mlp_hidden))):
        tx = make_optimizer(cfg.optim, cfg.train.steps)
        state, _ = init_train_state(cfg.model, tx, 0, make_mesh(cfg.mesh), cfg.mesh.rules)
        ckpt = Checkpointer(root / name / "run" / "checkpoints", cfg.checkpoint)
        ckpt.save(1, state, config=cfg, force=True)
        ckpt.wait()
        ckpt.close()
        save_params(root / name / "export", cfg, state.params)
        leaves = jax.tree.leaves(state.params)
        out[name] = {"params": sum(x.size for x in leaves), "param_bytes": sum(x.nbytes for x in leaves),
                     "state_bytes": sum(x.nbytes for x in jax.tree.leaves(state))}
    return out


def _whole_state(run: Path):
    """The old `load`: the full TrainState restored onto one device, then `.params`."""
    import jax

    from dlmjax.checkpoint import Checkpointer
    from dlmjax.config import MeshConfig
    from dlmjax.sharding import make_mesh
    from dlmjax.train.state import abstract_train_state, make_optimizer

    ckpt = Checkpointer(run / "checkpoints", read_only=True)
    step = ckpt.latest_step()
    cfg = ckpt.restore_config(step)
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.devices()[:1])
    like, shardings = abstract_train_state(cfg.model, make_optimizer(cfg.optim, cfg.train.steps), mesh,
                                           cfg.mesh.rules)
    params = ckpt.restore_state(step, like, shardings).params
    ckpt.close()
    return cfg, params


def _load(root: Path, mode: str):
    from dlmjax.checkpoint import load

    if mode == "whole_state":
        return _whole_state(root / "run")
    if mode == "params_only":
        return load(root / "run")
    if mode == "params_only_bf16":
        return load(root / "run", dtype="bfloat16")
    return load(root / "export")


def _rss_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(root: Path, mode: str) -> dict:
    import jax

    _, warm = _load(root / "warm", mode)
    jax.block_until_ready(warm)
    del warm
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter that ru_maxrss reports
        reset = True
    except OSError:
        reset = False
    baseline = _rss_kb() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    _, params = _load(root / "big", mode)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    leaves = jax.tree.leaves(params)
    return {"mode": mode, "peak_increase_bytes": (peak - baseline) * 1024, "seconds": round(seconds, 3),
            "dtypes": sorted({str(x.dtype) for x in leaves}), "loaded_bytes": sum(x.nbytes for x in leaves),
            "peak_counter_reset": reset}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=7)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--mlp-hidden", type=int, default=1536)
    p.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per mode (the median is reported)")
    p.add_argument("--out", help="also write the JSON result here")
    p.add_argument("--_make", help=argparse.SUPPRESS)
    p.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._make:
        print(json.dumps(make(Path(args._make), args.layers, args.d_model, args.mlp_hidden)))
        return {}
    if args._measure:
        print(json.dumps(measure(Path(args._measure[0]), args._measure[1])))
        return {}

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with tempfile.TemporaryDirectory(prefix="dlmjax_load_memory_") as tmp:
        def child(*extra):
            proc = subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--d-model",
                                   str(args.d_model), "--mlp-hidden", str(args.mlp_hidden), *extra],
                                  capture_output=True, text=True, env=env, check=False)
            if proc.returncode:
                raise RuntimeError(f"{extra}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
            return json.loads(proc.stdout.strip().splitlines()[-1])

        sizes = child("--_make", tmp)["big"]
        rows = []
        for mode in MODES:
            runs = sorted((child("--_measure", tmp, mode) for _ in range(args.repeats)),
                          key=lambda r: r["peak_increase_bytes"])
            ratios = [round(r["peak_increase_bytes"] / sizes["param_bytes"], 3) for r in runs]
            rows.append({**runs[len(runs) // 2], "ratio": ratios[len(runs) // 2], "ratio_runs": ratios})
    result = {"model": {"layers": args.layers, "d_model": args.d_model, "mlp_hidden": args.mlp_hidden},
              "params": sizes["params"], "param_bytes_float32": sizes["param_bytes"],
              "train_state_bytes": sizes["state_bytes"], "goal_ratio": 1.3, "rows": rows,
              "jax": __import__("jax").__version__, "orbax": __import__("orbax.checkpoint").checkpoint.__version__}
    print(json.dumps(result))
    print(f"\n{sizes['params'] / 1e6:.1f}M parameters, {sizes['param_bytes'] / 2**20:.1f} MiB in float32; "
          f"train state {sizes['state_bytes'] / 2**20:.1f} MiB")
    print(f"{'mode':<18} {'peak increase':>14} {'x param bytes':>14} {'(all runs)':>20} {'loaded':>10} {'seconds':>8}")
    for r in rows:
        runs = "/".join(f"{x:.2f}" for x in r["ratio_runs"])
        print(f"{r['mode']:<18} {r['peak_increase_bytes'] / 2**20:>10.1f} MiB {r['ratio']:>14.2f} {runs:>20} "
              f"{r['loaded_bytes'] / 2**20:>6.1f} MiB {r['seconds']:>8.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
