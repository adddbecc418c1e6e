"""Adaptation from an AR model (`dlmjax.train.adapt`): `train.init_from` and `diffusion.block_schedule`.

Step 0 of a run started from an AR checkpoint at block size 1 makes the AR model's next-token predictions (an
in-stack AR run, and a converted Hugging Face Dream/Qwen2 folder under the token shift); the schedule's block size
per step follows its table, compiles one train step per distinct size, and resumes across a phase boundary bit
for bit; bad values are refused in one line before any work.
"""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDEN, REPO, TINY_RUN, compiles, tiny_run_config
from dlmjax.checkpoint import load
from dlmjax.config import ConfigError, load_config, replace
from dlmjax.data import load_data
from dlmjax.sharding import make_mesh
from dlmjax.train import adapt
from dlmjax.train.loop import train_and_evaluate
from dlmjax.train.objective import bd3_loss_terms, diffusion_loss
from dlmjax.train.state import abstract_train_state, init_train_state_from, make_optimizer
from dlmjax.train.step import as_batch
from kernels_pallas.masks import Causal, Full
from dlmjax.models.transformer import build_model

AR_CONFIG = str(REPO / "configs" / "addition_ar.yaml")
loss_terms = jax.jit(bd3_loss_terms, static_argnames=("model_cfg", "diff_cfg"))
ADAPTED_CONFIG = str(REPO / "configs" / "addition_adapted.yaml")
# Phase boundaries at steps 2 and 4; checkpoints at 3 and 6, so the resume from 3 crosses the boundary at 4.
SCHEDULE = [[2, 1], [4, 2], [6, 4]]


def _metrics(workdir, key):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if r["split"] == "train"}


def _adapted(*extra):
    return tiny_run_config("train.steps=6", "checkpoint.every_steps=3", f"diffusion.block_schedule={SCHEDULE}",
                           "data.eval_size=4", *extra, base=ADAPTED_CONFIG)


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    """A 2-step in-stack AR run (bd3, block size 1, t = 1) of the tiny demo model."""
    workdir = tmp_path_factory.mktemp("ar") / "run"
    cfg = tiny_run_config("train.steps=2", "checkpoint.every_steps=2", "data.eval_size=4", base=AR_CONFIG)
    train_and_evaluate(cfg, workdir, show_examples=0)
    return workdir


def test_block_size_per_step_follows_the_table():
    d = _adapted().diffusion
    table = [size for (until, size), start in zip(SCHEDULE, [0] + [u for u, _ in SCHEDULE]) for _ in
             range(start, until)]  # the table written out step by step
    assert [adapt.block_size_at(d, s) for s in range(6)] == table == [1, 1, 2, 2, 4, 4]
    assert adapt.block_sizes(d, 0, 6) == (1, 2, 4) and adapt.block_sizes(d, 3, 6) == (2, 4)
    assert adapt.block_sizes(d, 4, 6) == (4,) and adapt.block_sizes(d, 6, 6) == ()
    plain = replace(_adapted(), diffusion={"block_schedule": []}).diffusion
    assert [adapt.block_size_at(plain, s) for s in range(3)] == [4, 4, 4] and adapt.block_sizes(plain, 0, 9) == (4,)


def test_the_shipped_config_warms_up_from_the_ar_block_and_ends_at_the_sampling_block():
    cfg = load_config(ADAPTED_CONFIG)
    d = cfg.diffusion
    assert cfg.train.init_from and d.objective == "bd3" and d.block_size == 4
    assert adapt.block_size_at(d, 0) == 1 and adapt.block_size_at(d, cfg.train.steps - 1) == 4
    assert max(size for _, size in d.block_schedule) == cfg.data.seq_len  # the stable phase trains the full row
    assert load_config(AR_CONFIG).model == cfg.model  # what init_from requires of the AR run it names


def test_adapted_run_step0_reproduces_the_ar_model_then_follows_the_schedule_and_resumes_exactly(ar_run, tmp_path):
    """One adapted run (init_from the AR run, schedule 1 -> 2 -> 4) checked four ways: its step-0 loss is the AR
    model's loss on the same batch and noise; every step reports the block size of the table; one compile per
    distinct size; losing the last checkpoint and resuming from step 3 (across the boundary at 4, with the AR
    source gone: a resume ignores init_from) ends on bitwise the same parameters."""
    source = tmp_path / "ar"
    shutil.copytree(ar_run, source)
    workdir = tmp_path / "adapted"
    cfg = _adapted(f"train.init_from={source}")
    with compiles("train_step") as first:
        train_and_evaluate(cfg, workdir, show_examples=0)
    assert first.count == 3  # block sizes 1, 2 and 4
    sizes = _metrics(workdir, "block_size")  # reported by the compiled step itself (record s: step s - 1)
    assert [sizes[s] for s in range(1, 7)] == [adapt.block_size_at(cfg.diffusion, s - 1) for s in range(1, 7)]

    # Step 0 = the AR model (its last checkpoint) on the first batch with the step-0 key of seed train.seed, at
    # the schedule's first block size. The train step computes the loss inside its gradient: float32 round-off.
    _, ar_params = load(source)
    batch = as_batch(next(iter(load_data(cfg).train)))
    rng = jax.random.fold_in(jax.random.split(jax.random.PRNGKey(cfg.train.seed))[1], 0)
    expected, _ = jax.jit(diffusion_loss, static_argnames=("model_cfg", "diff_cfg"))(
        ar_params, batch, rng, model_cfg=cfg.model, diff_cfg=adapt.diffusion_at(cfg.diffusion, 1))
    assert _metrics(workdir, "loss")[1] == pytest.approx(float(expected), rel=2e-6)

    _, final = load(workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")
    shutil.rmtree(source)
    with compiles("train_step") as resumed:
        train_and_evaluate(cfg, workdir, show_examples=0)
    assert resumed.count == 2  # steps 3..5 use sizes 2 and 4
    _, again = load(workdir)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _metrics(workdir, "block_size") == sizes


def _naive_ar_logits(model_cfg, params, x0, mask_id):
    """f32[B, L, V]: slot i's prediction from a separate forward over `x0[:i] + [mask]` (keys after i masked off),
    the bidirectional model with no block machinery: what an AR model trained as bd3 block 1 predicts."""
    b, length = x0.shape
    model = build_model(model_cfg, Full())
    eye = np.eye(length, dtype=bool)
    tokens = np.where(eye[:, None, :], mask_id, np.asarray(x0)[None])  # [L(i), B, L]
    key_mask = np.broadcast_to(np.tril(np.ones((length, length), bool))[:, None, :], (length, b, length))
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (length * b, length))
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens.reshape(length * b, length)),
                                  positions=jnp.asarray(positions),
                                  key_mask=jnp.asarray(key_mask.reshape(length * b, length)))
    logits = np.asarray(logits).reshape(length, b, length, -1)
    return np.stack([logits[i, :, i] for i in range(length)], axis=1)


def test_in_stack_adapted_model_at_block_1_makes_the_ar_models_next_token_predictions(ar_run):
    """Loss terms and logits of the adapted run's step-0 objective (block 1, parameters read through init_from)
    equal the AR run's on the same batch and noise bitwise, and equal a naive per-slot recomputation of the AR
    prediction to float32 round-off (1e-5)."""
    cfg = _adapted(f"train.init_from={ar_run}", "data.batch_size=4")
    source = adapt.check_init_from(cfg)
    assert source.kind == "run"
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    _, shardings = abstract_train_state(cfg.model, tx, mesh, cfg.mesh.rules)
    state = init_train_state_from(adapt.load_init_params(source, cfg, mesh, shardings.params), tx, cfg.train.seed,
                                  shardings)
    assert int(state.step) == 0
    assert all(not np.any(np.asarray(m)) for m in jax.tree.leaves(state.opt_state) if np.ndim(m))  # fresh moments
    ar_cfg, ar_params = load(ar_run)
    batch = as_batch(next(iter(load_data(cfg).train)))
    x0 = batch["tokens"]
    t = jnp.ones(x0.shape, jnp.float32)  # every answer slot masked: each one is a next-token prediction
    u = jax.random.uniform(jax.random.PRNGKey(1), x0.shape)
    adapted_terms = loss_terms(state.params, batch, t, u, model_cfg=cfg.model,
                                   diff_cfg=adapt.diffusion_at(cfg.diffusion, adapt.block_size_at(cfg.diffusion, 0)))
    ar_terms = loss_terms(ar_params, batch, t, u, model_cfg=ar_cfg.model, diff_cfg=ar_cfg.diffusion)
    np.testing.assert_array_equal(np.asarray(adapted_terms[0]), np.asarray(ar_terms[0]))
    for key in ("nll", "scored", "logits"):
        np.testing.assert_array_equal(np.asarray(adapted_terms[1][key]), np.asarray(ar_terms[1][key]))
    scored = np.asarray(adapted_terms[1]["scored"])
    assert scored.sum() >= 4 * 4  # the answer slots of every row
    naive = _naive_ar_logits(cfg.model, ar_params, x0, cfg.diffusion.mask_id)
    np.testing.assert_allclose(np.asarray(adapted_terms[1]["logits"])[scored], naive[scored], rtol=1e-5, atol=1e-5)


def test_converted_dream_folder_at_block_1_makes_the_causal_next_token_predictions(tmp_path):
    """A Hugging Face Dream (Qwen2 layout) folder converted with `dlmjax convert`, used as init_from of a bd3 run
    with block size 1 at step 0: the objective's prediction for slot i is the imported model's causal forward at
    row i - 1 (raw logits shifted by one), and its per-token loss the causal next-token cross-entropy (SUBS: the
    mask logit left out). Tolerance: float32 round-off (1e-5), two different attention layouts."""
    from dlmjax.interchange import convert_from_hf, import_hf

    converted = convert_from_hf(GOLDEN / "tiny_dream", "dream", tmp_path / "converted")
    base = json.loads((converted / "config.json").read_text())
    base["train"] = {"steps": 4, "init_from": str(converted)}
    base["diffusion"].update(objective="bd3", block_size=4, clip_min=1.0, clip_max=1.0,
                             block_schedule=[[1, 1], [4, 4]])
    base["data"].update(seq_len=16)
    from dlmjax.config import config_from_dict

    cfg = config_from_dict(base)
    assert cfg.model.arch == "dream"
    source = adapt.check_init_from(cfg)
    assert source.kind == "export"
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    _, shardings = abstract_train_state(cfg.model, tx, mesh, cfg.mesh.rules)
    params = init_train_state_from(adapt.load_init_params(source, cfg, mesh, shardings.params), tx, cfg.train.seed,
                                   shardings).params
    diff0 = adapt.diffusion_at(cfg.diffusion, adapt.block_size_at(cfg.diffusion, 0))
    assert diff0.block_size == 1

    b, length, mask_id = 2, 16, cfg.diffusion.mask_id
    x0 = jax.random.randint(jax.random.PRNGKey(3), (b, length), 0, 490)  # no special / mask tokens
    batch = {"tokens": x0, "prompt_mask": jnp.zeros((b, length), bool).at[:, :2].set(True),
             "valid_mask": jnp.ones((b, length), bool)}
    t = jnp.ones((b, length), jnp.float32)
    u = jax.random.uniform(jax.random.PRNGKey(4), (b, length))
    _, aux = loss_terms(params, batch, t, u, model_cfg=cfg.model, diff_cfg=diff0)

    hf_cfg, hf_params, _ = import_hf(GOLDEN / "tiny_dream", "dream")
    raw = np.asarray(jax.jit(build_model(hf_cfg.model, Causal()).apply)({"params": hf_params}, x0), np.float32)
    scored = np.asarray(aux["scored"])
    np.testing.assert_array_equal(scored, np.broadcast_to(np.arange(length) >= 2, (b, length)))
    np.testing.assert_allclose(np.asarray(aux["logits"])[:, 1:], raw[:, :-1], rtol=1e-5, atol=1e-5)
    subs = raw.copy()
    subs[..., mask_id] = -np.inf
    logp = jax.nn.log_softmax(jnp.asarray(subs[:, :-1]), axis=-1)
    want = -np.take_along_axis(np.asarray(logp), np.asarray(x0)[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(aux["nll"])[:, 1:][scored[:, 1:]], want[scored[:, 1:]], rtol=1e-5,
                               atol=1e-5)


# ---- bad values: one line, before any work ------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, words", [
    ("[[4, 1], [2, 4]]", "until_step 2 must be larger"),
    ("[[2, 3], [6, 4]]", "block size 3 must divide data.seq_len=16"),
    ("[[2, 1], [5, 4]]", "must cover train.steps=6"),
    ("[[2, 1], [6, 2]]", "last block size 2 must equal diffusion.block_size=4"),
    ("[[2, 0], [6, 4]]", "of ints >= 1"),
    ("7", "must be a list of [until_step, block_size] pairs"),
])
def test_a_bad_block_schedule_is_one_line_naming_the_field(schedule, words):
    with pytest.raises(ConfigError) as e:
        _adapted(f"diffusion.block_schedule={schedule}")
    message = str(e.value)
    assert "diffusion.block_schedule" in message and words in message and "\n" not in message
    assert e.value.field == "diffusion.block_schedule"
    with pytest.raises(ConfigError, match=r"^diffusion.block_schedule applies to diffusion.objective=bd3"):
        tiny_run_config("diffusion.block_schedule=[[6, 16]]", "train.steps=6")


def test_bad_init_from_exits_2_with_one_line_before_any_work(ar_run, tmp_path, capsys):
    from dlmjax.cli import main

    run = ["train", "--config", ADAPTED_CONFIG, *TINY_RUN, "train.steps=6", f"diffusion.block_schedule={SCHEDULE}"]
    cases = [
        (tmp_path / "missing", "does not exist", {}),
        (GOLDEN / "tiny_dream", "convert it first", {}),  # a Hugging Face folder, not converted
        (ar_run, "model.d_model=32 there, 64 here", {"model.d_model=64", "model.mlp_hidden=64"}),
        (ar_run, "model.n_layers=1 there, 2 here", {"model.n_layers=2"}),
    ]
    for i, (source, words, extra) in enumerate(cases):
        workdir = tmp_path / f"run{i}"
        rc = main([*run, f"train.init_from={source}", *sorted(extra), "--workdir", str(workdir)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "train.init_from" in err[0] and words in err[0], err
        assert not list(workdir.rglob("*.json*")) and not (workdir / "checkpoints").exists()  # nothing written
