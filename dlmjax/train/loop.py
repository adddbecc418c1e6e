"""`train_and_evaluate(config, workdir)`: the training loop.

The step is compiled before the loop; the loop never waits on the device (metrics of step s are read after
step s+1 is dispatched); checkpoints (state + data iterator + config) are written every
`checkpoint.every_steps` and at the last step. The data comes from `dlmjax.data.load_data`, batches are placed
by `dlmjax.sharding.global_batch`, evaluation is `dlmjax.evaluate`, SIGTERM is `dlmjax.train.preemption`, the
run directory (lock, atomic files) is `dlmjax.train.workdir`, and what the command line prints is
`dlmjax.train.result`.

Before any work: the config's vocabulary is checked against the tokenizer (`dlmjax.data.data_tokenizer`), the
mesh against the devices, the run directory is locked (one trainer per workdir) and checked writable. Nothing in
the workdir is written before the checkpoint restored: a resume that is refused (say the model config changed)
leaves every file as it was, `config.json` included. The first line the run logs (`workdir: DIR`) comes only after
all of these checks and the restore, so a refused run reports its one error line and nothing else.

Adaptation (`dlmjax.train.adapt`): a run with `train.init_from` and no checkpoint of its own starts its parameters
from that checkpoint (checked before any data is read); a run that has checkpoints resumes from them and ignores
it. With `diffusion.block_schedule` the step of each block size is compiled before the loop and step s runs the
one of `adapt.block_size_at(diffusion, s)`; every step reports the block size it trained with (`block_size`).

Resume and preemption guarantees:

* Rerunning the same command resumes from the newest restorable checkpoint (an unreadable newest step is
  reported and moved aside, see `dlmjax.checkpoint`), into the shardings of the current mesh. The losses of
  the resumed steps are bitwise identical to an uninterrupted run: the grain iterator position is part of the
  checkpoint and the noise of step s is `fold_in(state.rng, s)`. This holds after SIGKILL at any moment
  (work since the last committed checkpoint is recomputed) and after SIGTERM (nothing is recomputed).
* On resume from step s, `metrics.jsonl` records of steps > s written by the interrupted run are dropped and
  TensorBoard hides them (`purge_step`): the resumed run writes them again, identical, once.
* SIGTERM: at the next step boundary the loop stops, saves a checkpoint of the current step, waits for it to
  commit, logs `preempted`, skips the final evaluation and returns `{"step": s, "preempted": True, ...}`;
  `dlmjax train` then exits with 143 (`dlmjax.train.result`). In a multi-process job every process stops at the
  same step (`dlmjax.train.preemption`). A finished run returns `"preempted": False` and exits 0.
* A loss (or gradient norm) that is NaN or infinite stops the run: the first such step is tracked on the device
  (no extra host sync) and read where the loop syncs anyway (the logged metrics, one step late; before a
  checkpoint or an evaluation). No checkpoint is written from that step on, so the last one saved holds finite
  parameters; the run logs the step and returns `{"stopped": "nan_loss", "nan_step": s, ...}` (exit status 2).

Multi-process jobs (`dlmjax.distributed.maybe_initialize`, called first): every process runs this same loop on
the global mesh. Each reads the same global batch from the deterministic pipeline and hands over only the rows
its devices hold; all processes write the checkpoint through orbax (one state, one data-iterator position per
process); only process 0 logs, prints the result and writes `metrics.jsonl`/TensorBoard. Evaluation runs in
every process on a host copy of the parameters. With `data.kind` corpus, sft or packed each process instead
reads its own rows (`dlmjax.data.sharded`), hands over its own `[batch / processes, L]` rows, and the held-out
NELBO is pooled over the processes' eval rows.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dlmjax import distributed
from dlmjax.checkpoint import Checkpointer
from dlmjax.checkpoint.run import storage_errors
from dlmjax.config import Config
from dlmjax.data.build import data_tokenizer, load_data, per_process
from dlmjax.evaluate import evaluate, params_for_evaluation
from dlmjax.models.transformer import count_params
from dlmjax.sharding import batch_sharding, global_batch, make_mesh, replicated_report
from dlmjax.train.adapt import block_size_at, block_sizes, check_init_from, diffusion_at, load_init_params
from dlmjax.train.metrics import process_metrics_writer
from dlmjax.train.preemption import Preemption, watch_preemption
from dlmjax.train.result import NAN_LOSS
from dlmjax.train.state import (abstract_train_state, init_train_state, init_train_state_from, make_optimizer,
                                param_specs)
from dlmjax.train.step import host_batch, make_eval_step, make_train_step
from dlmjax.train.workdir import check_free_space, check_resumable, check_writable, lock_workdir, write_run_files


def train_and_evaluate(cfg: Config, workdir: str | Path, *, log=print, show_examples: int = 5) -> dict:
    """Train (or resume) the run in `workdir`, then evaluate; returns the final metrics.

    On SIGTERM returns early with `"preempted": True` after committing a checkpoint, on a non-finite loss with
    `"stopped": "nan_loss"` (see the module doc). In a multi-process job (`dlmjax.distributed`) every process
    calls this; only process 0 logs.
    """
    distributed.maybe_initialize()  # before the first device use: joins the job the environment describes
    if jax.process_index() != 0:
        log = _silent  # errors still raise in every process
    tokenizer = data_tokenizer(cfg)  # the vocabulary checked before anything is read or written
    mesh = make_mesh(cfg.mesh)
    with lock_workdir(workdir) as workdir, watch_preemption() as preempt:
        check_writable(workdir, workdir / "checkpoints")
        with storage_errors(f"the run directory {workdir}", after="the run stopped, and its last committed "
                            "checkpoint is intact; rerun to resume from it once the disk can take the writes"):
            return _train_and_evaluate(cfg, workdir, mesh, tokenizer, preempt, log=log, show_examples=show_examples)


def _train_and_evaluate(cfg: Config, workdir: Path, mesh, tokenizer, preempt: Preemption, *, log,
                        show_examples) -> dict:
    # train.init_from is checked (and later read) only for a run with nothing to resume: a resume ignores it.
    resuming = _has_checkpoint(workdir / "checkpoints")
    source = check_init_from(cfg) if cfg.train.init_from and not resuming else None
    data = load_data(cfg, tokenizer)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    rules = cfg.mesh.rules
    like, shardings = abstract_train_state(cfg.model, tx, mesh, rules)  # the restore target: nothing allocated
    train_iter = iter(data.train)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    check_resumable(ckpt, cfg, like, mesh)
    restored, state = ckpt.restore_latest(like, shardings, data_iter=train_iter)
    if restored is None and source is not None:
        params = load_init_params(source, cfg, mesh, shardings.params)
        state = init_train_state_from(params, tx, cfg.train.seed, shardings)
    elif restored is None:
        state, _ = init_train_state(cfg.model, tx, cfg.train.seed, mesh, rules)
    # The first line a run prints, once every check has passed: a refused run prints its one error line only.
    log(f"workdir: {workdir}")
    abstract_params, logical = param_specs(cfg.model)
    for entry in replicated_report(abstract_params, shardings.params, mesh, logical_specs=logical, rules=rules):
        log(str(entry))  # one line per parameter every device holds in full although it should not
    if restored is not None:
        log(f"resumed from step {restored} in {ckpt.directory}")
        if cfg.train.init_from:
            log("train.init_from ignored: the run resumes from its own checkpoint")
    elif source is not None:
        log(f"parameters from {source.path} ({source.kind}); optimizer state and step start fresh")
    write_run_files(workdir, cfg)  # only now: a refused resume has changed nothing
    start = int(restored or 0)
    last_saved = restored
    log(f"model: {count_params(state.params) / 1e6:.2f}M parameters; mesh: {dict(mesh.shape)}")

    bsh = batch_sharding(mesh, rules)
    # One train step per block size the remaining steps use (diffusion.block_schedule; without one, a single step).
    step_fns = {size: make_train_step(tx, cfg.model, diffusion_at(cfg.diffusion, size), shardings, bsh, rules)
                for size in block_sizes(cfg.diffusion, start, cfg.train.steps)}
    if cfg.diffusion.block_schedule:
        log("block schedule: " + ", ".join(f"steps < {u}: block {b}" for u, b in cfg.diffusion.block_schedule))
    eval_step = make_eval_step(cfg.model, cfg.diffusion)
    writer = process_metrics_writer(workdir, start)
    if writer.dropped:
        log(f"metrics.jsonl: dropped {writer.dropped} records of steps after {start} (recomputed by this run)")
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    state_bytes = _local_bytes(state)
    eval_data = (data.eval_records, data.tokenizer, data.task)

    t0 = time.perf_counter()
    pending = None  # (step, metrics, first bad step) on device of the previous step, read after the next dispatch
    bar = tqdm(total=cfg.train.steps, initial=start, dynamic_ncols=True,
               disable=not cfg.train.progress or jax.process_index() != 0,
               file=sys.stderr, desc="train")
    compiled = None
    bad = np.int32(-1)  # on device after the first step: the first step whose loss was not finite, or -1
    nan_step = None  # that step, once read on the host
    done = start  # steps completed; the data iterator has yielded exactly the batches of steps < done
    for step in range(start, cfg.train.steps):
        if preempt.requested:
            break
        batch = global_batch(host_batch(next(train_iter)), bsh, per_process=per_process(cfg))
        if compiled is None:  # compile every block size's step once, before timing starts
            compiled = {size: fn.lower(state, batch).compile() for size, fn in step_fns.items()}
            t0 = time.perf_counter()
        state, metrics = compiled[block_size_at(cfg.diffusion, step)](state, batch)
        done = step + 1
        bad = _first_nonfinite(bad, metrics["loss"], metrics["grad_norm"], done)
        preempt.after_step(done)
        if pending is not None and _is_log_step(pending[0], start, cfg.train.log_every):
            _report(writer, bar, *pending[:2], t0=t0, start=start, tokens_per_step=tokens_per_step)
            nan_step = _read_step(pending[2])  # synced one step late, like the metrics
        pending = (done, metrics, bad)
        bar.update(1)
        if nan_step is not None:
            break
        save = done % cfg.checkpoint.every_steps == 0 and done < cfg.train.steps
        periodic_eval = bool(cfg.train.eval_every) and done % cfg.train.eval_every == 0 and done < cfg.train.steps
        if (save or periodic_eval) and (nan_step := _read_step(bad)) is not None:
            break  # never save (or evaluate) parameters a non-finite step has touched
        if save:
            check_free_space(ckpt.directory, state_bytes)
            ckpt.save(done, state, data_iter=train_iter, config=cfg)
            last_saved = done
        if periodic_eval:
            ev = evaluate(cfg, params_for_evaluation(state.params), eval_data, eval_step=eval_step,
                          n_batches=cfg.train.eval_batches, exact_match=False)
            writer.write(done, {k: v for k, v in ev.items() if k != "eval_tokens"}, prefix="eval")
    if pending is not None:
        _report(writer, bar, *pending[:2], t0=t0, start=start, tokens_per_step=tokens_per_step)
    bar.close()
    train_seconds = time.perf_counter() - t0
    if nan_step is None and done > start:
        nan_step = _read_step(bad)
    if nan_step is None and done > start and last_saved != done:  # the last step, or where SIGTERM stopped us
        check_free_space(ckpt.directory, state_bytes)
        ckpt.save(done, state, data_iter=train_iter, config=cfg, force=True)
    ckpt.wait()
    ckpt.close()

    if nan_step is not None:
        kept = f"step {last_saved}" if last_saved else "none"
        log(f"stopped: the training loss or its gradient is not finite (NaN or infinite) at step {nan_step}; no "
            f"checkpoint was saved from that step on (the last one in {ckpt.directory}: {kept}). Lower optim.lr (or "
            f"set optim.grad_clip) before rerunning, which resumes from the last checkpoint")
        writer.close()
        return {"step": int(done), "stopped": NAN_LOSS, "nan_step": int(nan_step), "preempted": False,
                "train_seconds": round(train_seconds, 2)}
    if preempt.requested:  # during training or before the final evaluation: stop now, a rerun resumes
        saved = f"checkpoint {done} committed in {ckpt.directory}" if done else "no step done, nothing to save"
        log(f"preempted (SIGTERM) at step {done}: {saved}; rerun the same command to resume")
        writer.close()
        return {"step": int(done), "preempted": True, "train_seconds": round(train_seconds, 2)}

    t1 = time.perf_counter()
    result = evaluate(cfg, params_for_evaluation(state.params), eval_data, eval_step=eval_step,
                      show_examples=show_examples, log=log)
    result.update(step=int(cfg.train.steps), train_seconds=round(train_seconds, 2),
                  eval_seconds=round(time.perf_counter() - t1, 2), preempted=False)
    writer.write(cfg.train.steps, {k: v for k, v in result.items() if isinstance(v, (int, float))
                                   and not isinstance(v, bool) and k != "step"}, prefix="final")
    writer.close()
    return result


def _has_checkpoint(directory: Path) -> bool:
    """`directory` holds a committed checkpoint step (read-only: creates nothing)."""
    if not directory.is_dir():
        return False
    ckpt = Checkpointer(directory, read_only=True)
    try:
        return ckpt.latest_step() is not None
    finally:
        ckpt.close()


@jax.jit
def _first_nonfinite(bad, loss, grad_norm, step):
    """`bad` (the first step whose loss or gradient norm was not finite, or -1) updated with step `step`'s."""
    return jnp.where((bad < 0) & ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm)), step, bad).astype(jnp.int32)


def _read_step(bad) -> int | None:
    """The first non-finite step, read on the host (a sync on whatever step `bad` belongs to)."""
    step = int(bad)
    return step if step >= 0 else None


def _local_bytes(tree) -> int:
    """Bytes this process writes for `tree` in a checkpoint: one copy of each of its shards."""
    return sum(shard.data.nbytes for x in jax.tree.leaves(tree) for shard in x.addressable_shards
               if shard.replica_id == 0)


def _silent(message: str) -> None:
    pass


def _is_log_step(step: int, start: int, log_every: int) -> bool:
    return step % log_every == 0 or step == start + 1


def _report(writer, bar, step, metrics, *, t0, start, tokens_per_step):
    values = writer.write(step, metrics)
    elapsed = max(time.perf_counter() - t0, 1e-9)
    tps = (step - start) * tokens_per_step / elapsed
    bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{tps:,.0f}")


__all__ = ["train_and_evaluate"]
