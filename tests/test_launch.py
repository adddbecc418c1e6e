"""Launch scripts: syntax, and the commands their dry runs print (no gcloud, SLURM or accelerator needed).

`local_multiprocess.sh` also really runs, with a stand-in for `dlmjax` that reports its environment, to check
that it starts N processes with the right variables, waits for all, and fails when one fails.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "launch").glob("*.sh")) + sorted((ROOT / "launch").glob("*.sbatch"))


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLMJAX_", "SLURM_", "TPU_"))}
    env.update(extra)
    return env


def _run(args, timeout=60, **env):
    return subprocess.run(["bash", *map(str, args)], cwd=ROOT, env=_clean_env(**env), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_have_a_usage_header(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    head = script.read_text().splitlines()[:30]
    assert head[0] == "#!/usr/bin/env bash" and any(line.startswith("#") for line in head[1:])
    if script.name in ("local_multiprocess.sh", "tpu_vm.sh", "slurm_gpu.sbatch"):
        assert any("usage:" in line for line in head)


def test_local_multiprocess_dry_run():
    r = _run(["launch/local_multiprocess.sh", "--dry-run", "-n", "3", "--devices-per-process", "2", "--port",
              "5555", "--", "--config", "configs/demo.yaml", "--workdir", "runs/mp", "train.steps=3"])
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("env ")]
    assert len(lines) == 3
    for i, line in enumerate(lines):
        for want in ("DLMJAX_COORDINATOR=127.0.0.1:5555", "DLMJAX_NUM_PROCESSES=3", f"DLMJAX_PROCESS_ID={i} ",
                     "JAX_PLATFORMS=cpu", "--xla_force_host_platform_device_count=2",
                     "train --config configs/demo.yaml --workdir runs/mp train.steps=3",
                     f"> runs/mp/logs/process_{i}.log"):
            assert want in line, (want, line)
    gpu = _run(["launch/local_multiprocess.sh", "--dry-run", "-n", "2", "--platform", "gpu",
                "--devices-per-process", "2", "--config", "c.yaml"]).stdout.splitlines()
    assert "DLMJAX_LOCAL_DEVICE_IDS=0\\,1" in gpu[0] and "DLMJAX_LOCAL_DEVICE_IDS=2\\,3" in gpu[1]
    assert "JAX_PLATFORMS" not in gpu[0]
    bad = _run(["launch/local_multiprocess.sh", "--dry-run", "-n", "zero", "--config", "c.yaml"])
    assert bad.returncode == 2 and "-n/NUM_PROCESSES=zero" in bad.stderr


FAKE_DLMJAX = """#!/usr/bin/env bash
echo "id=$DLMJAX_PROCESS_ID n=$DLMJAX_NUM_PROCESSES at=$DLMJAX_COORDINATOR xla=$XLA_FLAGS args=$*"
if [ "$DLMJAX_PROCESS_ID" = "${FAIL_ID:-none}" ]; then exit 3; fi
exec sleep "${SLEEP:-0.2}"
"""


@pytest.fixture
def fake_dlmjax(tmp_path):
    path = tmp_path / "fake_dlmjax"
    path.write_text(FAKE_DLMJAX)
    path.chmod(0o755)
    return path


def test_local_multiprocess_runs_every_process_and_keeps_their_logs(tmp_path, fake_dlmjax):
    workdir = tmp_path / "run"
    r = _run(["launch/local_multiprocess.sh", "-n", "3", "--port", "6000", "--config", "c.yaml", "--workdir",
              workdir, "x.y=1"], DLMJAX=str(fake_dlmjax))
    assert r.returncode == 0, r.stderr
    for i in range(3):
        log = (workdir / "logs" / f"process_{i}.log").read_text()
        assert f"id={i} n=3 at=127.0.0.1:6000" in log and "device_count=1" in log
        assert f"args=train --config c.yaml --workdir {workdir} x.y=1" in log


def test_local_multiprocess_fails_and_stops_the_others_when_one_fails(tmp_path, fake_dlmjax):
    t0 = time.monotonic()
    r = _run(["launch/local_multiprocess.sh", "-n", "3", "--config", "c.yaml", "--workdir", tmp_path / "run"],
             DLMJAX=str(fake_dlmjax), FAIL_ID="1", SLEEP="60")
    assert r.returncode == 3
    assert "process 1 (pid" in r.stderr and "exited with status 3" in r.stderr and "id=1 n=3" in r.stderr
    assert time.monotonic() - t0 < 30  # the sleeping processes were stopped, not waited for


def test_tpu_vm_dry_run():
    r = _run(["launch/tpu_vm.sh", "--dry-run", "--name", "dlm-v4", "--zone", "us-central2-b", "--accelerator-type",
              "v4-32", "--spot", "--config", "configs/demo.yaml", "--workdir", "gs://bkt/runs/x", "--",
              "train.steps=10", "data.batch_size=256"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("gcloud compute tpus tpu-vm describe dlm-v4 --zone us-central2-b") for line in lines)
    assert any(line.startswith("gcloud compute tpus tpu-vm create dlm-v4 --zone us-central2-b --accelerator-type "
                               "v4-32") and line.endswith("--spot") for line in lines)
    ssh = [line for line in lines if line.startswith("gcloud compute tpus tpu-vm ssh dlm-v4 --zone us-central2-b")]
    assert ssh and all("--worker=all" in line for line in ssh)
    assert any("pip install -q -e '\\''.[tpu]'\\''" in line for line in ssh)
    assert any("gcsfuse" in line and "bkt /tmp/gcs/bkt" in line for line in ssh)
    assert ssh[-1].endswith("--command 'cd dlmjax && .venv/bin/dlmjax train --config configs/demo.yaml "
                            "--workdir /tmp/gcs/bkt/runs/x train.steps=10 data.batch_size=256'")
    assert any("tpu-vm scp" in line and "--worker=all" in line for line in lines)  # the local tree, copied

    git = _run(["launch/tpu_vm.sh", "--dry-run", "--name", "n", "--zone", "z", "--project", "p", "--repo",
                "https://example.com/dlmjax.git", "--ref", "v1", "--skip-create", "train.steps=3"])
    assert git.returncode == 0, git.stderr
    assert "tpu-vm create" not in git.stdout and "scp" not in git.stdout
    assert "git clone -q https://example.com/dlmjax.git dlmjax" in git.stdout and "fetch -q origin v1" in git.stdout
    assert "--zone z --project p --worker=all" in git.stdout
    assert "--workdir runs/demo train.steps=3'" in git.stdout  # default workdir: runs/<config name>

    missing = _run(["launch/tpu_vm.sh", "--dry-run", "--zone", "z"])
    assert missing.returncode == 2 and "--name (or TPU_NAME) is required" in missing.stderr


def test_slurm_dry_run_prints_srun_and_what_each_task_joins():
    r = _run(["launch/slurm_gpu.sbatch", "--config", "configs/demo.yaml", "--workdir", "/shared/run",
              "train.steps=3"], DRY_RUN="1", SKIP_INSTALL="1", PYTHON=sys.executable, SLURM_NNODES="3",
             SLURM_JOB_ID="123456", SLURM_STEP_NODELIST="gpu[007-009]")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == ("srun --nodes=3 --ntasks=3 --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL "
                        ".venv/bin/dlmjax train --config configs/demo.yaml --workdir /shared/run train.steps=3 ")
    for i in range(3):
        assert (f"task {i}: SLURM_PROCID={i} SLURM_NTASKS=3 SLURM_STEP_NODELIST=gpu[007-009] -> "
                f"dlmjax.distributed slurm: coordinator gpu007:12456") in lines[1 + i]
    text = (ROOT / "launch/slurm_gpu.sbatch").read_text()
    for directive in ("#SBATCH --nodes=", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node="):
        assert directive in text
