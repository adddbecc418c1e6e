"""Training: the jitted step, the objective's estimator, metrics files, checkpoints and resume."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlmjax.config import load_config
from dlmjax.sharding import batch_sharding, make_mesh
from dlmjax.train.loop import load_data, train_and_evaluate
from dlmjax.train.state import init_train_state, lr_schedule, make_optimizer
from dlmjax.train.step import as_batch, make_eval_step, make_train_step

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.mlp_hidden=64", "model.max_seq_len=16",
        "data.batch_size=8", "data.eval_size=8", "sample.batch_size=8", "train.log_every=1", "train.progress=false",
        "optim.warmup_steps=2", "optim.lr=3e-3"]


def tiny(*extra):
    return load_config(None, TINY + list(extra))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = tiny("optim.warmup_steps=10", "optim.lr=1e-3", "optim.min_lr_ratio=0.1").optim
    sched = lr_schedule(cfg, 110)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(5e-4)
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(110)) == pytest.approx(1e-4, rel=1e-4)
    assert float(sched(60)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-3)  # cosine midpoint


def test_wsd_schedule_is_flat_then_decays_over_the_tail():
    cfg = tiny("optim.warmup_steps=10", "optim.lr=1e-3", "optim.min_lr_ratio=0.1", "optim.decay=wsd",
               "optim.decay_fraction=0.2").optim
    sched = lr_schedule(cfg, 110)  # warmup 10, stable 78, decay over the last 22
    assert float(sched(10)) == pytest.approx(1e-3) and float(sched(88)) == pytest.approx(1e-3)
    assert float(sched(99)) == pytest.approx(1e-3 - 0.5 * 9e-4, rel=1e-3)
    assert float(sched(110)) == pytest.approx(1e-4, rel=1e-4)


def test_train_step_learns_a_fixed_batch_and_donates_the_state():
    cfg = tiny()
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.optim, 60)
    state, shardings = init_train_state(cfg.model, tx, 0, mesh)
    step = make_train_step(tx, cfg.model, cfg.diffusion, shardings, batch_sharding(mesh))
    batch = as_batch(next(iter(load_data(cfg)[0])))
    losses = []
    for _ in range(60):
        old = state.params["wte"]
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert old.is_deleted(), "the train step must donate the state"
    assert int(state.step) == 60
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])


def test_heldout_nelbo_of_a_uniform_model_is_log_vocab():
    """With all-zero logits, CE = log V at every masked slot and E[1{masked}/t] = 1: NELBO/token = log V."""
    cfg = tiny("data.batch_size=512")
    tx = make_optimizer(cfg.optim, 1)
    state, _ = init_train_state(cfg.model, tx, 0, make_mesh(cfg.mesh))
    params = dict(state.params, ff_out=jnp.zeros_like(state.params["ff_out"]))
    batch = as_batch(next(iter(load_data(cfg)[0])))
    step = make_eval_step(cfg.model, cfg.diffusion)
    sums = [step(params, batch, jax.random.PRNGKey(i)) for i in range(4)]
    nelbo = sum(float(s) for s, _ in sums) / sum(int(n) for _, n in sums)
    assert nelbo == pytest.approx(np.log(cfg.model.vocab_size), rel=0.03)


def _train_losses(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def test_train_writes_metrics_and_resume_reproduces_losses_bitwise(tmp_path):
    cfg = tiny("train.steps=6", "checkpoint.every_steps=3", "checkpoint.max_to_keep=3")
    result = train_and_evaluate(cfg, tmp_path, show_examples=0)
    assert {"exact_match", "nelbo_per_token", "ppl"} <= set(result)
    assert 0.0 <= result["exact_match"] <= 1.0 and np.isfinite(result["nelbo_per_token"])
    first = _train_losses(tmp_path / "metrics.jsonl")
    assert [s for s, _ in first] == [1, 2, 3, 4, 5, 6]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 6

    # Lose the final checkpoint: the rerun must restart from step 3 and replay steps 4..6 exactly
    # (same data order from the restored grain iterator, same per-step RNG).
    # On resume the records of steps after the restored one are dropped from metrics.jsonl and written again
    # by the rerun: one record per step, identical to the first run's.
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    train_and_evaluate(cfg, tmp_path, show_examples=0)
    assert _train_losses(tmp_path / "metrics.jsonl") == first


def test_rerunning_a_finished_run_does_not_train_again(tmp_path):
    cfg = tiny("train.steps=2", "checkpoint.every_steps=1")
    train_and_evaluate(cfg, tmp_path, show_examples=0)
    n = len(_train_losses(tmp_path / "metrics.jsonl"))
    again = train_and_evaluate(cfg, tmp_path, show_examples=0)
    assert len(_train_losses(tmp_path / "metrics.jsonl")) == n
    assert again["step"] == 2
