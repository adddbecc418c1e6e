"""Checkpoints: retention, atomic commits, unreadable-step fallback, cross-mesh restore, exact resume after
SIGKILL and SIGTERM, params-only exports.

The SIGKILL/SIGTERM tests run `dlmjax train` as a subprocess; they share one JAX compilation cache
(module-scoped) so that only the first of those runs pays for compiling.
"""
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DEMO_CONFIG as DEMO, TINY_RUN, tiny_run_config as tiny
from dlmjax.checkpoint import Checkpointer, CheckpointWarning, TMP_MARKER, UNREADABLE_SUFFIX, load, save_params
from dlmjax.config import CheckpointConfig, ConfigError
from dlmjax.errors import CheckpointError, CheckpointRestoreError, InputError
from dlmjax.sharding import make_mesh
from dlmjax.train.result import PREEMPTED_EXIT_STATUS
from dlmjax.train.state import abstract_train_state, init_train_state, make_optimizer

# Failed restores (on purpose, below) leave orbax/tensorstore coroutines that are never awaited.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

TINY = list(TINY_RUN)


def _records(workdir, split="train"):
    path = Path(workdir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


# -- config -------------------------------------------------------------------------------------------------


def test_keep_every_is_validated_with_the_field_value_and_rule():
    assert CheckpointConfig(every_steps=5, keep_every=20).keep_every == 20
    assert CheckpointConfig(every_steps=5).keep_every == 0
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_every=7 .*multiple of checkpoint\.every_steps=5"):
        CheckpointConfig(every_steps=5, keep_every=7)
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_every=-5 must be >= 0"):
        CheckpointConfig(every_steps=5, keep_every=-5)
    with pytest.raises(ConfigError, match="keep_every"):
        tiny("checkpoint.every_steps=5", "checkpoint.keep_every=12")


# -- retention and atomic commits -------------------------------------------------------------------------


def test_retention_keeps_latest_n_plus_multiples_of_keep_every(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=5, max_to_keep=2, keep_every=20))
    for step in range(5, 55, 5):
        ckpt.save(step, {"w": jnp.full((4,), float(step))})
    ckpt.wait()
    assert ckpt.steps() == [20, 40, 45, 50]
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == [20, 40, 45, 50]  # deleted on disk too
    ckpt.close()
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=5, max_to_keep=2))  # keep_every=0: latest 2 only
    ckpt.save(55, {"w": jnp.zeros(4)})
    ckpt.wait()
    assert ckpt.steps() == [50, 55]
    ckpt.close()


_KILL_BEFORE_COMMIT = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from dlmjax.checkpoint import Checkpointer
    from dlmjax.config import CheckpointConfig

    ckpt = Checkpointer(sys.argv[1], CheckpointConfig(every_steps=1, max_to_keep=1))
    ckpt.save(1, {"w": jnp.arange(4.0)})
    ckpt.wait()
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_or_die(self):
        if self.get_final().name.isdigit():  # every item is written and committed; die before the step rename
            os.kill(os.getpid(), signal.SIGKILL)
        return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die
    ckpt.save(2, {"w": jnp.arange(4.0) + 100})
    ckpt.wait()
    print("the save was not interrupted")
""")


def test_save_killed_before_its_commit_is_not_a_checkpoint_and_deletes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _KILL_BEFORE_COMMIT, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    # On disk: the committed step 1, and step 2's data, all written, under orbax's temporary name.
    assert names == ["1", "2" + TMP_MARKER]
    assert (tmp_path / ("2" + TMP_MARKER) / "state" / "commit_success.txt").exists()
    assert (tmp_path / "1" / "commit_success.txt").exists()

    like = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    shardings = {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=1, max_to_keep=1))
    assert ckpt.steps() == [1] and ckpt.latest_step() == 1  # max_to_keep=1, yet step 1 survived
    with pytest.warns(CheckpointWarning, match=re.escape(str(tmp_path / ("2" + TMP_MARKER))) + ".*uncommitted"):
        step, state = ckpt.restore_latest(like, shardings)
    assert step == 1 and np.array_equal(state["w"], np.arange(4.0))
    # Saving step 2 again replaces the leftover; only then is step 1 superseded and deleted.
    ckpt.save(2, {"w": jnp.arange(4.0) + 7})
    ckpt.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2"]
    assert np.array_equal(ckpt.restore_state(2, like, shardings)["w"], np.arange(4.0) + 7)
    ckpt.close()


# -- unreadable latest step -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """checkpoints/{2,4} of two different TrainStates (with config), and a way to copy them."""
    cfg = tiny("train.steps=10")
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    mesh = make_mesh(cfg.mesh)
    s2, shardings = init_train_state(cfg.model, tx, 0, mesh)
    s4 = jax.tree.map(lambda x: x + 1, s2)
    root = tmp_path_factory.mktemp("two_steps")
    ckpt = Checkpointer(root / "checkpoints", cfg.checkpoint)
    ckpt.save(2, s2, config=cfg)
    ckpt.save(4, s4, config=cfg)
    ckpt.wait()
    ckpt.close()

    def copy(dst):
        shutil.copytree(root, dst)
        return Path(dst)

    return dict(cfg=cfg, tx=tx, mesh=mesh, s2=s2, s4=s4, shardings=shardings, copy=copy)


def _truncate_a_state_file(step_dir):
    files = sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d")
    with open(files[0], "r+b") as f:
        f.truncate(8)


def _remove_state_manifest(step_dir):
    (step_dir / "state" / "manifest.ocdbt").unlink()


def _empty_the_step(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


@pytest.mark.parametrize("corrupt", [_truncate_a_state_file, _remove_state_manifest, _empty_the_step])
def test_unreadable_latest_step_falls_back_and_is_moved_aside(tmp_path, two_steps, corrupt):
    run = two_steps["copy"](tmp_path / "run")
    ck_dir = run / "checkpoints"
    corrupt(ck_dir / "4")
    ckpt = Checkpointer(ck_dir, two_steps["cfg"].checkpoint)
    with pytest.warns(CheckpointWarning) as record:
        step, state = ckpt.restore_latest(two_steps["s2"], two_steps["shardings"])
    messages = [str(w.message) for w in record]
    assert step == 2 and _leaves_equal(state, two_steps["s2"])
    assert any(f"step 4 in {ck_dir} could not be restored (" in m for m in messages), messages
    moved = ck_dir / f"4{UNREADABLE_SUFFIX}"
    assert any("moved aside to " + str(moved) in m for m in messages), messages
    assert moved.is_dir() and not (ck_dir / "4").exists()  # kept, under a name that is not a step
    assert ckpt.steps() == [2]
    ckpt.save(4, two_steps["s4"])  # the step can be saved again
    ckpt.wait()
    assert ckpt.steps() == [2, 4] and moved.is_dir()
    ckpt.close()


def test_load_falls_back_to_the_previous_step_and_changes_nothing_on_disk(tmp_path, two_steps):
    run = two_steps["copy"](tmp_path / "run")
    _truncate_a_state_file(run / "checkpoints" / "4")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.warns(CheckpointWarning) as record:
        cfg, params = load(run)
    messages = [str(w.message) for w in record]
    assert any(f"step 4 in {run / 'checkpoints'} could not be restored (ValueError" in m for m in messages)
    assert any("restored step 2 instead of the unreadable step 4" in m and "left in place" in m for m in messages)
    assert cfg == two_steps["cfg"]
    assert _leaves_equal(params, two_steps["s2"].params)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before == ["2", "4"]
    with pytest.raises(Exception):  # an explicit step is not replaced by another one
        load(run, step=4)
    cfg2, params2 = load(run, step=2)
    assert _leaves_equal(params2, two_steps["s2"].params)


def test_load_reads_only_the_params_so_a_copy_without_the_optimizer_state_loads(tmp_path, two_steps, monkeypatch):
    """Step 4's state item is rewritten with the parameters alone (Adam's moments and the step counter gone): the
    full train state no longer restores from it, `load` still returns the same parameters, from a relative path."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    run = two_steps["copy"](tmp_path / "run")
    state_dir = run / "checkpoints" / "4" / "state"
    shutil.rmtree(state_dir)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(state_dir, {"params": two_steps["s4"].params})
        ckptr.wait_until_finished()
    ckpt = Checkpointer(run / "checkpoints", read_only=True)
    like = abstract_train_state(two_steps["cfg"].model, two_steps["tx"], two_steps["mesh"])[0]
    with pytest.raises(Exception):  # the optimizer state is really gone: a resume could not read this step
        ckpt.restore_state(4, like, two_steps["shardings"])
    ckpt.close()
    monkeypatch.chdir(tmp_path)
    cfg, params = load("run")
    assert cfg == two_steps["cfg"]
    assert _leaves_equal(params, two_steps["s4"].params)


def test_when_no_step_restores_the_error_lists_them_and_nothing_is_moved(tmp_path, two_steps):
    run = two_steps["copy"](tmp_path / "run")
    ck_dir = run / "checkpoints"
    # A changed model config fails on every step: that is not corruption, so nothing may be moved aside.
    other = tiny("model.d_model=64")
    state, shardings = abstract_train_state(other.model, two_steps["tx"], two_steps["mesh"])
    ckpt = Checkpointer(ck_dir, other.checkpoint)
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointRestoreError, match=r"step 4: .*step 2: "):
        ckpt.restore_latest(state, shardings)
    assert sorted(p.name for p in ck_dir.iterdir()) == ["2", "4"]
    ckpt.close()


def test_sigterm_flag_is_set_instead_of_dying_and_the_previous_handler_comes_back():
    from dlmjax.train.preemption import sigterm_flag

    sentinel = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, sentinel)
    try:
        with sigterm_flag() as flag:
            assert not flag.is_set()
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.time() + 5
            while not flag.is_set() and time.time() < deadline:
                time.sleep(0.01)
            assert flag.is_set()
        assert signal.getsignal(signal.SIGTERM) is sentinel
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- params-only exports ----------------------------------------------------------------------------------


def test_save_params_round_trip_refuses_overwrite_and_reports_damage(tmp_path, two_steps):
    cfg, state, other = two_steps["cfg"], two_steps["s2"], two_steps["s4"]
    out = save_params(tmp_path / "export", cfg, state.params)
    cfg2, params = load(out)
    assert cfg2 == cfg and _leaves_equal(params, state.params)
    with pytest.raises(ValueError, match="params-only export"):
        load(out, step=3)

    with pytest.raises(FileExistsError, match="exists"):
        save_params(out, cfg, other.params)
    assert _leaves_equal(load(out)[1], state.params)  # untouched

    partial = tmp_path / "partial"
    save_params(partial, cfg, state.params)
    (partial / "config.json").unlink()  # as if killed between the params commit and the config rename
    with pytest.raises(CheckpointRestoreError, match="incomplete params export"):
        load(partial)

    data_file = sorted(p for p in (out / "params").rglob("*") if p.is_file() and p.parent.name == "d")[0]
    with open(data_file, "r+b") as f:
        f.truncate(8)
    with pytest.raises(CheckpointRestoreError, match=re.escape(str(out))):
        load(out)


# -- restore into another mesh (8 simulated CPU devices, in a subprocess) ---------------------------------

_CROSS_MESH = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from dlmjax.checkpoint import Checkpointer
    from dlmjax.config import MeshConfig, load_config
    from dlmjax.sharding import make_mesh
    from dlmjax.train.state import abstract_train_state, make_optimizer

    assert jax.device_count() == 8
    cfg = load_config(sys.argv[2], json.loads(sys.argv[3]))
    tx = make_optimizer(cfg.optim, 10)

    def mesh_of(data, fsdp, tensor):
        return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))

    # A TrainState with distinct random values in every leaf, placed on a data=8 mesh (nothing to compile).
    like, shardings = abstract_train_state(cfg.model, tx, mesh_of(8, 1, 1))
    rng = np.random.default_rng(0)
    saved = jax.tree.map(lambda x: (rng.standard_normal(x.shape) * 100).astype(x.dtype), like)
    state = jax.device_put(saved, shardings)
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(7, state)
    ckpt.wait()
    ckpt.close()
    out = {"saved_wte_shard": list(state.params["wte"].addressable_shards[0].data.shape)}
    for name, sizes in {"fsdp4_tensor2": (1, 4, 2), "data2_fsdp4": (2, 4, 1)}.items():
        like, shardings = abstract_train_state(cfg.model, tx, mesh_of(*sizes))
        reader = Checkpointer(sys.argv[1], read_only=True)
        step, restored = reader.restore_latest(like, shardings)
        reader.close()
        leaves, targets = jax.tree.leaves(restored), jax.tree.leaves(shardings)
        out[name] = {
            "step": step,
            "equal": all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved), jax.device_get(leaves))),
            "shardings_match": all(x.sharding == s for x, s in zip(leaves, targets)),
            "mesh": dict(restored.params["wte"].sharding.mesh.shape),
            "wte_shard": list(restored.params["wte"].addressable_shards[0].data.shape),
            "mu_shard": list(restored.opt_state[1][0].mu["wte"].addressable_shards[0].data.shape),
        }
    print(json.dumps(out))
""")


def test_restore_into_the_shardings_of_another_mesh(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _CROSS_MESH, str(tmp_path / "ck"), DEMO, json.dumps(TINY)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["saved_wte_shard"] == [260, 32]  # data=8: parameters replicated
    # wte [vocab, embed] is P("tensor", "fsdp"); Adam's first moment follows its parameter.
    expected = {"fsdp4_tensor2": ({"data": 1, "fsdp": 4, "tensor": 2}, [130, 8]),
                "data2_fsdp4": ({"data": 2, "fsdp": 4, "tensor": 1}, [260, 8])}
    for name, (mesh, shard) in expected.items():
        got = out[name]
        assert got["step"] == 7 and got["equal"] and got["shardings_match"], (name, got)
        assert got["mesh"] == mesh and got["wte_shard"] == shard and got["mu_shard"] == shard, (name, got)


# -- SIGKILL / SIGTERM of `dlmjax train` ------------------------------------------------------------------

STEPS = 40
CLI_OVERRIDES = TINY + [f"train.steps={STEPS}", "checkpoint.every_steps=5", "checkpoint.max_to_keep=2"]
KILL_AFTER = 12  # a step past the checkpoint at 10 and before the one at 15 (if we are quick)


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _train_cmd(workdir):
    return [str(Path(sys.executable).with_name("dlmjax")), "train", "--config", DEMO, "--workdir", str(workdir),
            *CLI_OVERRIDES]


def _last_step(path):
    step = 0
    try:
        for line in path.read_text().splitlines():
            try:
                step = max(step, json.loads(line)["step"])
            except ValueError:  # a line being written
                pass
    except FileNotFoundError:
        pass
    return step


def _run(workdir, env, *, signal_at=None, sig=None):
    """Run `dlmjax train`; with `signal_at`, send `sig` once metrics.jsonl shows that step. -> (rc, out, err, seen)"""
    log = Path(str(workdir) + ".log")
    with open(log, "w") as err:
        proc = subprocess.Popen(_train_cmd(workdir), stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        seen = None
        if signal_at is not None:
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline:
                seen = _last_step(Path(workdir) / "metrics.jsonl")
                if seen >= signal_at:
                    proc.send_signal(sig)
                    break
                time.sleep(0.003)
        out, _ = proc.communicate(timeout=300)
    return proc.returncode, out, log.read_text(), seen


def _losses(workdir):
    return {r["step"]: r["loss"] for r in _records(workdir)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cli_env):
    """Per-step losses of an uninterrupted `dlmjax train`."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    rc, out, err, _ = _run(workdir, cli_env)
    assert rc == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["preempted"] is False
    losses = _Losses(_losses(workdir))
    assert sorted(losses) == list(range(1, STEPS + 1))
    losses.workdir = workdir
    return losses


class _Losses(dict):
    workdir: Path


def _events(path):
    """(step, has session_log) of every record of a TensorBoard event file."""
    from tensorboardX.proto.event_pb2 import Event

    data, i, out = path.read_bytes(), 0, []
    while i + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        ev = Event.FromString(data[i + 12:i + 12 + n])
        out.append((ev.step, ev.HasField("session_log")))
        i += 12 + n + 4
    return out


def test_sigkill_then_rerun_reproduces_the_uninterrupted_losses_bitwise(tmp_path, cli_env, reference):
    workdir = tmp_path / "run"
    rc, _, err, seen = _run(workdir, cli_env, signal_at=KILL_AFTER, sig=signal.SIGKILL)
    assert rc == -signal.SIGKILL, err[-3000:]
    assert KILL_AFTER <= seen < STEPS
    committed = Checkpointer(workdir / "checkpoints", read_only=True).steps()
    assert committed and max(committed) < STEPS, committed  # killed mid-run
    killed_records = len(_records(workdir))
    tb_before = set((workdir / "tensorboard").iterdir())

    rc, out, err, _ = _run(workdir, cli_env)
    assert rc == 0, err[-3000:]
    resumed = int(re.search(r"resumed from step (\d+)", err).group(1))
    assert resumed == max(committed)
    if killed_records > resumed:
        assert f"dropped {killed_records - resumed} records of steps after {resumed}" in err
    losses = [(r["step"], r["loss"]) for r in _records(workdir)]
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))  # one record per step: no stale ones left
    assert dict(losses) == reference  # bitwise: floats round-trip exactly through JSON
    # TensorBoard: the resumed run's event file starts by purging the steps after the restored one.
    (new_events,) = set((workdir / "tensorboard").iterdir()) - tb_before
    assert (resumed + 1, True) in _events(new_events)[:3]


def test_sigterm_saves_the_current_step_and_the_rerun_continues_bitwise(tmp_path, cli_env, reference):
    workdir = tmp_path / "run"
    rc, out, err, seen = _run(workdir, cli_env, signal_at=KILL_AFTER, sig=signal.SIGTERM)
    assert rc == PREEMPTED_EXIT_STATUS == 143, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    stopped = result["step"]
    assert result["preempted"] is True and seen <= stopped < STEPS
    assert f"preempted (SIGTERM) at step {stopped}: checkpoint {stopped} committed" in err
    assert "exact_match" not in result  # final evaluation skipped
    assert Checkpointer(workdir / "checkpoints", read_only=True).latest_step() == stopped
    assert [r["step"] for r in _records(workdir)] == list(range(1, stopped + 1))  # metrics flushed to the stop

    rc, out, err, _ = _run(workdir, cli_env)
    assert rc == 0, err[-3000:]
    assert f"resumed from step {stopped} in" in err and "dropped" not in err
    assert json.loads(out.strip().splitlines()[-1])["preempted"] is False
    losses = [(r["step"], r["loss"]) for r in _records(workdir)]
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    assert dict(losses) == reference


def test_training_resumes_from_the_previous_step_when_the_latest_is_unreadable(tmp_path, cli_env, reference):
    workdir = tmp_path / "run"
    shutil.copytree(reference.workdir, workdir)
    ck_dir = workdir / "checkpoints"
    assert Checkpointer(ck_dir, read_only=True).steps() == [STEPS - 5, STEPS]
    _truncate_a_state_file(ck_dir / str(STEPS))
    rc, out, err, _ = _run(workdir, cli_env)
    assert rc == 0, err[-3000:]
    assert f"checkpoint step {STEPS} in {ck_dir} could not be restored" in err
    assert f"resumed from step {STEPS - 5} in {ck_dir}" in err
    # Stale: the train records of the 5 recomputed steps and the final evaluation.
    assert f"dropped 6 records of steps after {STEPS - 5}" in err
    losses = [(r["step"], r["loss"]) for r in _records(workdir)]
    assert [s for s, _ in losses] == list(range(1, STEPS + 1)) and dict(losses) == reference
    assert len(_records(workdir, "final")) == 1
    assert (ck_dir / f"{STEPS}{UNREADABLE_SUFFIX}").is_dir()  # moved aside, not deleted
    assert Checkpointer(ck_dir, read_only=True).steps() == [STEPS - 5, STEPS]
