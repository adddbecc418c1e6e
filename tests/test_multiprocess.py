"""Multi-process training: `dlmjax.distributed` reading the environment, and 2-process jobs on this machine
(the demo task, whose global batch each process slices, and a packed corpus that each process reads in part).

The end-to-end test (slow: ~2-3 minutes on 2 busy cores) starts two `dlmjax train` processes that talk through
gloo CPU collectives, trains 4 steps, restarts both and resumes to step 6, and compares with an uninterrupted
6-step job: every process sees the same losses, there is one checkpoint directory (written by both processes
through orbax, with one data-iterator state per process), the resumed losses equal the uninterrupted ones, and
those equal (to float32 rounding) one process training on 2 devices.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_RUN
from dlmjax import distributed
from dlmjax.distributed import DistributedConfigError, LaunchPlan, first_host, launch_plan

ROOT = Path(__file__).resolve().parents[1]
NO_TPU = {"DLMJAX_DISTRIBUTED": "auto"}  # a plain dict environment: no TPU_* hints, and /dev is checked below


@pytest.fixture(autouse=True)
def _not_on_a_tpu_vm(monkeypatch):
    monkeypatch.setattr(distributed, "on_tpu_vm", lambda env=None: bool(env and env.get("TPU_ACCELERATOR_TYPE")))


def test_single_process_without_variables():
    assert launch_plan({}) is None
    assert launch_plan({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None


def test_explicit_variables():
    env = {"DLMJAX_COORDINATOR": "10.0.0.2:1234", "DLMJAX_NUM_PROCESSES": "4", "DLMJAX_PROCESS_ID": "3",
           "DLMJAX_LOCAL_DEVICE_IDS": "0,1"}
    p = launch_plan(env)
    assert p == LaunchPlan("explicit", "10.0.0.2:1234", 4, 3, (0, 1))
    assert p.kwargs() == dict(coordinator_address="10.0.0.2:1234", num_processes=4, process_id=3,
                              local_device_ids=[0, 1])
    # explicit variables win over SLURM's
    assert launch_plan({**env, "SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "5"}).source == "explicit"


@pytest.mark.parametrize("env, words", [
    ({"DLMJAX_COORDINATOR": "h:1", "DLMJAX_NUM_PROCESSES": "2"}, ["DLMJAX_PROCESS_ID missing", "'h:1'"]),
    ({"DLMJAX_PROCESS_ID": "0"}, ["DLMJAX_COORDINATOR", "DLMJAX_NUM_PROCESSES", "missing"]),
    ({"DLMJAX_COORDINATOR": "h:1", "DLMJAX_NUM_PROCESSES": "2", "DLMJAX_PROCESS_ID": "2"},
     ["DLMJAX_PROCESS_ID='2'", "< DLMJAX_NUM_PROCESSES='2'"]),
    ({"DLMJAX_COORDINATOR": "h:1", "DLMJAX_NUM_PROCESSES": "two", "DLMJAX_PROCESS_ID": "0"},
     ["DLMJAX_NUM_PROCESSES='two'", "not an integer"]),
    ({"DLMJAX_COORDINATOR": "hostonly", "DLMJAX_NUM_PROCESSES": "2", "DLMJAX_PROCESS_ID": "0"},
     ["DLMJAX_COORDINATOR='hostonly'", "host:port"]),
    ({"DLMJAX_COORDINATOR": "h:1", "DLMJAX_NUM_PROCESSES": "2", "DLMJAX_PROCESS_ID": "0",
      "DLMJAX_LOCAL_DEVICE_IDS": "0;1"}, ["DLMJAX_LOCAL_DEVICE_IDS='0;1'"]),
    ({"DLMJAX_LOCAL_DEVICE_IDS": "0"}, ["DLMJAX_LOCAL_DEVICE_IDS='0'", "none of"]),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, ["SLURM_STEP_NODELIST", "srun"]),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "2", "SLURM_STEP_NODELIST": "n1,n2"},
     ["SLURM_PROCID='2'"]),
    ({"DLMJAX_DISTRIBUTED": "maybe"}, ["DLMJAX_DISTRIBUTED='maybe'"]),
])
def test_half_configured_jobs_name_the_variable(env, words):
    with pytest.raises(DistributedConfigError) as e:
        launch_plan(env)
    for w in words:
        assert w in str(e.value)


def test_slurm():
    env = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
           "SLURM_STEP_NODELIST": "gpu[007-008,011],login1"}
    assert launch_plan(env) == LaunchPlan("slurm", "gpu007:12456", 4, 2)
    assert launch_plan({**env, "DLMJAX_COORDINATOR_PORT": "4000"}).coordinator == "gpu007:4000"
    assert launch_plan({**env, "DLMJAX_DISTRIBUTED": "0"}) is None  # explicit opt-out


@pytest.mark.parametrize("nodes, first", [("a1", "a1"), ("a1,b2", "a1"), ("node[3-5]", "node3"),
                                          ("n[01,04-06]", "n01"), ("rack1-n[9]", "rack1-n9")])
def test_first_host(nodes, first):
    assert first_host(nodes) == first


def test_tpu_vm_autodetects_and_honours_opt_out():
    tpu = {"TPU_ACCELERATOR_TYPE": "v5litepod-16"}
    assert launch_plan(tpu) == LaunchPlan("auto") and LaunchPlan("auto").kwargs() == {}
    assert launch_plan({**tpu, "DLMJAX_DISTRIBUTED": "off"}) is None
    assert launch_plan({"DLMJAX_DISTRIBUTED": "1"}) == LaunchPlan("auto")  # forced: JAX detects the cluster
    assert launch_plan(NO_TPU) is None


def test_maybe_initialize_is_a_no_op_for_one_process():
    assert distributed.maybe_initialize({}) is None


# ----------------------------------------------------------------------------------------- 2 processes on CPU
TINY = [*TINY_RUN, "checkpoint.every_steps=2", "checkpoint.max_to_keep=3",
        # a schedule that does not depend on train.steps, so a 4-step run resumed to 6 equals a 6-step run
        "optim.decay=constant", "optim.warmup_steps=2"]
TIMEOUT = 170  # seconds per job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir: Path, steps: int, n: int = 2, extra: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """Start `dlmjax train` as the `n` processes of one job, one CPU device each (n=0: one process, not a
    distributed job, with 2 devices); `extra` config overrides go last."""
    port = _free_port()
    procs = []
    for i in range(max(n, 1)):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DLMJAX_", "SLURM_", "TPU_"))}
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={1 if n else 2}")
        if n:
            env.update(DLMJAX_COORDINATOR=f"127.0.0.1:{port}", DLMJAX_NUM_PROCESSES=str(n),
                       DLMJAX_PROCESS_ID=str(i), DLMJAX_DEBUG_PROCESS_METRICS="1")
        cmd = ["nice", "-n", "19", sys.executable, "-m", "dlmjax", "train", "--config",
               str(ROOT / "configs/demo.yaml"), "--workdir", str(workdir), *TINY, f"train.steps={steps}", *extra]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _finish(procs: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    """Wait for every process (a failed one leaves its peers waiting on the coordinator: they are killed)."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, r in enumerate(results):
        assert r.returncode == 0, f"process {i} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return results


def _job(workdir: Path, steps: int, extra: tuple[str, ...] = ()) -> list[subprocess.CompletedProcess]:
    return _finish(_start(workdir, steps, extra=extra))


def _losses(path: Path) -> dict[int, float]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    assert len(train) == len(dict(train)), f"a step is recorded twice in {path}"
    return dict(train)


@pytest.mark.slow
def test_two_processes_train_resume_and_match_an_uninterrupted_run(tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    first = _job(run, 4)
    # process 0 logs and prints the result; process 1 says nothing about training
    assert "model:" in first[0].stderr and '"preempted": false' in first[0].stdout
    assert "model:" not in first[1].stderr and "BAD" not in first[1].stderr and "loss" not in first[1].stdout
    assert sorted(_losses(run / "metrics.jsonl")) == [1, 2, 3, 4]
    assert _losses(run / "metrics.jsonl") == _losses(run / "process1" / "metrics.jsonl")

    resumed = _job(run, 6)
    assert "resumed from step 4" in resumed[0].stderr
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4", "6"]  # one checkpoint per step, not per process
    assert not (run / "process1" / "checkpoints").exists()
    for step in ("2", "4", "6"):  # orbax: state written once; grain: one iterator position per process
        assert sorted(p.name for p in (ckpts / step / "data").glob("process_*")) == ["process_0-of-2.json",
                                                                                     "process_1-of-2.json"]
    losses = _losses(run / "metrics.jsonl")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses == _losses(run / "process1" / "metrics.jsonl")

    reference, single = _start(ref, 6), _start(tmp_path / "single", 6, n=0)
    _finish(reference + single)
    reference = _losses(ref / "metrics.jsonl")
    assert reference == _losses(ref / "process1" / "metrics.jsonl")
    assert losses == reference  # bitwise: resume replays the same batches and noise
    # each process fed its own rows of the global batch: the job matches one process with the same 2 devices
    # (up to the order of the cross-device sums)
    single = _losses(tmp_path / "single" / "metrics.jsonl")
    assert list(single) == list(reference)
    np.testing.assert_allclose(list(reference.values()), list(single.values()), rtol=1e-5)


def _final(path: Path) -> dict:
    return next(r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == "final")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["corpus", "packed"])
def test_two_processes_train_on_a_packed_corpus_and_resume(tmp_path, kind):
    """The demo model on a packed corpus: each process packs its own half of the documents into BD3 rows with
    segment ids (data.kind=corpus), or reads its half of the rows of a store written by `dlmjax pack`
    (data.kind=packed); the job trains, checkpoints (state + one grain position per process), restarts and
    resumes; both processes agree on every loss and on the held-out NELBO pooled over both shards, and the
    resumed losses equal an uninterrupted run's."""
    paragraphs = [p.strip() for p in (ROOT / "README.md").read_text(encoding="utf-8").split("\n\n") if p.strip()]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")
    rows = ("data.seq_len=64", "model.max_seq_len=64", "diffusion.objective=bd3", "diffusion.block_size=8",
            "data.eval_size=16")
    source = ("data.kind=corpus", f"data.path={corpus}", "data.format=jsonl")
    if kind == "packed":
        store = tmp_path / "store"
        packed = subprocess.run([sys.executable, "-m", "dlmjax", "pack", "--config", str(ROOT / "configs/demo.yaml"),
                                 "--out", str(store), *TINY, *rows, *source], cwd=ROOT, capture_output=True,
                                text=True, timeout=TIMEOUT)
        assert packed.returncode == 0, packed.stderr[-3000:]
        source = ("data.kind=packed", f"data.path={store}")
    extra = (*rows, *source)
    run, ref = tmp_path / "run", tmp_path / "ref"
    first = _job(run, 4, extra)
    assert sorted(_losses(run / "metrics.jsonl")) == [1, 2, 3, 4]
    assert _losses(run / "metrics.jsonl") == _losses(run / "process1" / "metrics.jsonl")
    # the pooled held-out NELBO: the same number on both processes, over more tokens than one process holds
    final = [_final(run / "metrics.jsonl"), _final(run / "process1" / "metrics.jsonl")]
    assert final[0]["nelbo_per_token"] == final[1]["nelbo_per_token"] and np.isfinite(final[0]["nelbo_per_token"])
    assert final[0]["eval_tokens"] == final[1]["eval_tokens"] > 0

    resumed = _job(run, 6, extra)
    assert "resumed from step 4" in resumed[0].stderr
    for step in ("2", "4", "6"):
        assert sorted(p.name for p in (run / "checkpoints" / step / "data").glob("process_*")) == [
            "process_0-of-2.json", "process_1-of-2.json"]
    losses = _losses(run / "metrics.jsonl")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and losses == _losses(run / "process1" / "metrics.jsonl")
    _job(ref, 6, extra)
    assert losses == _losses(ref / "metrics.jsonl")  # bitwise: resume replays the same packed batches and noise
    assert first[0].stdout and '"preempted": false' in resumed[0].stdout


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    """A preemption notice reaching only process 1: JAX's preemption service propagates it, both processes stop
    at one agreed step, save it and exit 143; rerunning resumes and matches an uninterrupted run bitwise."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    procs = _start(run, 3000)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and len(_train_lines(run / "metrics.jsonl")) < 3:
            assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)  # only process 1 is told
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [143, 143], [o[1][-2000:] for o in outs]
    stopped = json.loads(outs[0][0].strip().splitlines()[-1])
    assert stopped["preempted"] is True and 3 <= stopped["step"] < 3000
    assert f"preempted (SIGTERM) at step {stopped['step']}" in outs[0][1]
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == stopped["step"]  # the agreed step, saved once by both processes
    assert sorted(p.name for p in (run / "checkpoints" / str(steps[-1]) / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert _losses(run / "metrics.jsonl") == _losses(run / "process1" / "metrics.jsonl")

    total = stopped["step"] + 2
    resumed = _job(run, total)
    assert f"resumed from step {stopped['step']}" in resumed[0].stderr
    _job(ref, total)
    assert _losses(run / "metrics.jsonl") == _losses(ref / "metrics.jsonl")
    assert sorted(_losses(run / "metrics.jsonl")) == list(range(1, total + 1))


def _train_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if '"split": "train"' in line]


SCRIPT_IDEMPOTENT = """
import jax
from dlmjax import distributed
env = {"DLMJAX_COORDINATOR": "127.0.0.1:%d", "DLMJAX_NUM_PROCESSES": "1", "DLMJAX_PROCESS_ID": "0"}
first = distributed.maybe_initialize(env)
assert first.source == "explicit" and jax.distributed.is_initialized(), first
assert distributed.maybe_initialize(env) is first  # a second call changes nothing
assert jax.process_count() == 1 and jax.config.jax_cpu_collectives_implementation == "gloo"
print("ok")
"""

SCRIPT_TOO_LATE = """
import jax
from dlmjax import distributed
jax.devices()
env = {"DLMJAX_COORDINATOR": "127.0.0.1:%d", "DLMJAX_NUM_PROCESSES": "2", "DLMJAX_PROCESS_ID": "0"}
try:
    distributed.maybe_initialize(env)
except RuntimeError as e:
    print(e)
"""


@pytest.mark.parametrize("script, expected", [
    (SCRIPT_IDEMPOTENT, ["ok"]),
    (SCRIPT_TOO_LATE, ["explicit multi-process job", "before the first JAX computation"]),
])
def test_maybe_initialize_in_a_fresh_process(script, expected):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLMJAX_", "SLURM_", "TPU_"))}
    r = subprocess.run([sys.executable, "-c", script % _free_port()], env=dict(env, JAX_PLATFORMS="cpu"),
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for e in expected:
        assert e in r.stdout, r.stdout
