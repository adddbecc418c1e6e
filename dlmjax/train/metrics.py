"""Metrics sinks: TensorBoard event files (tensorboardX, no TensorFlow) and `metrics.jsonl`.

The training loop hands over device arrays of step s only after it has dispatched step s+1, so reading
them here (a host sync) never stalls the device: metrics are written one step late.

On resume from step s (`resume_step=s`) records of steps > s left by the interrupted run are dropped from
`metrics.jsonl` (rewritten atomically) and hidden in TensorBoard (`purge_step=s+1`): the resumed run
recomputes those steps bit for bit, so after a resume each step has exactly one record.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import numpy as np
from tensorboardX import SummaryWriter


class MetricsWriter:
    def __init__(self, workdir: str | Path, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self.dropped = 0  # stale records removed on resume
        self._tb = None
        if enabled:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                self.dropped = drop_records_after(self.path, resume_step)
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=purge)
            self._jsonl = open(self.path, "a")

    def write(self, step: int, metrics: dict, *, prefix: str = "train") -> dict:
        """Fetch (host sync) and record scalar metrics; returns them as Python floats."""
        values = {k: float(np.asarray(jax.device_get(v))) for k, v in metrics.items()}
        if self.enabled:
            for k, v in values.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, step)
            self._jsonl.write(json.dumps({"step": step, "split": prefix, "time": time.time(), **values}) + "\n")
            self._jsonl.flush()
        return values

    def close(self):
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


DEBUG_PROCESS_METRICS = "DLMJAX_DEBUG_PROCESS_METRICS"


def process_metrics_writer(workdir: str | Path, resume_step: int) -> MetricsWriter:
    """Process 0 writes `metrics.jsonl` and TensorBoard; the others nothing, unless DLMJAX_DEBUG_PROCESS_METRICS=1
    (then process p writes its own copy under `workdir/process<p>/`, to check that every process agrees)."""
    p = jax.process_index()
    if p and os.environ.get(DEBUG_PROCESS_METRICS, "") not in ("", "0"):
        return MetricsWriter(Path(workdir) / f"process{p}", enabled=True, resume_step=resume_step)
    return MetricsWriter(workdir, enabled=p == 0, resume_step=resume_step)


def drop_records_after(path: Path, step: int) -> int:
    """Keep only the records of steps <= `step` in a metrics.jsonl (atomic rewrite); returns how many went.

    A torn last line (a process killed mid-write) is dropped too.
    """
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            ok = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            keep.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)
    return dropped
