"""Training: the jitted step, the objective's estimator, metrics files, checkpoints and resume."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_run_config
from dlmjax.data import load_data
from dlmjax.sharding import batch_sharding, make_mesh
from dlmjax.train.loop import train_and_evaluate
from dlmjax.train.state import init_train_state, lr_schedule, make_optimizer
from dlmjax.train.step import as_batch, make_eval_step, make_train_step

# The shared tiny run on the default config, two layers deep and warmed up quickly.
TRAIN = ("model.n_layers=2", "model.max_seq_len=16", "optim.warmup_steps=2", "optim.lr=3e-3")


def tiny(*extra):
    return tiny_run_config(*TRAIN, *extra, base=None)


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


# ---- inputs that can't hurt a run ------------------------------------------------------------------------------
# Each bad input through the command line: exit status 2, one line on stderr, no traceback, and every file of
# the run directory it was pointed at byte-identical.

import fcntl  # noqa: E402
import hashlib  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from conftest import DEMO_CONFIG, REPO, TINY_RUN  # noqa: E402
from dlmjax.cli import main  # noqa: E402

RUN = ["--config", DEMO_CONFIG, *TINY_RUN, "train.steps=2", "checkpoint.every_steps=1"]


def _tree(root: Path) -> dict[str, str]:
    """Every file under `root` and the hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(capsys, *argv) -> tuple[int, str, list[str]]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err.splitlines()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step run (checkpoints at steps 1 and 2), made once; tests copy it."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--workdir", str(workdir), *RUN]) == 0
    return workdir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    return workdir


@pytest.mark.parametrize("override, words", [
    ("optim.lr=nan", ["optim.lr=", "finite"]),
    ("optim.b2=1.0", ["optim.b2=1.0", "[0.0, 1.0)"]),
    ("optim.eps=0", ["optim.eps=0.0", "> 0"]),
    ("optim.weight_decay=-0.1", ["optim.weight_decay=-0.1", ">= 0"]),
    ("optim.grad_clip=inf", ["optim.grad_clip=", "finite"]),
    ("train.steps=0", ["train.steps=0", "> 0"]),
    ("data.seq_len=0", ["data.seq_len=0", "> 0"]),
    # 65 is the byte "A": a mask id that is a real token of the data's (byte) tokenizer
    ("diffusion.mask_id=65", ["diffusion.mask_id=65", "a token the data uses", "diffusion.mask_id=259"]),
    # a resume that cannot restore (the model changed): nothing moved, config.json untouched
    ("model.d_model=64", ["model.d_model=32 there, 64 here", "cannot resume", "Nothing was changed"]),
    ("optim.grad_clip=0", ["optim.grad_clip=1.0 there, 0.0 here", "cannot resume"]),  # another optimizer state
])
def test_a_bad_input_is_one_line_and_changes_no_file(run_copy, capsys, override, words):
    before = _tree(run_copy)
    rc, out, err = _cli(capsys, "train", "--workdir", str(run_copy), *RUN, "train.steps=4", override)
    assert rc == 2 and out == "", (rc, out, err)
    assert len(err) == 1 and "Traceback" not in err[0] and err[0].startswith("dlmjax train: error:"), err
    for w in words:
        assert w in err[0], err[0]
    assert _tree(run_copy) == before


def test_a_yaml_syntax_error_is_one_line_naming_the_file_and_line(run_copy, capsys, tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text(f"base: {DEMO_CONFIG}\ntrain:\n  steps: [4\n")
    before = _tree(run_copy)
    rc, out, err = _cli(capsys, "train", "--config", str(bad), "--workdir", str(run_copy))
    assert rc == 2 and len(err) == 1 and str(bad) in err[0] and "line 4" in err[0], err
    assert _tree(run_copy) == before


def _start_trainer(workdir: Path, *overrides: str, preexec_fn=None, prefix=()) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [*prefix, sys.executable, "-m", "dlmjax", "train", "--workdir", str(workdir), *RUN, *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn)


def _wait_for_line(proc: subprocess.Popen, start: str, timeout: float = 240) -> list[str]:
    """stderr lines of `proc` up to the first one that starts with `start`."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith(start):
                return lines
    proc.kill()
    raise AssertionError(f"no line starting with {start!r} from the trainer: {lines[-20:]}")


def test_a_second_trainer_on_the_same_workdir_is_refused(tmp_path, capsys):
    workdir = tmp_path / "run"
    first = _start_trainer(workdir, "train.steps=100000", "checkpoint.every_steps=100000")
    try:
        _wait_for_line(first, "workdir:")  # logged once the lock is held
        rc, out, err = _cli(capsys, "train", "--workdir", str(workdir), *RUN)
        assert rc == 2 and out == "" and len(err) == 1, (rc, out, err)
        assert f"workdir {workdir} is in use by another trainer" in err[0], err[0]
        assert first.poll() is None, "the first trainer must keep running"
    finally:
        first.send_signal(signal.SIGTERM)  # it saves its step and exits as preempted
        _, first_err = first.communicate(timeout=240)
    assert first.returncode == 143, first_err[-3000:]
    with open(workdir / ".lock") as f:  # released with the process
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.parametrize("log_every", [1, 100])  # read with the logged metrics, or before a checkpoint
def test_a_nan_loss_stops_with_a_message_a_json_summary_and_finite_checkpoints(tmp_path, capsys, log_every):
    workdir = tmp_path / "run"
    rc, out, err = _cli(capsys, "train", "--workdir", str(workdir), *RUN, "train.steps=30", "optim.lr=1e30",
                        "optim.warmup_steps=0", f"train.log_every={log_every}")
    assert rc == 2, (rc, out, err)
    result = json.loads(out)
    assert result["stopped"] == "nan_loss" and result["preempted"] is False
    nan_step = result["nan_step"]
    assert 1 <= nan_step <= result["step"] < 30
    assert any(f"not finite (NaN or infinite) at step {nan_step}" in line for line in err), err
    assert not any("Traceback" in line for line in err)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) < nan_step, (steps, nan_step)  # nothing saved from the bad step on
    from dlmjax.checkpoint import load

    _, params = load(workdir)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_a_full_disk_is_one_clear_error_and_the_last_checkpoint_still_loads(run_copy):
    limit = 16 * 1024  # bytes per file: the small files fit, a checkpoint's array data does not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail (EFBIG), like ENOSPC

    proc = _start_trainer(run_copy, "train.steps=4", preexec_fn=small_files)
    out, err = proc.communicate(timeout=300)
    lines = err.splitlines()
    assert proc.returncode == 2 and out == "", err[-3000:]
    assert "Traceback" not in err and lines[-1].startswith("dlmjax train: error:") and str(run_copy) in lines[-1]
    from dlmjax.checkpoint import load

    cfg, params = load(run_copy)
    assert cfg.train.steps in (2, 4) and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    kept = sorted(int(p.name) for p in (run_copy / "checkpoints").iterdir() if p.name.isdigit())
    assert kept[-1] == 2, kept  # the last good step is still the newest committed one


def _read_only(workdir: Path) -> tuple:
    """A command prefix under which `workdir` is read-only: a private read-only bind mount when we are root
    (who may write anywhere), else the directory's permissions."""
    if os.geteuid() != 0:
        for p in [workdir, *workdir.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        return ()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"',
                            str(workdir)], capture_output=True)
    if probe.returncode:
        pytest.skip(f"cannot make a read-only mount as root here: {probe.stderr.decode()[-300:]}")
    return ("unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && shift && '
            'exec "$@"', str(workdir), "--")


def test_a_read_only_workdir_is_one_clear_error_and_changes_nothing(run_copy):
    before = _tree(run_copy)
    proc = _start_trainer(run_copy, "train.steps=4", prefix=_read_only(run_copy))
    out, err = proc.communicate(timeout=300)
    lines = err.splitlines()
    assert proc.returncode == 2 and out == "" and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("dlmjax train: error:") and str(run_copy) in lines[0] and "writ" in lines[0], lines
    assert _tree(run_copy) == before
    from dlmjax.checkpoint import load

    assert load(run_copy)[0].train.steps == 2
