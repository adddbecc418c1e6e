"""What `dlmjax train` reports when it returns: one JSON line and an exit status.

  0    the run finished (or was already finished): `{"step": steps, "preempted": false, ...final metrics}`.
  143  stopped by SIGTERM after committing a checkpoint (`"preempted": true`); 128 + SIGTERM is what a process
       killed by SIGTERM reports, so schedulers and retry loops (`until dlmjax train ...; do :; done`, Kubernetes
       Jobs) see an unfinished run and rerun it, which resumes.
  2    the loss stopped being finite (`"stopped": "nan_loss"`, with `"nan_step"`): nothing was saved after the
       last finite step. The same status as a user error, because it is one in effect: rerunning the same command
       resumes from the last checkpoint and diverges again; change the config (a lower `optim.lr`, an
       `optim.grad_clip`) first.
"""
from __future__ import annotations

import json
import math

import jax

PREEMPTED_EXIT_STATUS = 143  # 128 + SIGTERM
DIVERGED_EXIT_STATUS = 2  # the loss became NaN or infinite
NAN_LOSS = "nan_loss"  # the result's "stopped" value when the loss diverged


def exit_status(result: dict) -> int:
    """Process exit status for a `train_and_evaluate` result (see the module docstring)."""
    if result.get("stopped") == NAN_LOSS:
        return DIVERGED_EXIT_STATUS
    return PREEMPTED_EXIT_STATUS if result.get("preempted") else 0


def print_json(result: dict) -> None:
    """The result as one line of strict JSON on stdout, from process 0 only (floats rounded to 6 digits;
    a NaN or infinite value is written as null, which every JSON reader accepts)."""
    if jax.process_count() > 1 and jax.process_index() != 0:
        return  # one result line per job, from process 0
    print(json.dumps({k: _plain(v) for k, v in result.items()}, allow_nan=False), flush=True)


def _plain(value):
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


__all__ = ["DIVERGED_EXIT_STATUS", "NAN_LOSS", "PREEMPTED_EXIT_STATUS", "exit_status", "print_json"]
