"""Sharded, low-precision inference: `dlmjax.load` / `open_run` / `dlmjax sample` with a mesh and a dtype, both
samplers on 8 simulated devices against one device, bfloat16 logits against float32 on a converted golden
checkpoint, `dlmjax plan --sample` against a hand computation, and the `--mesh` / `--dtype` flag errors.

The 8-device checks run in one subprocess (XLA_FLAGS must be set before jax initialises, and other test modules
have initialised it in this process), on meshes fsdp=8 and fsdp=2 x tensor=4.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import GOLDEN, tiny_model_config

from dlmjax.cli import main

TESTS = Path(__file__).resolve().parent
LLADA_8B = str(TESTS.parent / "configs" / "llada_8b.yaml")
MESHES = ("fsdp=8,tensor=1", "fsdp=2,tensor=4")
MASKED_CASES = ("none", "prefix", "dual", "dual+threshold")

_EIGHT_DEVICES = textwrap.dedent("""
    import io, json, re, sys, tempfile, contextlib
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp, numpy as np
    from conftest import GOLDEN, tiny_model_config
    import dlmjax
    from dlmjax.checkpoint import load, save_params
    from dlmjax.cli import _mesh_config, _mesh_sizes, main as cli
    from dlmjax.config import Config, DataConfig, DiffusionConfig
    from dlmjax.interchange import convert_from_hf
    from dlmjax.models.specs import param_shardings
    from dlmjax.models.transformer import init_params
    from dlmjax.sampling import (BlockSamplerSettings, Denoiser, SamplerSettings, SpecialTokens, generate_blocks,
                                 generate_masked)
    from dlmjax.sampling.plan import make_sample_plan
    from dlmjax.sharding import make_mesh

    assert jax.device_count() == 8
    meshes, masked_cases = json.loads(sys.argv[2]), json.loads(sys.argv[3])
    tmp = Path(tempfile.mkdtemp())
    MASK = 39
    data = DataConfig(kind="text", path="unused", seq_len=32, batch_size=8)
    masked_cfg = Config(model=tiny_model_config(), diffusion=DiffusionConfig(objective="llada", mask_id=MASK),
                        data=data)
    bd3_cfg = Config(model=tiny_model_config(), diffusion=DiffusionConfig(objective="bd3", block_size=4,
                                                                          mask_id=MASK), data=data)
    masked_params = init_params(masked_cfg.model, jax.random.PRNGKey(0))
    # A 5x sharper output head: confidences above 0.9, so that the threshold rule commits several slots per step.
    masked_params["ff_out"] = masked_params["ff_out"] * 5
    save_params(tmp / "masked", masked_cfg, masked_params)
    save_params(tmp / "bd3", bd3_cfg, init_params(bd3_cfg.model, jax.random.PRNGKey(1)))
    golden = convert_from_hf(GOLDEN / "tiny_llada", "llada", tmp / "golden")

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 38, n).tolist() for n in (5, 9, 12)]
    tokens = SpecialTokens(mask_id=MASK)

    def masked_settings(case):
        cache, _, rule = case.partition("+")
        return SamplerSettings.llada(gen_length=16, steps=16, block_length=8, cache=cache,
                                     threshold=0.9 if rule else None, tokens=tokens)

    block_settings = BlockSamplerSettings.bd3(max_length=32, block_length=4, tokens=tokens)
    key = jax.random.PRNGKey(3)

    def sample_all(mesh):
        _, p = load(tmp / "masked", mesh=mesh)
        _, pb = load(tmp / "bd3", mesh=mesh)
        out = {}
        for case in masked_cases:
            result = dlmjax.generate(masked_cfg, p, rows, masked_settings(case), key)
            out[case], out[case + " nfe"] = result.tokens.tolist(), result.nfe
        out["block"] = dlmjax.generate(bd3_cfg, pb, rows, block_settings, key).tokens.tolist()
        return out, p, pb

    def same_shardings(params, cfg, mesh):
        _, want = param_shardings(cfg.model, mesh, cfg.mesh.rules)
        return all(a.sharding.is_equivalent_to(w, a.ndim) and a.sharding.mesh.devices.size == 8
                   for a, w in zip(jax.tree.leaves(params), jax.tree.leaves(want)))

    def shard_bytes(params):
        return sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(params))

    def entry_gathers(compiled, params):
        # all-gathers in the top-level computation (outside every loop) whose result has a parameter's full shape
        shapes = {tuple(a.shape) for a in jax.tree.leaves(params) if a.ndim >= 2}
        entry = compiled.as_text().split("\\nENTRY", 1)[1].split("\\n}", 1)[0]
        found = []
        for line in entry.splitlines():
            if re.search(r" all-gather(-start)?\\(", line):
                result = line.split("all-gather", 1)[0]
                dims = [tuple(int(d) for d in s.split(",") if d) for s in re.findall(r"\\[([0-9,]*)\\]", result)]
                found += [d for d in dims if d in shapes]
        return found

    def compiled_checks(mesh_text, p, pb):
        # What the jitted programs take and hold: the parameters' own shardings, one shard per device.
        prompt = jnp.asarray(np.random.default_rng(1).integers(0, 38, (3, 16)), jnp.int32)
        masked = generate_masked.trace(Denoiser(masked_cfg.model), p, prompt, masked_settings("dual+threshold"),
                                       key).lower().compile()
        block = generate_blocks.trace(Denoiser(bd3_cfg.model), pb, prompt, block_settings, key).lower().compile()
        out = {}
        for name, compiled, params in (("masked", masked, p), ("block", block, pb)):
            taken = jax.tree.leaves(compiled.input_shardings[0][1])
            out[name] = {
                "input_shardings_kept": all(s.is_equivalent_to(a.sharding, a.ndim)
                                            for s, a in zip(taken, jax.tree.leaves(params))),
                "argument_bytes": compiled.memory_analysis().argument_size_in_bytes,
                "param_shard_bytes": shard_bytes(params),
                "param_bytes": sum(a.nbytes for a in jax.tree.leaves(params)),
                "entry_param_gathers": entry_gathers(compiled, params)}
        sizes = _mesh_sizes(mesh_text)
        plan = make_sample_plan(Config(model=masked_cfg.model, diffusion=masked_cfg.diffusion, data=data,
                                       mesh=_mesh_config(sizes)), 8, "cpu", dtype="float32")
        out["plan_param_bytes"] = plan.param_bytes
        return out

    def cli_tokens(*extra):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            status = cli(["sample", "--checkpoint", str(golden), "--prompt-ids", "5,6,7,8;9,10", "--gen-length", "8",
                          "--steps", "8", "--block-length", "4", "--cache", "dual", "--dtype", "float32", "--json",
                          *extra])
        return status, json.loads(buf.getvalue().strip().splitlines()[-1])["tokens"] if status == 0 else None

    reference, _, _ = sample_all(None)  # the default: one device
    report = {"reference": reference, "meshes": {}}
    status, report["cli_reference"] = cli_tokens()
    for mesh_text in meshes:
        mesh = make_mesh(_mesh_config(_mesh_sizes(mesh_text)))
        sampled, p, pb = sample_all(mesh)
        run = dlmjax.open_run(golden, mesh=mesh, dtype="bfloat16")
        _, golden_params = load(golden, mesh=mesh)
        status, cli_out = cli_tokens("--mesh", mesh_text)
        report["meshes"][mesh_text] = {
            "tokens": sampled, "shardings": {"masked": same_shardings(p, masked_cfg, mesh),
                                            "bd3": same_shardings(pb, bd3_cfg, mesh),
                                            "converted": same_shardings(golden_params, run.config, mesh),
                                            "open_run": same_shardings(run.params, run.config, mesh)},
            "open_run_dtypes": sorted({str(a.dtype) for a in jax.tree.leaves(run.params)}),
            "open_run_model_dtypes": [run.config.model.dtype, run.config.model.param_dtype],
            "cli_status": status, "cli_tokens": cli_out, "compiled": compiled_checks(mesh_text, p, pb)}
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def eight_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, str(TESTS), json.dumps(MESHES),
                           json.dumps(MASKED_CASES)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", MESHES)
def test_load_and_open_run_place_parameters_straight_into_their_shardings(eight_devices, mesh):
    """A trained export, a bd3 export and a converted Hugging Face checkpoint (`dlmjax convert`) land in the
    NamedShardings of the run's rules on the 8-device mesh; `open_run(..., dtype="bfloat16")` casts them."""
    out = eight_devices["meshes"][mesh]
    assert out["shardings"] == {"masked": True, "bd3": True, "converted": True, "open_run": True}
    assert out["open_run_dtypes"] == ["bfloat16"] and out["open_run_model_dtypes"] == ["bfloat16", "bfloat16"]


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("case", MASKED_CASES + ("block",))
def test_sharded_samplers_give_the_tokens_of_one_device(eight_devices, mesh, case):
    """Masked sampler (no cache, prefix and dual caches, with and without Fast-dLLM's threshold rule) and the BD3
    block sampler, on ragged prompts (5, 9 and 12 tokens), float32: the same tokens as on one device."""
    sharded, reference = eight_devices["meshes"][mesh]["tokens"], eight_devices["reference"]
    assert sharded[case] == reference[case]
    if case == "block":  # every slot is committed: the block sampler never proposes [MASK] (the masked sampler,
        assert all(t != 39 for row in sharded[case] for t in row[16:])  # as LLaDA's reference, may)
    else:
        assert sharded[case + " nfe"] == reference[case + " nfe"]
    if case == "dual+threshold":  # the threshold rule commits several slots per step here
        assert reference[case + " nfe"] < reference["dual nfe"]


@pytest.mark.parametrize("mesh", MESHES)
def test_cli_sample_with_mesh_and_dtype_matches_one_device(eight_devices, mesh):
    """`dlmjax sample --mesh ... --dtype float32 --cache dual` on the converted golden LLaDA checkpoint."""
    out = eight_devices["meshes"][mesh]
    assert out["cli_status"] == 0
    assert out["cli_tokens"] == eight_devices["cli_reference"]
    assert out["cli_tokens"][0][:4] == [5, 6, 7, 8] and out["cli_tokens"][1][:2] == [9, 10]


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("sampler", ["masked", "block"])
def test_sampling_programs_keep_the_parameters_sharded(eight_devices, mesh, sampler):
    """The jitted samplers take the parameters in their own shardings (no resharding at the call), each device
    holds its shards only (the program's argument bytes = one device's shards + the prompt and key), and no
    parameter is all-gathered outside the loops (XLA:CPU's partitioner all-reduces partial products instead)."""
    out = eight_devices["meshes"][mesh]["compiled"]
    c = out[sampler]
    assert c["input_shardings_kept"]
    assert c["param_shard_bytes"] <= c["param_bytes"] / 4  # really split (8 or 2 x 4 ways, norms replicated)
    assert c["param_shard_bytes"] <= c["argument_bytes"] <= c["param_shard_bytes"] + 1024
    assert c["entry_param_gathers"] == []
    assert out["plan_param_bytes"] == c["param_shard_bytes"]  # `dlmjax plan --sample` counts the same shards


# -- bfloat16 parameters vs float32 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_golden(tmp_path_factory):
    from dlmjax.interchange import convert_from_hf

    return convert_from_hf(GOLDEN / "tiny_llada", "llada", tmp_path_factory.mktemp("golden") / "llada")


def test_bfloat16_logits_against_float32_within_a_measured_bound(converted_golden):
    """The converted golden LLaDA (float32 on disk) in bfloat16, against its float32 logits, over 8 rows x 64 slots
    (the golden ids + 7 random rows, seed 0); measured (jax 0.10.2, CPU; logits reach |45|):

      open_run(dtype="bfloat16") / `dlmjax sample --dtype bfloat16`: parameters, activations and KV cache in
        bfloat16 (as a converted bf16 release runs), norms, RoPE, softmax and logits float32: max |logit diff|
        0.867, mean 0.116, top-1 agreement 499/512 = 97.5%
      load(dtype="bfloat16"): bfloat16 parameters, float32 activations (`model.dtype` as saved): 0.535, 0.074,
        504/512 = 98.4%

    The bounds tell the two apart, and the float32 load still matches the PyTorch reference to 4.5e-5."""
    import jax

    from dlmjax.checkpoint import load
    from dlmjax.inference import open_run
    from dlmjax.interchange import forward_logits

    golden = np.asarray(json.loads((GOLDEN / "tiny_llada" / "golden.json").read_text())["forward_parity"]["input_ids"])
    ids = np.concatenate([golden, np.random.default_rng(0).integers(0, 500, (7, golden.shape[1]))])
    cfg, p32 = load(converted_golden)
    assert cfg.model.dtype == cfg.model.param_dtype == "float32"
    l32 = forward_logits(cfg, p32, ids)
    assert np.abs(l32[:1] - np.load(GOLDEN / "tiny_llada" / "golden_logits.npy")).max() < 1e-4

    def compare(cfg16, p16):
        assert {str(x.dtype) for x in jax.tree.leaves(p16)} == {"bfloat16"}
        l16 = forward_logits(cfg16, p16, ids)
        assert l16.dtype == np.float32
        diff = np.abs(l16 - l32)
        return float(diff.max()), float(diff.mean()), float((l16.argmax(-1) == l32.argmax(-1)).mean())

    run = open_run(converted_golden, dtype="bfloat16")
    assert run.config.model.dtype == run.config.model.param_dtype == "bfloat16"
    worst, mean, top1 = compare(run.config, run.params)
    assert 0.7 < worst < 1.2 and 0.09 < mean < 0.15 and 0.96 <= top1 < 0.98  # measured 0.867, 0.116, 0.975
    cfg_saved, p16 = load(converted_golden, dtype="bfloat16")
    assert cfg_saved == cfg  # load casts the parameters only
    worst, mean, top1 = compare(cfg_saved, p16)
    assert 0.0 < worst < 0.7 and mean < 0.09 and top1 >= 0.98  # measured 0.535, 0.074, 0.984


def test_cli_sample_in_bfloat16_on_one_device(converted_golden, capsys):
    assert main(["sample", "--checkpoint", str(converted_golden), "--prompt-ids", "5,6,7,8", "--gen-length", "8",
                 "--steps", "8", "--block-length", "4", "--cache", "dual", "--mesh", "data=1", "--dtype", "bfloat16",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"][0][:4] == [5, 6, 7, 8] and len(out["tokens"][0]) == 12


# -- dlmjax plan --sample ---------------------------------------------------------------------------------------


def _plan(argv, capsys):
    assert main(["plan", "--sample", *argv]) == 0
    text = capsys.readouterr().out
    return text, json.loads(text.strip().splitlines()[-1])


def test_sample_plan_matches_a_hand_computation(tmp_path, capsys):
    """tiny_model_config (vocab 40, d 32, 2 layers, 4 heads of 8, 2 kv heads, mlp 48) on fsdp=2 x tensor=2, run in
    bfloat16 (parameters and KV cache), 3 rows x 24 slots with guidance, dual cache, xla attention."""
    import yaml

    m = tiny_model_config()
    config = {"model": {k: getattr(m, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                                 "mlp_hidden", "max_seq_len", "init_std")},
              "diffusion": {"objective": "llada", "mask_id": 39},
              "data": {"kind": "text", "path": "unused", "seq_len": 32}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    text, out = _plan(["--config", str(path), "--mesh", "fsdp=2,tensor=2", "--batch", "3", "--length", "24",
                       "--dtype", "bfloat16", "--guidance", "--platform", "cpu"], capsys)
    # Parameters, 2 bytes each, per device: embed (32) split over fsdp (2), vocab / heads / mlp over tensor (2).
    wte = head = (40 // 2) * (32 // 2)  # [vocab, embed], [embed, vocab]
    q = out_proj = (32 // 2) * (32 // 2)  # q_proj [embed, heads*8], attn_out [heads*8, embed]
    kv = (32 // 2) * (16 // 2)  # k_proj, v_proj [embed, 2 kv heads * 8]
    mlp = (32 // 2) * (48 // 2)  # ff_proj, up_proj [embed, mlp], ff_out [mlp, embed]
    norms = 32 * (2 * 2 + 1)  # attn_norm, ff_norm per layer and ln_f: replicated
    assert out["param_bytes"] == 2 * (wte + head + 2 * (2 * q + 2 * kv + 3 * mlp) + norms)
    n_params = 2 * 40 * 32 + 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 48 + 2 * 32) + 32
    assert out["n_params"] == n_params and out["param_bytes_total"] == 2 * n_params
    # KV cache: K and V, 2 layers, 6 rows (guidance), the whole canvas (24), kv 2 x 8 split 2 ways, bfloat16.
    assert out["rows"] == 6 and out["kv_cache_bytes"] == 2 * 2 * 6 * 24 * (16 // 2) * 2
    assert out["param_dtype"] == out["activation_dtype"] == "bfloat16"
    assert out["kv_cache_bytes_total"] == 2 * out["kv_cache_bytes"]
    # Largest forward: a cached block's first pass over the canvas: float32 logits [6, 24, 40 / 2] and float32
    # scores + probabilities [6, 4 / 2 heads, 24 queries, 24 cache + 24 chunk keys].
    assert out["activation_bytes"] == 4 * 6 * 24 * 20 + 2 * 4 * 6 * 2 * 24 * 48
    assert out["total_bytes"] == out["param_bytes"] + out["kv_cache_bytes"] + out["activation_bytes"]
    assert out["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2} and out["devices"] == 4
    assert "KV cache" in text and "masked sampler, cache dual" in text
    # No cache: no KV cache, and the whole canvas against itself.
    _, none = _plan(["--config", str(path), "--mesh", "fsdp=2,tensor=2", "--batch", "3", "--length", "24",
                     "--cache", "none"], capsys)
    assert none["kv_cache_bytes"] == 0 and none["rows"] == 3 and none["param_dtype"] == "float32"
    assert none["activation_bytes"] == 4 * 3 * 24 * 20 + 2 * 4 * 3 * 2 * 24 * 24
    assert none["param_bytes"] == 2 * out["param_bytes"]  # float32, as the config says


def test_sample_plan_of_the_block_sampler_holds_the_prefix(tmp_path, capsys):
    """A bd3 config: K/V of the prefix only (the last block is never committed), blocks of 4, no guidance."""
    import yaml

    m = tiny_model_config()
    config = {"model": {k: getattr(m, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                                 "mlp_hidden", "max_seq_len")},
              "diffusion": {"objective": "bd3", "block_size": 4, "mask_id": 39},
              "data": {"kind": "text", "path": "unused", "seq_len": 32}}
    path = tmp_path / "bd3.yaml"
    path.write_text(yaml.safe_dump(config))
    _, out = _plan(["--config", str(path), "--mesh", "fsdp=8", "--batch", "2", "--length", "32"], capsys)
    assert out["sampler"] == "block" and out["block_length"] == 4
    assert out["kv_cache_bytes"] == 2 * 2 * 2 * (32 - 4) * 16 * 4  # kv heads not split (tensor = 1)
    # prefill of 28 slots against 28 + 28 keys; logits of one 4-slot block
    assert out["activation_bytes"] == 4 * 2 * 4 * 40 + 2 * 4 * 2 * 4 * 28 * 56
    assert main(["plan", "--sample", "--config", str(path), "--guidance"]) == 2
    assert main(["plan", "--sample", "--config", str(path), "--length", "30"]) == 2


def test_sample_plan_of_a_converted_checkpoint(converted_golden, capsys):
    _, out = _plan(["--checkpoint", str(converted_golden), "--length", "128", "--dtype", "bfloat16"], capsys)
    assert out["devices"] == 8 and out["param_dtype"] == "bfloat16" and out["sampler"] == "masked"
    assert out["param_bytes_total"] == 2 * out["n_params"]


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "fsdp=8,tensor=1"], "argument --mesh: data=1,fsdp=8,tensor=1: mesh data*fsdp*tensor = (1, 8, 1) "
                                    "needs 8 devices, but 1 are available"),
    (["--mesh", "fsdp=1,tensr=1"], "argument --mesh: 'fsdp=1,tensr=1': unknown mesh axis 'tensr'; the axes are "
                                   "data, fsdp, tensor"),
    (["--mesh", "fsdp=0"], "argument --mesh: 'fsdp=0': fsdp='0' is not allowed; a size is an integer >= 1"),
    (["--mesh", "fsdp8"], "argument --mesh: 'fsdp8': 'fsdp8' is not axis=size"),
    (["--dtype", "int8"], "argument --dtype: 'int8' is not allowed; the model runs in a floating dtype: bfloat16 "
                          "or float32"),
    (["--dtype", "float16"], "argument --dtype: 'float16' is not allowed"),
])
def test_bad_mesh_and_dtype_flags_are_one_line_before_any_work(argv, message, capsys, tmp_path):
    missing = tmp_path / "not_there"  # never read: the flags are refused first
    assert main(["sample", "--checkpoint", str(missing), "--prompt-ids", "1,2", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "not_there" not in err


def test_plan_flags_of_the_sampling_plan_need_sample(capsys):
    assert main(["plan", "--config", LLADA_8B, "--batch", "2"]) == 2
    assert "argument --batch: applies to the sampling plan; add --sample" in capsys.readouterr().err
    assert main(["plan", "--sample", "--config", LLADA_8B, "--mesh", "fsdp=4", "--devices", "8"]) == 2
    assert "needs 4 devices, but --devices is 8" in capsys.readouterr().err


def test_released_pages_read_back_unchanged(tmp_path):
    """`HFCheckpoint.release` drops the mapped pages under a view (and under all views); the views stay valid."""
    from dlmjax.interchange.safetensors_io import HFCheckpoint

    ckpt = HFCheckpoint(GOLDEN / "tiny_llada")
    name = "model.transformer.blocks.0.ff_proj.weight"
    view = ckpt.read(name)
    before = np.array(view.T)
    ckpt.release(view.T)
    ckpt.release(np.zeros(3))  # not a view of the checkpoint: ignored
    np.testing.assert_array_equal(view.T, before)
    ckpt.release()
    np.testing.assert_array_equal(ckpt.read(name).T, before)
    ckpt.close()
