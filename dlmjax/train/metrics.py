"""Metrics sinks: TensorBoard event files (tensorboardX, no TensorFlow) and `metrics.jsonl`.

The training loop hands over device arrays of step s only after it has dispatched step s+1, so reading
them here (a host sync) never stalls the device: metrics are written one step late.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from tensorboardX import SummaryWriter


class MetricsWriter:
    def __init__(self, workdir: str | Path, *, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
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
