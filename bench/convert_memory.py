"""Peak host memory of `dlmjax convert --from-hf` and of loading its output, as a multiple of the checkpoint's bytes.

    .venv/bin/python bench/convert_memory.py [--layers 12] [--d-model 768] [--mlp-hidden 2048] [--vocab 12288]
        [--repeats 3] [--modes ...] [--policies glibc mapped] [--out FILE.json]

Writes a Hugging Face folder in the released LLaDA layout (config.json + one `model.safetensors` of bfloat16
tensors under LLaDA's names, as GSAI-ML publishes them; ~104M parameters by default) into a temporary folder,
then measures each stage in a fresh subprocess:

  import             `dlmjax.interchange.import_hf`: read the safetensors and place every parameter on the device
  convert            `convert_from_hf` (what `dlmjax convert --from-hf` runs): import + write the params export
  load               `dlmjax.load` of the converted checkpoint (what `dlmjax sample` / `open_run` does first)
  convert_then_load  both in one process (a notebook that converts, then samples)

under two host-allocator policies (`dlmjax.hostmem`):

  glibc              glibc's default: the mmap threshold rises to the largest block freed so far
  mapped             `map_large_allocations()`: blocks of 1 MiB or more are mapped and unmapped on their own (what
                     the `dlmjax` command line sets for convert / sample / forward / eval)

Each subprocess imports everything, converts and loads a tiny folder the same way (so one-time library set-up is
not counted), resets the kernel's peak-RSS counter (`/proc/self/clear_refs`), records its resident memory, runs the
stage and reports `ru_maxrss - baseline` (and VmHWM, the same counter read from /proc). The ratio is that increase
over the safetensors file size. Resident memory counts the pages of a memory-mapped file that the process has
touched, so a reader that maps the file is charged for what it reads until it lets the pages go. On CPU the
"device" is host memory: the placed (or loaded) parameters themselves count, so 1.0x is the floor of every stage.
Each stage runs in `--repeats` fresh subprocesses; the median is reported with every run's ratio. Prints one JSON
object and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

MODES = ("import", "convert", "load", "convert_then_load")
POLICIES = ("glibc", "mapped")
GOAL = 1.3


def _model(layers: int, d_model: int, mlp_hidden: int, vocab: int):
    from dlmjax.config import ModelConfig

    return ModelConfig(arch="llada", vocab_size=vocab, d_model=d_model, n_layers=layers,
                       n_heads=max(d_model // 64, 1), mlp_hidden=mlp_hidden, max_seq_len=4096, rope_theta=500000.0)


def write_hf_folder(folder: Path, layers: int, d_model: int, mlp_hidden: int, vocab: int, seed: int = 0) -> dict:
    """A LLaDA-layout Hugging Face folder of bfloat16 tensors (random normal * 0.02), written tensor by tensor."""
    import ml_dtypes
    import numpy as np

    from dlmjax.interchange import llada
    from dlmjax.interchange.safetensors_io import SINGLE_FILE, write_safetensors

    cfg = _model(layers, d_model, mlp_hidden, vocab)
    meta = {"mask_id": vocab - 2, "eos_id": vocab - 3, "pad_id": vocab - 3, "bos_id": vocab - 4}
    folder.mkdir(parents=True)
    hf = llada.hf_config(cfg, meta)
    hf["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    entries = llada.entries(cfg)
    specs = [(e.hf_name, "BF16", e.hf_shape) for e in entries]
    rng = np.random.default_rng(seed)

    def tensor(name):
        shape = dict((n, s) for n, _, s in specs)[name]
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            return np.ones(shape, ml_dtypes.bfloat16)
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    write_safetensors(folder / SINGLE_FILE, specs, tensor, {"format": "pt"})
    params = sum(int(np.prod(s)) for _, _, s in specs)
    return {"params": params, "file_bytes": (folder / SINGLE_FILE).stat().st_size}


def make(root: Path, layers: int, d_model: int, mlp_hidden: int, vocab: int) -> dict:
    """The big folder, a tiny warm-up folder, and converted copies of both (for the `load` stage)."""
    from dlmjax.interchange import convert_from_hf

    out = {}
    for name, shape in (("warm", (1, 64, 128, 256)), ("big", (layers, d_model, mlp_hidden, vocab))):
        out[name] = write_hf_folder(root / name / "hf", *shape)
        convert_from_hf(root / name / "hf", "llada", root / name / "converted")
    return out


def _rss_kb(key: str = "VmRSS") -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _stage(root: Path, mode: str, scratch: Path):
    import jax

    from dlmjax.checkpoint import load
    from dlmjax.interchange import convert_from_hf, import_hf

    if mode == "import":
        _, params, _ = import_hf(root / "hf", "llada")
        jax.block_until_ready(params)
        return params
    if mode == "load":
        _, params = load(root / "converted")
        jax.block_until_ready(params)
        return params
    out = convert_from_hf(root / "hf", "llada", scratch)
    if mode == "convert":
        return None
    _, params = load(out)
    jax.block_until_ready(params)
    return params


def measure(root: Path, mode: str, policy: str) -> dict:
    import jax

    from dlmjax.hostmem import map_large_allocations

    if policy == "mapped" and not map_large_allocations():
        raise RuntimeError("map_large_allocations() had no effect here (not Linux / glibc)")
    scratch = Path(tempfile.mkdtemp(prefix="dlmjax_convert_out_"))
    try:
        warm = _stage(root / "warm", mode, scratch / "warm")
        del warm
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS counter that ru_maxrss (and VmHWM) report
            reset = True
        except OSError:
            reset = False
        baseline = _rss_kb() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        params = _stage(root / "big", mode, scratch / "big")
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        hwm = _rss_kb("VmHWM")
        leaves = jax.tree.leaves(params) if params is not None else []
        return {"mode": mode, "policy": policy, "peak_increase_bytes": (peak - baseline) * 1024,
                "vmhwm_increase_bytes": (hwm - baseline) * 1024, "seconds": round(seconds, 3),
                "dtypes": sorted({str(x.dtype) for x in leaves}), "held_bytes": sum(x.nbytes for x in leaves),
                "peak_counter_reset": reset}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--mlp-hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=12288)
    p.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per stage (the median is reported)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--out", help="also write the JSON result here")
    p.add_argument("--_make", help=argparse.SUPPRESS)
    p.add_argument("--_measure", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = ["--layers", str(args.layers), "--d-model", str(args.d_model), "--mlp-hidden", str(args.mlp_hidden),
             "--vocab", str(args.vocab)]
    if args._make:
        print(json.dumps(make(Path(args._make), args.layers, args.d_model, args.mlp_hidden, args.vocab)))
        return {}
    if args._measure:
        print(json.dumps(measure(Path(args._measure[0]), args._measure[1], args._measure[2])))
        return {}

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with tempfile.TemporaryDirectory(prefix="dlmjax_convert_memory_") as tmp:
        def child(*extra):
            proc = subprocess.run([sys.executable, __file__, *shape, *extra], capture_output=True, text=True,
                                  env=env, check=False)
            if proc.returncode:
                raise RuntimeError(f"{extra}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
            return json.loads(proc.stdout.strip().splitlines()[-1])

        sizes = child("--_make", tmp)["big"]
        rows = []
        for policy in args.policies:
            for mode in args.modes:
                runs = sorted((child("--_measure", tmp, mode, policy) for _ in range(args.repeats)),
                              key=lambda r: r["peak_increase_bytes"])
                ratios = [round(r["peak_increase_bytes"] / sizes["file_bytes"], 3) for r in runs]
                rows.append({**runs[len(runs) // 2], "ratio": ratios[len(runs) // 2], "ratio_runs": ratios})
    result = {"model": {"layers": args.layers, "d_model": args.d_model, "mlp_hidden": args.mlp_hidden,
                        "vocab": args.vocab, "dtype": "bfloat16"},
              "params": sizes["params"], "file_bytes": sizes["file_bytes"], "goal_ratio": GOAL, "rows": rows,
              "jax": __import__("jax").__version__, "orbax": __import__("orbax.checkpoint").checkpoint.__version__}
    print(json.dumps(result))
    print(f"\n{sizes['params'] / 1e6:.1f}M parameters, model.safetensors {sizes['file_bytes'] / 2**20:.1f} MiB (bf16)")
    print(f"{'policy':<7} {'stage':<18} {'peak increase':>14} {'x file bytes':>13} {'(all runs)':>20} {'held':>10} "
          f"{'seconds':>8}")
    for r in rows:
        runs = "/".join(f"{x:.2f}" for x in r["ratio_runs"])
        print(f"{r['policy']:<7} {r['mode']:<18} {r['peak_increase_bytes'] / 2**20:>10.1f} MiB {r['ratio']:>13.2f} "
              f"{runs:>20} {r['held_bytes'] / 2**20:>6.1f} MiB {r['seconds']:>8.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
