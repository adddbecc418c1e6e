"""`train_and_evaluate(config, workdir)`: the training loop.

The step is compiled before the loop; the loop never waits on the device (metrics of step s are read after
step s+1 is dispatched); checkpoints (state + data iterator + config) are written every
`checkpoint.every_steps` and at the last step.

Resume and preemption guarantees:

* Rerunning the same command resumes from the newest restorable checkpoint (an unreadable newest step is
  reported and moved aside, see `dlmjax.checkpoint`), into the shardings of the current mesh. The losses of
  the resumed steps are bitwise identical to an uninterrupted run: the grain iterator position is part of the
  checkpoint and the noise of step s is `fold_in(state.rng, s)`. This holds after SIGKILL at any moment
  (work since the last committed checkpoint is recomputed) and after SIGTERM (nothing is recomputed).
* On resume from step s, `metrics.jsonl` records of steps > s written by the interrupted run are dropped and
  TensorBoard hides them (`purge_step`): the resumed run writes them again, identical, once.
* SIGTERM (when called from the main thread): a handler sets a flag; at the next step boundary the loop stops,
  saves a checkpoint of the current step, waits for it to commit, logs `preempted`, skips the final
  evaluation and returns `{"step": s, "preempted": True, ...}`. The previous SIGTERM handler is restored on
  return. `dlmjax train` then exits with `PREEMPTED_EXIT_STATUS` (143 = 128 + SIGTERM, what a process killed
  by SIGTERM reports), so schedulers and retry loops (`until dlmjax train ...; do :; done`, Kubernetes Jobs)
  see an unfinished run and restart it instead of counting it as done. A finished run returns
  `"preempted": False` and exits 0.
* SIGTERM in a multi-process job: the signals reach the hosts at different moments (or only some hosts), so a
  per-process flag would make processes stop at different steps and hang in the checkpoint's collectives.
  There the loop asks JAX's preemption service instead (`multihost_utils.reached_preemption_sync_point`, whose
  C++ SIGTERM handler `jax.distributed.initialize` installs; no Python handler is set): a notice on any host
  is propagated to all, they agree on one step a little later, and every process stops, saves and returns
  `preempted` at that same step. The per-step check is a local read, not a collective.

Multi-process jobs (`dlmjax.distributed.maybe_initialize`, called first): every process runs this same loop on
the global mesh. Each reads the same global batch from the deterministic pipeline and hands over only the rows
its devices hold (`global_batch`); all processes write the checkpoint through orbax (one state, one data-iterator
position per process); only process 0 logs, prints the result and writes `metrics.jsonl`/TensorBoard.
Evaluation runs in every process on a host copy of the parameters. With `data.kind` corpus or sft each process
instead reads and packs its own documents (`dlmjax.data.sharded`), hands over its own `[batch / processes, L]`
rows, and the held-out NELBO is pooled over the processes' eval rows.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from dlmjax import distributed
from dlmjax.checkpoint import Checkpointer
from dlmjax.config import Config, ConfigError
from dlmjax.data.pipeline import build_data, make_eval_batches
from dlmjax.data.sharded import SHARDED_KINDS, assemble_global_batch, build_sharded_data
from dlmjax.data.store import StoreMeta, check_store
from dlmjax.data.tasks import heldout
from dlmjax.data.tokenizer import check_model_vocab, load_tokenizer
from dlmjax.evaluate import heldout_nelbo, task_exact_match
from dlmjax.models.transformer import count_params
from dlmjax.sharding import batch_sharding, make_mesh, replicated_report
from dlmjax.train.metrics import MetricsWriter
from dlmjax.train.state import init_train_state, make_optimizer, param_specs
from dlmjax.train.step import as_batch, host_batch, make_eval_step, make_train_step


def load_data(cfg: Config):
    d = cfg.data
    if d.kind in SHARDED_KINDS:  # each process reads its own documents (dlmjax.data.sharded)
        try:
            if d.kind == "packed":
                tokenizer = None
                check_store(StoreMeta.read(d.path), cfg)
            else:
                tokenizer = load_tokenizer(d.tokenizer)
                check_model_vocab(tokenizer, vocab_size=cfg.model.vocab_size, mask_id=cfg.diffusion.mask_id)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return build_sharded_data(kind=d.kind, path=d.path, fmt=d.format, tokenizer=tokenizer, seq_len=d.seq_len,
                                  batch_size=d.batch_size, seed=d.seed, block_size=cfg.diffusion.block_size,
                                  text_field=d.text_field, prompt_field=d.prompt_field,
                                  response_field=d.response_field, record_type=d.record_type, eval_size=d.eval_size,
                                  packing=d.packing)
    if d.kind == "task":
        return build_data(kind="task", task=d.task, task_kwargs=d.task_kwargs(), seq_len=d.seq_len,
                          batch_size=d.batch_size, seed=d.seed, eval_size=d.eval_size)
    return build_data(kind="text", text_path=d.text_path, seq_len=d.seq_len, batch_size=d.batch_size,
                      seed=d.seed, eval_size=d.eval_size)


def evaluate(cfg: Config, params, *, data=None, eval_step=None, n_batches=None, exact_match=True,
             show_examples=0, log=print) -> dict:
    """Held-out NELBO per token and, for tasks, exact match of the jitted sampler on `data.eval_size` problems."""
    train_ds, eval_records, tokenizer, task = data if data is not None else load_data(cfg)
    eval_step = eval_step or make_eval_step(cfg.model, cfg.diffusion)
    batches = [as_batch(b) for b in make_eval_batches(eval_records, cfg.data.batch_size)]
    if n_batches is not None:
        batches = batches[:n_batches]
    rng = jax.random.PRNGKey(cfg.train.seed + 1)
    result = heldout_nelbo(eval_step, params, batches, rng)
    if cfg.data.kind in SHARDED_KINDS and jax.process_count() > 1:
        result = _pooled_over_processes(result)  # each process held out its own rows: report all of them
    if task is not None and exact_match:
        problems = heldout(task, cfg.data.eval_size, cfg.data.seed)
        em, preds = task_exact_match(cfg, params, task, problems, tokenizer, jax.random.fold_in(rng, 7),
                                     return_predictions=True)
        result.update(em)
        for prob, pred in list(zip(problems, preds))[:show_examples]:
            mark = "ok " if task.score(pred, prob) else "BAD"
            log(f"  {mark} {prob.prompt}{pred}   (expected {prob.answer})")
    return result


def _pooled_over_processes(result: dict) -> dict:
    """The held-out NELBO over every process's eval rows: a token-weighted mean of the per-process means (one
    collective; every process calls it, with eval batch counts that may differ)."""
    nelbos = np.asarray(multihost_utils.process_allgather(np.float32(result["nelbo_per_token"])), np.float64)
    counts = np.asarray(multihost_utils.process_allgather(np.int32(result["eval_tokens"])), np.int64)
    count = int(counts.sum())
    nelbo = float((nelbos * counts).sum() / max(count, 1))
    return {**result, "nelbo_per_token": nelbo, "ppl": math.exp(min(nelbo, 50.0)), "eval_tokens": count}


PREEMPTED_EXIT_STATUS = 143  # 128 + SIGTERM: `dlmjax train` exits with this after a SIGTERM-triggered stop


def exit_status(result: dict) -> int:
    """Process exit status for a `train_and_evaluate` result: 143 if preempted (rerun to resume), else 0."""
    return PREEMPTED_EXIT_STATUS if result.get("preempted") else 0


@contextmanager
def _sigterm_flag(install: bool = True):
    """A `threading.Event` set by SIGTERM while inside the block (main thread only, and only with `install`;
    otherwise never set by a signal)."""
    flag = threading.Event()
    if not install or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def train_and_evaluate(cfg: Config, workdir: str | Path, *, log=print, show_examples: int = 5) -> dict:
    """Train (or resume) the run in `workdir`, then evaluate; returns the final metrics.

    On SIGTERM returns early with `"preempted": True` after committing a checkpoint (see the module doc).
    In a multi-process job (`dlmjax.distributed`) every process calls this; only process 0 logs.
    """
    distributed.maybe_initialize()  # before the first device use: joins the job the environment describes
    if jax.process_index() != 0:
        log = _silent  # errors still raise in every process
    # Multi-process: JAX's preemption service owns SIGTERM (see the module doc); a Python handler would replace it.
    with _sigterm_flag(install=jax.process_count() == 1) as preempt:
        return _train_and_evaluate(cfg, Path(workdir), preempt, log=log, show_examples=show_examples)


def _train_and_evaluate(cfg: Config, workdir: Path, preempt: threading.Event, *, log, show_examples) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(cfg.to_json())
    mesh = make_mesh(cfg.mesh)
    data = load_data(cfg)
    train_ds = data[0]
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    rules = cfg.mesh.rules
    state, shardings = init_train_state(cfg.model, tx, cfg.train.seed, mesh, rules)
    abstract_params, logical = param_specs(cfg.model)
    for entry in replicated_report(abstract_params, shardings.params, mesh, logical_specs=logical, rules=rules):
        log(str(entry))  # one line per parameter every device holds in full although it should not
    train_iter = iter(train_ds)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    restored, restored_state = ckpt.restore_latest(state, shardings, data_iter=train_iter)
    if restored is not None:
        state = restored_state
        log(f"resumed from step {restored} in {ckpt.directory}")
    start = int(restored or 0)
    last_saved = restored
    log(f"model: {count_params(state.params) / 1e6:.2f}M parameters; mesh: {dict(mesh.shape)}")

    bsh = batch_sharding(mesh, rules)
    step_fn = make_train_step(tx, cfg.model, cfg.diffusion, shardings, bsh, rules)
    eval_step = make_eval_step(cfg.model, cfg.diffusion)
    writer = _metrics_writer(workdir, start)
    if writer.dropped:
        log(f"metrics.jsonl: dropped {writer.dropped} records of steps after {start} (recomputed by this run)")
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len

    t0 = time.perf_counter()
    pending = None  # (step, metrics on device) of the previous step, read after the next one is dispatched
    bar = tqdm(total=cfg.train.steps, initial=start, dynamic_ncols=True,
               disable=not cfg.train.progress or jax.process_index() != 0,
               file=sys.stderr, desc="train")
    compiled = None
    multi_process = jax.process_count() > 1
    done = start  # steps completed; the data iterator has yielded exactly the batches of steps < done
    for step in range(start, cfg.train.steps):
        if preempt.is_set():
            break
        batch = global_batch(next(train_iter), bsh, per_process=cfg.data.kind in SHARDED_KINDS)
        if compiled is None:  # compile once, before timing starts
            compiled = step_fn.lower(state, batch).compile()
            t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        done = step + 1
        if multi_process and multihost_utils.reached_preemption_sync_point(done):
            preempt.set()  # every process reaches this at the same `done`: all stop and save this step
        if pending is not None:
            _report(writer, bar, *pending, t0=t0, start=start, tokens_per_step=tokens_per_step,
                    log_every=cfg.train.log_every)
        pending = (done, metrics)
        bar.update(1)
        if done % cfg.checkpoint.every_steps == 0 and done < cfg.train.steps:
            ckpt.save(done, state, data_iter=train_iter, config=cfg)
            last_saved = done
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < cfg.train.steps:
            ev = evaluate(cfg, _local_params(state.params), data=data, eval_step=eval_step,
                          n_batches=cfg.train.eval_batches, exact_match=False)
            writer.write(done, {k: v for k, v in ev.items() if k != "eval_tokens"}, prefix="eval")
    if pending is not None:
        _report(writer, bar, *pending, t0=t0, start=start, tokens_per_step=tokens_per_step, log_every=1)
    bar.close()
    train_seconds = time.perf_counter() - t0
    if done > start and last_saved != done:  # the last step, or the step at which SIGTERM stopped us
        ckpt.save(done, state, data_iter=train_iter, config=cfg, force=True)
    ckpt.wait()
    ckpt.close()

    if preempt.is_set():  # during training or before the final evaluation: stop now, a rerun resumes
        saved = f"checkpoint {done} committed in {ckpt.directory}" if done else "no step done, nothing to save"
        log(f"preempted (SIGTERM) at step {done}: {saved}; rerun the same command to resume")
        writer.close()
        return {"step": int(done), "preempted": True, "train_seconds": round(train_seconds, 2)}

    t1 = time.perf_counter()
    result = evaluate(cfg, _local_params(state.params), data=data, eval_step=eval_step,
                      show_examples=show_examples, log=log)
    result.update(step=int(cfg.train.steps), train_seconds=round(train_seconds, 2),
                  eval_seconds=round(time.perf_counter() - t1, 2), preempted=False)
    writer.write(cfg.train.steps, {k: v for k, v in result.items() if isinstance(v, (int, float))
                                   and not isinstance(v, bool) and k != "step"}, prefix="final")
    writer.close()
    return result


def _silent(message: str) -> None:
    pass


DEBUG_PROCESS_METRICS = "DLMJAX_DEBUG_PROCESS_METRICS"


def _metrics_writer(workdir: Path, start: int) -> MetricsWriter:
    """Process 0 writes `metrics.jsonl` and TensorBoard; the others nothing, unless DLMJAX_DEBUG_PROCESS_METRICS=1
    (then process p writes its own copy under `workdir/process<p>/`, to check that every process agrees)."""
    p = jax.process_index()
    if p and os.environ.get(DEBUG_PROCESS_METRICS, "") not in ("", "0"):
        return MetricsWriter(workdir / f"process{p}", enabled=True, resume_step=start)
    return MetricsWriter(workdir, enabled=p == 0, resume_step=start)


def process_rows(sharding, shape: tuple[int, ...]) -> np.ndarray:
    """Indices of the global batch rows held by this process's devices, in the order
    `jax.make_array_from_process_local_data` expects them (ascending; rows replicated on several local devices once)."""
    starts = sorted({(idx[0].start or 0, shape[0] if idx[0].stop is None else idx[0].stop)
                     for idx in sharding.addressable_devices_indices_map(shape).values()})
    return np.concatenate([np.arange(a, b) for a, b in starts])


def global_batch(batch: dict, sharding, *, per_process: bool = False) -> dict:
    """The step's `[batch, length]` arrays from the host batch every process reads.

    With several processes each one reads the same global batch from the deterministic pipeline and hands
    over only the rows its devices hold (disjoint across data-parallel processes): one global array whose
    rows are the single-process batch's rows, so a multi-process run sees the same data as a single process.
    With `per_process` (data.kind corpus/sft) `batch` is already this process's own rows (`dlmjax.data.sharded`).
    """
    host = host_batch(batch)
    if jax.process_count() == 1:
        return jax.device_put(host, sharding)  # straight to the mesh: no stop on the default device
    if per_process:
        return assemble_global_batch(host, sharding)
    rows = process_rows(sharding, np.shape(batch["tokens"]))
    return {k: jax.make_array_from_process_local_data(sharding, v[rows], v.shape) for k, v in host.items()}


def _local_params(params):
    """Parameters usable by this process's evaluation and sampler alone (a full host copy when they span
    several processes). Every process evaluates its held-out rows (the same for tasks and text; its own shard's
    for corpus/sft, pooled by `_pooled_over_processes`); only process 0 reports."""
    if jax.process_count() == 1:
        return params
    return multihost_utils.process_allgather(params, tiled=True)


def _report(writer, bar, step, metrics, *, t0, start, tokens_per_step, log_every):
    if step % log_every and step != start + 1:
        return
    values = writer.write(step, metrics)
    elapsed = max(time.perf_counter() - t0, 1e-9)
    tps = (step - start) * tokens_per_step / elapsed
    bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{tps:,.0f}")


def print_json(result: dict) -> None:
    if jax.process_count() > 1 and jax.process_index() != 0:
        return  # one result line per job, from process 0
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.items()}), flush=True)


__all__ = ["PREEMPTED_EXIT_STATUS", "evaluate", "exit_status", "load_data", "print_json", "train_and_evaluate"]
