"""Scale-out: sharded training and sampling on 8 simulated CPU devices, the rules table in the config, the
replicated-parameter report, and `dlmjax plan` on abstract meshes.

The 8-device checks run in one subprocess (XLA_FLAGS must be set before jax initialises, and other test
modules have initialised it in this process); everything else runs on abstract meshes in this process.
"""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dlmjax.cli import main
from dlmjax.config import LOGICAL_RULES, ConfigError, load_config
from dlmjax.sharding import abstract_mesh, replicated_report
from dlmjax.train.state import make_optimizer, param_specs, state_shardings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.mlp_hidden=64",
        "model.max_seq_len=16", "data.batch_size=8", "data.eval_size=8", "optim.warmup_steps=1", "optim.lr=3e-3"]

_EIGHT_DEVICES = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from dlmjax import Denoiser
    from dlmjax.config import MeshConfig, load_config
    from dlmjax.sampling import SamplerSettings
    from dlmjax.sampling import generate_masked as generate
    from dlmjax.sharding import batch_sharding, make_mesh
    from dlmjax.data import load_data
    from dlmjax.train.state import init_train_state, make_optimizer
    from dlmjax.train.step import as_batch, make_train_step

    assert jax.device_count() == 8
    cfg = load_config(None, json.loads(sys.argv[1]))
    rules = cfg.mesh.rules
    tx = make_optimizer(cfg.optim, 10)
    it = iter(load_data(cfg)[0])
    batches = [as_batch(next(it)) for _ in range(3)]

    def run(mesh):
        state, shardings = init_train_state(cfg.model, tx, 0, mesh, rules)
        bsh = batch_sharding(mesh, rules)
        step = make_train_step(tx, cfg.model, cfg.diffusion, shardings, bsh, rules)
        losses = []
        for b in batches:
            state, metrics = step(state, jax.device_put(b, bsh))
            losses.append(float(metrics["loss"]))
        return state, losses

    single, single_losses = run(make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    sharded, sharded_losses = run(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    p1, p8 = jax.device_get(single.params), sharded.params
    wte = p8["wte"].sharding.shard_shape(p8["wte"].shape)
    param_err = max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in
                    zip(jax.tree.leaves(p1), jax.tree.leaves(jax.device_get(p8))))

    settings = SamplerSettings.llada(gen_length=8, steps=8, mask_id=cfg.diffusion.mask_id)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 250, (4, 6)), jnp.int32)
    rng = jax.random.PRNGKey(3)
    denoiser = Denoiser(cfg.model)
    tokens_single, _ = generate(denoiser, p1, prompt, settings, rng)
    tokens_sharded, _ = generate(denoiser, p8, prompt, settings, rng)
    print(json.dumps({
        "single_losses": single_losses, "sharded_losses": sharded_losses, "param_err": param_err,
        "wte_shard": list(wte), "q_spec": str(p8["blocks_0"]["q_proj"]["kernel"].sharding.spec),
        "tokens_equal": bool(np.array_equal(np.asarray(tokens_single), np.asarray(tokens_sharded))),
        "tokens": np.asarray(tokens_sharded).tolist(), "mask_id": cfg.diffusion.mask_id,
    }))
""")


@pytest.fixture(scope="module")
def eight_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, json.dumps(TINY)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_train_step_matches_one_device(eight_devices):
    out = eight_devices
    assert out["wte_shard"] == [130, 16]  # vocab over tensor, embed over fsdp: really sharded
    assert out["q_spec"] == "P('fsdp', 'tensor')"
    assert len(out["sharded_losses"]) == 3
    for a, b in zip(out["single_losses"], out["sharded_losses"]):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-5)
    assert out["param_err"] < 1e-5


def test_generate_with_sharded_params_matches_unsharded(eight_devices):
    out = eight_devices
    assert out["tokens_equal"]
    assert all(t != out["mask_id"] for row in out["tokens"] for t in row[6:])  # every slot was committed


def _report(overrides, sizes=(2, 2, 2), min_size=1000):
    cfg = load_config(None, TINY + list(overrides) + [f"mesh.data={sizes[0]}", f"mesh.fsdp={sizes[1]}",
                                                      f"mesh.tensor={sizes[2]}"])
    mesh = abstract_mesh(cfg.mesh, math.prod(sizes))
    shardings = state_shardings(cfg.model, make_optimizer(cfg.optim, 10), mesh, cfg.mesh.rules)
    params, logical = param_specs(cfg.model)
    return replicated_report(params, shardings.params, mesh, logical_specs=logical, rules=cfg.mesh.rules,
                             min_size=min_size)


def test_default_rules_leave_no_parameter_replicated():
    assert _report([]) == []  # every kernel >= 1000 elements is split; only the 32-wide norms are replicated
    assert _report([], sizes=(8, 1, 1)) == []  # pure data parallelism: full copies are the plan


def test_bad_rules_are_reported():
    # vocab 261 is odd: the tensor split of wte and the head falls back, and nothing else splits them.
    bad = "mesh.rules=[[batch, [data, fsdp]], [vocab, tensor], [mlp, tensor]]"
    report = {r.path: r for r in _report(["model.vocab_size=261", bad])}
    assert "fell back to replicated" in report["wte"].reason and "vocab" in report["wte"].reason
    assert "fell back to replicated" in report["ff_out"].reason
    # heads/embed unmapped: the 32 x 32 attention kernels (1024 elements) are replicated and over min_size.
    assert "min_size" in report["blocks_0/q_proj/kernel"].reason
    assert "blocks_0/ff_proj/kernel" not in report  # split over tensor by mlp
    assert str(report["wte"]).startswith("replicated parameter wte [261, 32] float32: ")


@pytest.mark.parametrize("rules, pattern", [
    ("[[embed, fsdpp]]", r"mesh.rules\[0\]=\['embed', 'fsdpp'\]: unknown mesh axis 'fsdpp'; mesh axes are"),
    ("[[embed, fsdp], [vocab, null], [embed, tensor]]",
     r"mesh.rules\[2\]=\['embed', 'tensor'\]: logical axis 'embed' is already mapped by mesh.rules\[0\]"),
    ("[[embd, fsdp]]", r"mesh.rules\[0\]=\['embd', 'fsdp'\]: unknown logical axis 'embd'"),
    ("[[batch, [data, data]]]", r"mesh.rules\[0\].*a mesh axis appears twice"),
    ("[[batch]]", r"mesh.rules\[0\]=\['batch'\] must be a pair"),
    ("fsdp", r"mesh.rules='fsdp' must be a list"),
])
def test_rules_validation_names_the_entry(rules, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [f"mesh.rules={rules}"])


def test_rules_default_yaml_and_round_trip(tmp_path):
    from dlmjax.config import config_from_dict

    assert load_config(None).mesh.rules == LOGICAL_RULES
    path = tmp_path / "r.yaml"
    path.write_text("mesh:\n  fsdp: 4\n  rules:\n    - [batch, [data, fsdp]]\n    - [embed, fsdp]\n"
                    "    - [vocab, null]\n    - [mlp, [tensor]]\n")
    cfg = load_config(path)
    assert cfg.mesh.rules == (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("vocab", None), ("mlp", "tensor"))
    assert config_from_dict(json.loads(cfg.to_json())) == cfg  # as stored in a checkpoint's config.json


def test_plan_llada_8b_on_256_devices_matches_the_closed_form(capsys):
    assert main(["plan", "--config", str(CONFIGS / "llada_8b.yaml"), "--devices", "256", "--platform", "tpu"]) == 0
    text = capsys.readouterr().out
    out = json.loads(text.strip().splitlines()[-1])
    assert "parameters" in text and "activations (est.)" in text
    m = load_config(CONFIGS / "llada_8b.yaml").model
    d, v, f = m.d_model, m.vocab_size, m.mlp_hidden
    kv = m.num_kv_heads * m.head_dim
    n_params = 2 * v * d + m.n_layers * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d  # embed, head, blocks, ln_f
    assert out["n_params"] == n_params and abs(n_params - 8.0e9) < 0.1e9
    assert out["param_bytes_total"] == 2 * n_params  # bfloat16
    shards = out["mesh"]["fsdp"] * out["mesh"]["tensor"]
    assert out["param_bytes"] == pytest.approx(2 * n_params / shards, rel=0.05)
    assert out["opt_bytes"] == pytest.approx(2 * out["param_bytes"], rel=0.05)  # Adam's mu and nu, bfloat16
    assert out["replicated"] == [] and out["problems"] == []
    assert out["total_bytes"] < out["hbm_bytes"]


def test_plan_flags_an_uneven_batch_and_too_little_memory(capsys):
    assert main(["plan", "--config", str(CONFIGS / "llada_8b.yaml"), "--devices", "256", "data.batch_size=100",
                 "model.remat=false"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert any("not divisible by data*fsdp=256" in p for p in out["problems"])
    assert any("exceeds" in p for p in out["problems"])
    assert main(["plan", "--config", str(CONFIGS / "llada_8b.yaml"), "--devices", "100"]) == 2  # 256 != 100
