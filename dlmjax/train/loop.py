"""`train_and_evaluate(config, workdir)`: the training loop.

The step is compiled before the loop; the loop never waits on the device (metrics of step s are read after
step s+1 is dispatched); checkpoints (state + data iterator + config) are written every
`checkpoint.every_steps`, and rerunning the same command resumes from the latest one.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
from tqdm.auto import tqdm

from dlmjax.checkpoint import Checkpointer
from dlmjax.config import Config
from dlmjax.data.pipeline import build_data, make_eval_batches
from dlmjax.data.tasks import heldout
from dlmjax.evaluate import heldout_nelbo, task_exact_match
from dlmjax.models.transformer import count_params
from dlmjax.sharding import batch_sharding, make_mesh
from dlmjax.train.metrics import MetricsWriter
from dlmjax.train.state import init_train_state, make_optimizer
from dlmjax.train.step import as_batch, make_eval_step, make_train_step


def load_data(cfg: Config):
    d = cfg.data
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
    if task is not None and exact_match:
        problems = heldout(task, cfg.data.eval_size, cfg.data.seed)
        em, preds = task_exact_match(cfg, params, task, problems, tokenizer, jax.random.fold_in(rng, 7),
                                     return_predictions=True)
        result.update(em)
        for prob, pred in list(zip(problems, preds))[:show_examples]:
            mark = "ok " if task.score(pred, prob) else "BAD"
            log(f"  {mark} {prob.prompt}{pred}   (expected {prob.answer})")
    return result


def train_and_evaluate(cfg: Config, workdir: str | Path, *, log=print, show_examples: int = 5) -> dict:
    """Train (or resume) the run in `workdir`, then evaluate; returns the final metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(cfg.to_json())
    mesh = make_mesh(cfg.mesh)
    data = load_data(cfg)
    train_ds = data[0]
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    state, shardings = init_train_state(cfg.model, tx, cfg.train.seed, mesh)
    train_iter = iter(train_ds)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore_state(start, state, shardings, data_iter=train_iter)
        log(f"resumed from step {start} in {ckpt.directory}")
    start = int(start or 0)
    log(f"model: {count_params(state.params) / 1e6:.2f}M parameters; mesh: {dict(mesh.shape)}")

    bsh = batch_sharding(mesh)
    step_fn = make_train_step(tx, cfg.model, cfg.diffusion, shardings, bsh)
    eval_step = make_eval_step(cfg.model, cfg.diffusion)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len

    t0 = time.perf_counter()
    pending = None  # (step, metrics on device) of the previous step, read after the next one is dispatched
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not cfg.train.progress, dynamic_ncols=True,
               file=sys.stderr, desc="train")
    compiled = None
    for step in range(start, cfg.train.steps):
        batch = jax.device_put(as_batch(next(train_iter)), bsh)
        if compiled is None:  # compile once, before timing starts
            compiled = step_fn.lower(state, batch).compile()
            t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        if pending is not None:
            _report(writer, bar, *pending, t0=t0, start=start, tokens_per_step=tokens_per_step,
                    log_every=cfg.train.log_every)
        pending = (step + 1, metrics)
        bar.update(1)
        if (step + 1) % cfg.checkpoint.every_steps == 0 and step + 1 < cfg.train.steps:
            ckpt.save(step + 1, state, data_iter=train_iter, config=cfg)
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.steps:
            ev = evaluate(cfg, state.params, data=data, eval_step=eval_step, n_batches=cfg.train.eval_batches,
                          exact_match=False)
            writer.write(step + 1, {k: v for k, v in ev.items() if k != "eval_tokens"}, prefix="eval")
    if pending is not None:
        _report(writer, bar, *pending, t0=t0, start=start, tokens_per_step=tokens_per_step, log_every=1)
    bar.close()
    train_seconds = time.perf_counter() - t0
    if start < cfg.train.steps:
        ckpt.save(cfg.train.steps, state, data_iter=train_iter, config=cfg, force=True)
    ckpt.wait()
    ckpt.close()

    t1 = time.perf_counter()
    result = evaluate(cfg, state.params, data=data, eval_step=eval_step, show_examples=show_examples, log=log)
    result.update(step=int(cfg.train.steps), train_seconds=round(train_seconds, 2),
                  eval_seconds=round(time.perf_counter() - t1, 2))
    writer.write(cfg.train.steps, {k: v for k, v in result.items() if isinstance(v, (int, float))},
                 prefix="final")
    writer.close()
    return result


def _report(writer, bar, step, metrics, *, t0, start, tokens_per_step, log_every):
    if step % log_every and step != start + 1:
        return
    values = writer.write(step, metrics)
    elapsed = max(time.perf_counter() - t0, 1e-9)
    tps = (step - start) * tokens_per_step / elapsed
    bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{tps:,.0f}")


def print_json(result: dict) -> None:
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.items()}), flush=True)


__all__ = ["evaluate", "load_data", "print_json", "train_and_evaluate"]
