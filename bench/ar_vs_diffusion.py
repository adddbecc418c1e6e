"""AR vs block diffusion vs D2F on the sort task: exact match against generation speed, side by side, one run.

    .venv/bin/python bench/ar_vs_diffusion.py --ar RUN --block RUN [--d2f RUN] [--problems 512] [--batch 64]
        [--repeats 3] [--out bench/ar_vs_diffusion.json] [--plot bench/ar_vs_diffusion.png]

Each RUN is a training workdir of the same task, model size and step budget (configs/sort_ar.yaml,
configs/sort_bd.yaml, configs/sort_d2f.yaml). Every sampler setting decodes the same held-out problems
(`dlmjax.data.tasks.heldout`, the run's data seed) greedily, twice: at batch 1 (one problem per request, every
request the same shapes, so nothing recompiles: the count of compiles during timing is reported and must be 0)
and at `--batch` (default 64). Settings:
  AR           the AR run with the block sampler at block 1 and fused commits: one forward per generated token.
  block        the block-diffusion run with the exact-cache block sampler (fused commits): one commit per step (the
               baseline), Fast-dLLM's threshold rule over a sweep of thresholds and its factor rule over a sweep
               of factors.
  D2F          the D2F run with the pipelined sampler (`generate_pipelined`) over skip thresholds and window sizes,
               when the sampler exists and --d2f is given.
Columns (ALGORITHMS §6.4): device, batch, block length, rule, exact match, NFE (forward passes per request, mean),
tokens per forward (generated tokens before EOS per row, over NFE per request), generated tokens/s (tokens before
EOS summed over all problems, over the wall time of the whole requests, each ended by `block_until_ready`; every
program is compiled and run once before timing; the fastest of --repeats passes, which are interleaved across
settings), ms per forward, speedup over AR at the same batch. A setting is on the accuracy-speed frontier at its batch size when no other setting has at least its exact
match and at least its tokens/s, better in one. The "target" entry checks the issue's bar: at batch 1, a diffusion
setting with exact match within 1 point of AR's, >= 2.5x AR's tokens/s and >= 3 tokens per forward.

Prints one JSON line per measurement and a table; writes --out (JSON) and --plot (PNG, needs matplotlib), refusing
to overwrite either (exit 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

# The bar ("Done when"): at exact match within this of AR's, this many times AR's tokens/s at batch 1,
# committing at least this many tokens per forward.
TARGET_EXACT_GAP = 0.01
TARGET_SPEEDUP = 2.5
TARGET_TOKENS_PER_FORWARD = 3.0

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
FACTORS = (0.5, 1.0, 2.0)
V2_SUB_BLOCKS = (2, 4)  # Fast-dLLM v2's sub-block lengths (they divide the block of 8)
V2_THRESHOLD = 0.9  # its demo's threshold
D2F_SKIP_THRESHOLDS = (0.7, 0.9, 0.95)
D2F_WINDOWS = (2, 4)


# ---- sampler settings as small strategies -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockDecoding:
    """The exact-cache block sampler (`generate_blocks`, fused commits) with one commit rule.

    rule: "one_per_step" (LLaDA's transfer table with L' steps: one slot per forward), "threshold" or "factor"
    (Fast-dLLM's parallel rules with `value`), or "v2" (Fast-dLLM v2's sub-block decoding: sub-blocks of `value`
    slots, left to right, each by the threshold rule at V2_THRESHOLD)."""

    rule: str = "one_per_step"
    value: float | None = None

    def settings(self, max_length: int, block_length: int, tokens):
        from dlmjax.sampling.settings import BlockSamplerSettings  # noqa: PLC0415

        if self.rule == "v2":
            return BlockSamplerSettings.v2(max_length=max_length, block_length=block_length, tokens=tokens,
                                           sub_block_length=int(self.value), threshold=V2_THRESHOLD)
        rule = {self.rule: self.value} if self.rule in ("threshold", "factor") else {}
        return BlockSamplerSettings.bd3(max_length=max_length, block_length=block_length, tokens=tokens,
                                        fuse_commits=True, **rule)

    def program(self) -> Callable:
        from dlmjax.sampling import generate_blocks  # noqa: PLC0415

        return generate_blocks

    @property
    def sampler(self) -> str:
        return "block_fused"

    @property
    def label(self) -> str:
        if self.rule == "v2":
            return f"v2 sub-block {int(self.value)}"
        return self.rule if self.value is None else f"{self.rule}={self.value:g}"


@dataclasses.dataclass(frozen=True)
class PipelinedDecoding:
    """D2F's pipelined sampler (`dlmjax.sampling.pipeline.generate_pipelined`): `window_blocks` blocks per forward,
    commits above `skip_threshold`, the other two thresholds at D2F's defaults."""

    skip_threshold: float = 0.9
    window_blocks: int = 3

    def settings(self, max_length: int, block_length: int, tokens):
        from dlmjax.sampling.pipeline import PipelineSettings  # noqa: PLC0415

        return PipelineSettings.d2f(max_length=max_length, block_length=block_length,
                                    window_blocks=self.window_blocks, skip_threshold=self.skip_threshold,
                                    mask_id=tokens.mask_id, eos_id=tokens.eos_id, pad_id=tokens.pad_id)

    def program(self) -> Callable:
        from dlmjax.sampling.pipeline import generate_pipelined  # noqa: PLC0415

        return generate_pipelined

    @property
    def sampler(self) -> str:
        return "d2f_pipelined"

    @property
    def label(self) -> str:
        return f"skip={self.skip_threshold:g} window={self.window_blocks}"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of the comparison: which run (`ar`, `block`, `d2f`) decodes with which strategy."""

    run: str
    decoding: BlockDecoding | PipelinedDecoding

    @property
    def name(self) -> str:
        return f"{self.run} {self.decoding.label}"


def default_settings(with_d2f: bool) -> list[Setting]:
    """AR first (the reference every speedup is over), then the block run's sweep, then D2F's."""
    settings = [Setting("ar", BlockDecoding())]
    settings.append(Setting("block", BlockDecoding()))
    settings += [Setting("block", BlockDecoding("threshold", t)) for t in THRESHOLDS]
    settings += [Setting("block", BlockDecoding("factor", f)) for f in FACTORS]
    settings += [Setting("block", BlockDecoding("v2", n)) for n in V2_SUB_BLOCKS]
    if with_d2f:
        settings += [Setting("d2f", PipelinedDecoding(s, w)) for w in D2F_WINDOWS for s in D2F_SKIP_THRESHOLDS]
    return settings


def pipeline_available() -> bool:
    """True once `dlmjax.sampling.pipeline` (D2F decoding) exists in this tree."""
    try:
        from dlmjax.sampling.pipeline import PipelineSettings, generate_pipelined  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


# ---- pure summaries ------------------------------------------------------------------------------------------


def frontier(points: list[tuple[float, float]]) -> list[bool]:
    """For (exact match, tokens/s) points: True where no other point is >= in both and > in one (not dominated)."""
    def dominated(i: int) -> bool:
        a = points[i]
        return any(b[0] >= a[0] and b[1] >= a[1] and b != a for j, b in enumerate(points) if j != i)

    return [not dominated(i) for i in range(len(points))]


def tokens_before_eos_per_row(generated: np.ndarray, eos_id: int) -> np.ndarray:
    """int[B]: generated slots before each row's first EOS (all of them if it has none)."""
    is_eos = generated == eos_id
    return np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), generated.shape[1])


def summarize(*, correct: list[bool], tokens: int, nfe_per_request: list[int], seconds: float, rows: int) -> dict:
    """The measured numbers of one (setting, batch): `tokens` before EOS over `rows` problems, answered by
    `len(nfe_per_request)` requests taking `seconds` of wall time in all."""
    nfe = float(np.mean(nfe_per_request))
    return {"exact_match": float(np.mean(correct)), "problems": rows, "requests": len(nfe_per_request),
            "nfe": round(nfe, 3), "tokens": int(tokens), "tokens_per_row": round(tokens / rows, 3),
            "tokens_per_forward": round(tokens / rows / nfe, 3), "seconds": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 1),
            "ms_per_forward": round(1000 * seconds / float(np.sum(nfe_per_request)), 4)}


def mark(rows: list[dict]) -> None:
    """Adds `speedup` (over the AR row of the same batch) and `frontier` (per batch) to every row, in place."""
    for batch in sorted({r["batch"] for r in rows}):
        group = [r for r in rows if r["batch"] == batch]
        ar = next((r for r in group if r["run"] == "ar"), None)
        for r, on in zip(group, frontier([(r["exact_match"], r["tokens_per_s"]) for r in group])):
            r["frontier"] = on
            r["speedup"] = round(r["tokens_per_s"] / ar["tokens_per_s"], 3) if ar else None


def target(rows: list[dict]) -> dict:
    """The issue's bar at batch 1: the fastest diffusion row within TARGET_EXACT_GAP of AR's exact match, and
    whether it reaches TARGET_SPEEDUP and TARGET_TOKENS_PER_FORWARD; also that setting's batch-`B` numbers."""
    at1 = [r for r in rows if r["batch"] == 1]
    ar = next(r for r in at1 if r["run"] == "ar")
    eligible = [r for r in at1 if r["run"] != "ar" and r["exact_match"] >= ar["exact_match"] - TARGET_EXACT_GAP - 1e-9]
    out = {"ar_exact_match": ar["exact_match"], "ar_tokens_per_s": ar["tokens_per_s"],
           "exact_gap": TARGET_EXACT_GAP, "speedup_needed": TARGET_SPEEDUP,
           "tokens_per_forward_needed": TARGET_TOKENS_PER_FORWARD}
    if not eligible:
        return {**out, "best": None, "met": False}
    best = max(eligible, key=lambda r: r["tokens_per_s"])
    batched = {r["batch"]: {k: r[k] for k in ("exact_match", "tokens_per_s", "speedup", "tokens_per_forward")}
               for r in rows if r["setting"] == best["setting"] and r["batch"] != 1}
    met = best["speedup"] >= TARGET_SPEEDUP and best["tokens_per_forward"] >= TARGET_TOKENS_PER_FORWARD
    return {**out, "best": best["setting"], "best_exact_match": best["exact_match"],
            "best_tokens_per_s": best["tokens_per_s"], "best_speedup": best["speedup"],
            "best_tokens_per_forward": best["tokens_per_forward"], "at_batch": batched, "met": bool(met)}


def refuse_existing(paths: list[str | None]) -> str | None:
    """A one-line message if one of `paths` exists (the bench never overwrites a result), else None."""
    for path in paths:
        if path and os.path.exists(path):
            return f"{path} exists; move it away or give another path (results are never overwritten)"
    return None


# ---- measurement ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Measurement:
    """One (setting, batch) ready to time: its compiled sampler and its requests.

    `requests` hold `batch` rows each; the last one is padded with repeats of its last prompt, which are decoded
    and timed but not counted."""

    setting: Setting
    run: Any
    task: Any
    problems: list
    batch: int
    fn: Callable = None
    args: tuple = ()
    requests: list = dataclasses.field(default_factory=list)
    width: int = 0
    times: list = dataclasses.field(default_factory=list)
    generated: np.ndarray | None = None
    nfes: list | None = None
    compiles: int = 0

    def prepare(self) -> "Measurement":
        """Builds the requests and runs the first one (compiling the sampler; never timed)."""
        import jax  # noqa: PLC0415

        from dlmjax.sampling import Denoiser  # noqa: PLC0415

        cfg = self.run.config
        prompts = np.asarray([self.run.encode(p.prompt) for p in self.problems], np.int32)  # [N, W]: one width
        self.width = prompts.shape[1]
        settings = self.setting.decoding.settings(cfg.data.seq_len, cfg.diffusion.block_size or cfg.data.seq_len,
                                                  self.run.tokens)
        self.fn = self.setting.decoding.program()
        self.args = (Denoiser(cfg.model), settings, jax.random.PRNGKey(0))
        for start in range(0, len(prompts), self.batch):
            chunk = prompts[start:start + self.batch]
            pad = self.batch - len(chunk)
            self.requests.append((len(chunk), np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
                                  if pad else chunk))
        self._call(self.requests[0][1])
        return self

    def _call(self, prompt):
        import jax  # noqa: PLC0415

        denoiser, settings, rng = self.args
        tokens, nfe = self.fn(denoiser, self.run.params, prompt, settings, rng)
        jax.block_until_ready(tokens)
        return tokens, nfe

    def time_once(self) -> None:
        """One timed pass over all requests: the wall time of each whole request, summed. Greedy decoding must
        give the same tokens and NFE on every pass."""
        before = self.fn._cache_size()
        seconds, outs, nfes = 0.0, [], []
        for real, prompt in self.requests:
            t0 = time.perf_counter()
            tokens, nfe = self._call(prompt)
            seconds += time.perf_counter() - t0
            outs.append(np.asarray(tokens)[:real, self.width:])
            nfes.append(int(nfe))
        self.compiles += self.fn._cache_size() - before
        out = np.concatenate(outs)
        if self.generated is not None:
            assert np.array_equal(out, self.generated) and nfes == self.nfes, "greedy decoding differs across passes"
        self.generated, self.nfes = out, nfes
        self.times.append(seconds)

    def result(self) -> dict:
        """`summarize` of the passes so far: the fastest pass's time (timeit's convention: other processes on the
        machine only ever add time), plus `compiles_while_timing` (must be 0)."""
        eos = self.run.tokens.eos_id
        counts = tokens_before_eos_per_row(self.generated, eos)
        correct = [self.task.score(self.run.decode(row[:n].tolist()), p)
                   for row, n, p in zip(self.generated, counts, self.problems)]
        out = summarize(correct=correct, tokens=int(counts.sum()), nfe_per_request=self.nfes,
                        seconds=min(self.times), rows=len(self.problems))
        return {**out, "passes": len(self.times), "seconds_median": round(statistics.median(self.times), 4),
                "compiles_while_timing": self.compiles}


def measure(setting: Setting, run, task, problems, batch: int, repeats: int) -> dict:
    """One (setting, batch) on its own: compile, `repeats` timed passes, its numbers."""
    m = Measurement(setting, run, task, problems, batch).prepare()
    for _ in range(repeats):
        m.time_once()
    return m.result()


def run_bench(runs: dict[str, Any], settings: list[Setting], problems, task, batches: list[int], repeats: int,
              progress: bool = True) -> list[dict]:
    """Every setting at every batch size; one row each. All programs are compiled first; then each of the
    `repeats` rounds times every (setting, batch) once, in turn, so that load from other processes falls on all
    settings alike rather than on whichever ran during it."""
    import jax  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    device = jax.devices()[0]
    jobs = [(s, b) for s in settings for b in batches]
    measurements = []
    bar = tqdm(jobs, desc="compile", disable=not progress)
    for setting, batch in bar:
        bar.set_postfix_str(f"{setting.name} batch {batch}")
        measurements.append(Measurement(setting, runs[setting.run], task, problems, batch).prepare())
    for round_ in range(repeats):
        bar = tqdm(measurements, desc=f"time {round_ + 1}/{repeats}", disable=not progress)
        for m in bar:
            bar.set_postfix_str(f"{m.setting.name} batch {m.batch}")
            m.time_once()
    rows = []
    for m in measurements:
        cfg = m.run.config
        row = {"bench": "ar_vs_diffusion", "setting": m.setting.name, "run": m.setting.run,
               "workdir": str(m.run.path), "device": f"{device.platform}:{device.device_kind}",
               "cpu": platform.processor() or platform.machine(), "batch": m.batch,
               "sampler": m.setting.decoding.sampler, "block_length": cfg.diffusion.block_size or cfg.data.seq_len,
               "rule": m.setting.decoding.label, "objective": cfg.diffusion.objective,
               "context": getattr(cfg.diffusion, "context", "clean"), **m.result()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    mark(rows)
    return rows


# ---- output --------------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    head = (f"{'setting':32s} {'batch':>5s} {'block':>5s} {'exact':>6s} {'NFE':>7s} {'tok/fwd':>7s} {'tok/s':>9s} "
            f"{'ms/fwd':>7s} {'x AR':>6s} {'front':>5s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['setting']:32s} {r['batch']:5d} {r['block_length']:5d} {r['exact_match']:6.3f} "
                     f"{r['nfe']:7.2f} {r['tokens_per_forward']:7.2f} {r['tokens_per_s']:9.1f} "
                     f"{r['ms_per_forward']:7.3f} {r['speedup'] or 0:6.2f} {'*' if r['frontier'] else '':>5s}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, batch: int = 1) -> None:
    """Exact match against tokens/s at `batch`: every setting, AR marked, the frontier joined by a line."""
    import matplotlib  # noqa: PLC0415 (an optional extra: only this function needs it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    group = [r for r in rows if r["batch"] == batch]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"ar": ("*", "black", "AR (block 1)"), "block": ("o", "tab:blue", "block diffusion"),
              "d2f": ("s", "tab:orange", "D2F pipelined")}
    for run, (marker, color, label) in styles.items():
        pts = [r for r in group if r["run"] == run]
        if pts:
            ax.scatter([r["tokens_per_s"] for r in pts], [100 * r["exact_match"] for r in pts], marker=marker,
                       color=color, s=140 if run == "ar" else 40, label=label, zorder=3)
    front = sorted((r for r in group if r["frontier"]), key=lambda r: r["tokens_per_s"])
    ax.plot([r["tokens_per_s"] for r in front], [100 * r["exact_match"] for r in front], "--", color="gray",
            label="frontier", zorder=2)
    for r in front:
        ax.annotate(r["rule"], (r["tokens_per_s"], 100 * r["exact_match"]), fontsize=7, xytext=(4, -10),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"generated tokens/s (batch {batch}, before EOS, compile excluded)")
    ax.set_ylabel("exact match (%)")
    ax.set_title("sort 24 digits: accuracy vs speed")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ar", required=True, help="workdir of the AR run (configs/sort_ar.yaml)")
    ap.add_argument("--block", required=True, help="workdir of the block-diffusion run (configs/sort_bd.yaml)")
    ap.add_argument("--d2f", help="workdir of the D2F run (configs/sort_d2f.yaml)")
    ap.add_argument("--problems", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64, help="the batched size measured besides batch 1")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the problems; the fastest is kept")
    ap.add_argument("--out", help="JSON file to write (refused if it exists)")
    ap.add_argument("--plot", help="PNG file to write (refused if it exists; needs matplotlib)")
    a = ap.parse_args(argv)
    refused = refuse_existing([a.out, a.plot])
    if refused:
        print(refused, file=sys.stderr)
        return 2
    for flag, value in (("--problems", a.problems), ("--batch", a.batch), ("--repeats", a.repeats)):
        if value < 1:
            print(f"{flag}={value} must be >= 1", file=sys.stderr)
            return 2
    with_d2f = bool(a.d2f)
    if with_d2f and not pipeline_available():
        print("--d2f given but dlmjax.sampling.pipeline (D2F decoding) is not in this tree", file=sys.stderr)
        return 2

    from dlmjax.data.tasks import get_task, heldout  # noqa: PLC0415
    from dlmjax.inference import open_run  # noqa: PLC0415

    paths = {"ar": a.ar, "block": a.block, **({"d2f": a.d2f} if with_d2f else {})}
    runs = {name: open_run(path) for name, path in paths.items()}
    data = runs["ar"].config.data
    for name, run in runs.items():
        d = run.config.data
        if (d.task, d.task_kwargs(), d.seq_len, d.seed) != (data.task, data.task_kwargs(), data.seq_len, data.seed):
            print(f"--{name} {paths[name]} trains data.task={d.task} {d.task_kwargs()} seq_len={d.seq_len} "
                  f"seed={d.seed}; --ar has {data.task} {data.task_kwargs()} seq_len={data.seq_len} seed={data.seed}: "
                  "compare runs of the same data", file=sys.stderr)
            return 2
    task = get_task(data.task, **data.task_kwargs())
    problems = heldout(task, a.problems, data.seed)
    rows = run_bench(runs, default_settings(with_d2f), problems, task, sorted({1, a.batch}), a.repeats)
    summary = target(rows)
    print()
    print(table(rows))
    print(json.dumps({"target": summary}))
    if a.out:
        result = {"bench": "ar_vs_diffusion", "command": " ".join(sys.argv), "runs": paths,
                  "problems": a.problems, "repeats": a.repeats, "target": summary, "rows": rows}
        with open(a.out, "x") as f:
            json.dump(result, f, indent=1)
    if a.plot:
        plot(rows, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
