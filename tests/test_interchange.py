"""Hugging Face checkpoint interchange: LLaDA and Dream parity with the original PyTorch models (golden files),
bit-identical import -> export (float32, bfloat16, sharded), error messages, and the convert / forward commands."""
import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from dlmjax.cli import main
from dlmjax.interchange import (HF_DIR, MANIFEST, InterchangeError, convert_from_hf, export_to_hf, forward_logits,
                                get_module, import_hf)
from dlmjax.interchange.safetensors_io import HFCheckpoint
from dlmjax.models.transformer import build_model, shift_logits

GOLDEN = Path(__file__).resolve().parent / "golden"
TOL = 1e-4


def load_tensors(path):
    with safe_open(str(path), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def golden_ids(arch):
    ids = np.asarray(json.loads((GOLDEN / f"tiny_{arch}" / "golden.json").read_text())["forward_parity"]["input_ids"])
    return ids.reshape(1, -1)


def assert_same_tensors(a_dir, b_dir):
    """Every tensor of every shard: same names (and order), dtypes, shapes and bytes; same header metadata."""
    a, b = HFCheckpoint(a_dir), HFCheckpoint(b_dir)
    assert [s.file for s in a.shards] == [s.file for s in b.shards]
    assert [s.metadata for s in a.shards] == [s.metadata for s in b.shards]
    assert a.names == b.names
    for name in a.names:
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name


def make_hf_dir(tmp, src, tensors=None, config=None, metadata=None):
    """A Hugging Face folder: `src`'s files with tensors and config.json replaced or edited."""
    tmp.mkdir(parents=True)
    golden_tensors, golden_metadata = load_tensors(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config or {})
    (tmp / "config.json").write_text(json.dumps(cfg))
    save_file(golden_tensors if tensors is None else tensors(golden_tensors), str(tmp / "model.safetensors"),
              metadata=metadata or golden_metadata)
    return tmp


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """llada and dream golden checkpoints converted once: {arch: path}."""
    root = tmp_path_factory.mktemp("converted")
    return {arch: convert_from_hf(GOLDEN / f"tiny_{arch}", arch, root / arch) for arch in ("llada", "dream")}


# --- parity with the reference implementations -------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_logits_and_every_hidden_state_match_the_reference(arch):
    d = GOLDEN / f"tiny_{arch}"
    cfg, params, meta = import_hf(d, arch)
    assert cfg.model.arch == arch and cfg.model.qkv_bias == (arch == "dream")
    assert meta["mask_id"] == cfg.diffusion.mask_id == 500
    model = build_model(cfg.model)
    logits, state = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=["intermediates"]))(
        params, golden_ids(arch))
    inter = state["intermediates"]
    # Reference hidden states: embedding, after blocks 0 .. n-2, and the final norm of the last block's output.
    ours = ([inter["embedding"][0]] + [inter[f"blocks_{i}"]["hidden"][0] for i in range(cfg.model.n_layers - 1)]
            + [inter["final_norm"][0]])
    want = np.load(d / "golden_hidden_states.npy")
    assert len(ours) == len(want) == cfg.model.n_layers + 1
    errs = [float(np.abs(np.asarray(h) - w).max()) for h, w in zip(ours, want)]
    assert max(errs) <= TOL, errs
    err = float(np.abs(np.asarray(logits) - np.load(d / "golden_logits.npy")).max())
    assert logits.dtype == np.float32 and err <= TOL, err


def test_dream_shifted_logits_match_the_reference():
    d = GOLDEN / "tiny_dream"
    raw, want = np.load(d / "golden_logits.npy"), np.load(d / "golden_logits_shifted.npy")
    np.testing.assert_array_equal(np.asarray(shift_logits(raw)), want)  # the convention itself, exactly
    cfg, params, _ = import_hf(d, "dream")
    ours = shift_logits(forward_logits(cfg, params, golden_ids("dream")))
    assert float(np.abs(np.asarray(ours) - want).max()) <= TOL
    assert get_module("dream").shift_logits is shift_logits


def test_imported_config_is_a_complete_dlmjax_config(converted):
    from dlmjax.checkpoint import load

    cfg, _ = load(converted["llada"])
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.num_kv_heads, m.mlp_hidden) == (512, 128, 4, 4, 4, 384)
    assert (m.rope_theta, m.norm_eps, m.tie_embeddings, m.max_seq_len) == (500000.0, 1e-5, False, 4096)
    assert (cfg.diffusion.objective, cfg.data.kind, cfg.data.seq_len) == ("llada", "text", 1024)
    cfg, _ = load(converted["dream"])
    m = cfg.model
    assert (m.arch, m.n_heads, m.num_kv_heads, m.norm_eps, m.rope_theta, m.max_seq_len) == (
        "dream", 4, 2, 1e-6, 10000.0, 512)
    manifest = json.loads((converted["dream"] / HF_DIR / MANIFEST).read_text())
    assert manifest["meta"] == {"mask_id": 500, "eos_id": 499, "pad_id": 498, "bos_id": 497, "shift_logits": True}


# --- import -> export is bit-identical -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_import_then_export_is_bit_identical(arch, converted, tmp_path):
    out = export_to_hf(converted[arch], tmp_path / "hf")
    src = GOLDEN / f"tiny_{arch}"
    assert_same_tensors(src, out)
    # Same writer layout as the safetensors library: even the files are identical.
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    for name in ("config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.parametrize("arch", ["mdlm", "bd3lm"])
def test_dit_import_then_export_is_bit_identical(arch, tmp_path):
    # Enabled once dlmjax.interchange.dit (mdlm / bd3lm) exists.
    pytest.importorskip("dlmjax.interchange.dit")
    src = GOLDEN / f"tiny_{arch}"
    out = export_to_hf(convert_from_hf(src, arch, tmp_path / "ckpt"), tmp_path / "hf")
    assert_same_tensors(src, out)


def test_bfloat16_checkpoint_round_trips_bit_identically(tmp_path):
    src = make_hf_dir(tmp_path / "bf16", GOLDEN / "tiny_llada", config={"torch_dtype": "bfloat16"},
                      tensors=lambda t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
    ckpt = convert_from_hf(src, "llada", tmp_path / "ckpt")
    from dlmjax.checkpoint import load

    cfg, params = load(ckpt)
    assert cfg.model.param_dtype == cfg.model.dtype == "bfloat16"
    assert params["wte"].dtype == ml_dtypes.bfloat16
    out = export_to_hf(ckpt, tmp_path / "hf")
    assert_same_tensors(src, out)
    assert HFCheckpoint(out).tensors["model.transformer.wte.weight"].dtype == "BF16"


def test_two_shard_checkpoint_round_trips_with_its_index(tmp_path, converted):
    tensors, metadata = load_tensors(GOLDEN / "tiny_dream" / "model.safetensors")
    src = tmp_path / "sharded"
    src.mkdir()
    shutil.copyfile(GOLDEN / "tiny_dream" / "config.json", src / "config.json")
    names = sorted(tensors)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts = [names[:len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for file, part in zip(files, parts):
        save_file({n: tensors[n] for n in part}, str(src / file), metadata=metadata)
        weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (src / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    ckpt = convert_from_hf(src, "dream", tmp_path / "ckpt")
    out = export_to_hf(ckpt, tmp_path / "hf")
    assert_same_tensors(src, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "model.safetensors.index.json", *files])
    for name in [*files, "model.safetensors.index.json"]:
        assert (out / name).read_bytes() == (src / name).read_bytes()
    # The sharded import is the same model as the single-file one.
    from dlmjax.checkpoint import load

    (_, a), (_, b) = load(ckpt), load(converted["dream"])
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool((np.asarray(x) == np.asarray(y)).all()), a, b)))


def test_reader_sees_exactly_what_safetensors_reads(tmp_path):
    src = make_hf_dir(tmp_path / "bf16", GOLDEN / "tiny_dream",
                      tensors=lambda t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
    ckpt = HFCheckpoint(src)
    want, _ = load_tensors(src / "model.safetensors")
    assert set(ckpt.names) == set(want)
    for name, w in want.items():
        got = ckpt.read(name)
        assert got.dtype == w.dtype == ml_dtypes.bfloat16 and got.tobytes() == w.tobytes()
        assert not got.flags.writeable  # a view of the mapped file, not a copy


def test_tied_dream_keeps_a_stored_lm_head_verbatim(tmp_path):
    src = make_hf_dir(tmp_path / "tied", GOLDEN / "tiny_dream", config={"tie_word_embeddings": True},
                      tensors=lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].copy()})
    cfg, params, _ = import_hf(src, "dream")
    assert cfg.model.tie_embeddings and "ff_out" not in params
    out = export_to_hf(convert_from_hf(src, "dream", tmp_path / "ckpt"), tmp_path / "hf")
    assert_same_tensors(src, out)


def test_llada_with_qkv_biases_round_trips(tmp_path):
    def add_biases(t):
        rng = np.random.default_rng(0)
        return {**t, **{f"model.transformer.blocks.{i}.{p}_proj.bias": rng.standard_normal(128).astype(np.float32)
                        for i in range(4) for p in "qkv"}}

    src = make_hf_dir(tmp_path / "bias", GOLDEN / "tiny_llada", config={"include_qkv_bias": True}, tensors=add_biases)
    cfg, params, _ = import_hf(src, "llada")
    assert cfg.model.qkv_bias and params["blocks_3"]["v_proj"]["bias"].shape == (128,)
    out = export_to_hf(convert_from_hf(src, "llada", tmp_path / "ckpt"), tmp_path / "hf")
    assert_same_tensors(src, out)


def test_native_model_exports_with_a_generated_config(tmp_path):
    from dlmjax.checkpoint import save_params
    from dlmjax.config import Config, ModelConfig
    from dlmjax.models.transformer import init_params

    cfg = Config(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, mlp_hidden=64))
    shapes = jax.eval_shape(lambda: init_params(cfg.model, jax.random.PRNGKey(0)))  # no compile: random numpy values
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    out = export_to_hf(save_params(tmp_path / "native", cfg, params), tmp_path / "hf")
    back_cfg, back, meta = import_hf(out, "llada")
    assert back_cfg.model == cfg.model and meta["mask_id"] == cfg.diffusion.mask_id
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool((np.asarray(x) == np.asarray(y)).all()), params, back)))


def test_forward_of_a_bd3_model_reads_x_t_and_x_0_under_the_training_mask():
    from dlmjax.config import Config, DataConfig, DiffusionConfig, ModelConfig
    from kernels_pallas.masks import BlockCausal
    from dlmjax.models.transformer import init_params

    cfg = Config(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, mlp_hidden=64),
                 diffusion=DiffusionConfig(objective="bd3", block_size=4),
                 data=DataConfig(kind="text", path="unused", seq_len=16))
    shapes = jax.eval_shape(lambda: init_params(cfg.model, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    x0 = rng.integers(0, 256, (2, 16))
    xt = np.where(rng.random((2, 16)) < 0.5, cfg.diffusion.mask_id, x0)
    logits = forward_logits(cfg, params, np.concatenate([xt, x0], axis=1))
    assert logits.shape == (2, 32, cfg.model.vocab_size)
    # The x_0 stream sees x_0 block-causally at positions 0..L-1: the same as a block-causal forward of x_0 alone.
    clean = jax.jit(build_model(cfg.model, BlockCausal(4)).apply)({"params": params}, x0)
    np.testing.assert_allclose(logits[:, 16:], np.asarray(clean), atol=1e-5)
    # Any other length is a plain bidirectional forward.
    full = jax.jit(build_model(cfg.model).apply)({"params": params}, x0[:, :12])
    np.testing.assert_allclose(forward_logits(cfg, params, x0[:, :12]), np.asarray(full), atol=1e-5)


# --- errors name the tensor / key and what was expected ------------------------------------------------------------

def drop(name):
    return lambda t: {k: v for k, v in t.items() if k != name}


@pytest.mark.parametrize("arch, edit, message", [
    ("llada", drop("model.transformer.blocks.2.up_proj.weight"),
     "tensor 'model.transformer.blocks.2.up_proj.weight' is missing (expected shape [384, 128])"),
    ("llada", lambda t: {**t, "model.transformer.blocks.0.q_proj.weight": np.zeros((64, 128), np.float32)},
     "tensor 'model.transformer.blocks.0.q_proj.weight' has shape [64, 128]; expected [128, 128]"),
    ("llada", lambda t: {**t, "model.transformer.blocks.0.extra.weight": np.zeros((3, 2), np.float32)},
     "unexpected tensor 'model.transformer.blocks.0.extra.weight' with shape [3, 2]"),
    ("dream", drop("model.layers.1.self_attn.k_proj.bias"),
     "tensor 'model.layers.1.self_attn.k_proj.bias' is missing (expected shape [64])"),
    ("dream", lambda t: {**t, "model.layers.0.self_attn.v_proj.weight": np.zeros((128, 128), np.float32)},
     "tensor 'model.layers.0.self_attn.v_proj.weight' has shape [128, 128]; expected [64, 128]"),
])
def test_bad_tensors_are_named_with_the_expected_shape(arch, edit, message, tmp_path):
    src = make_hf_dir(tmp_path / "bad", GOLDEN / f"tiny_{arch}", tensors=edit)
    with pytest.raises(InterchangeError) as e:
        import_hf(src, arch)
    assert message in str(e.value)


@pytest.mark.parametrize("arch, change, message", [
    ("llada", {"include_bias": True}, "include_bias=True is not supported; supported value(s): [False]"),
    ("llada", {"alibi": True}, "alibi=True is not supported; supported value(s): [False]"),
    ("llada", {"rope": False}, "rope=False is not supported; supported value(s): [True]"),
    ("llada", {"block_type": "sequential"}, "block_type='sequential' is not supported; supported value(s): ['llama']"),
    ("llada", {"mask_token_id": None}, "key 'mask_token_id' is missing"),
    ("llada", {"pad_token_id": 500}, "pad_token_id=500 equals mask_token_id"),
    ("llada", {"n_heads": 3}, "d_model=128 is not divisible by n_heads=3"),
    ("dream", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling={'type': 'linear', 'factor': 2.0} "
     "is not supported; supported value(s): [None]"),
    ("dream", {"use_sliding_window": True}, "use_sliding_window=True is not supported"),
    ("dream", {"mask_token_id": 512}, "mask_token_id=512 must be a token id in [0, 512)"),
    ("dream", {"hidden_size": "128"}, "hidden_size='128' has type str; expected int"),
])
def test_unsupported_config_values_are_named(arch, change, message, tmp_path):
    src = make_hf_dir(tmp_path / "bad", GOLDEN / f"tiny_{arch}", config=change)
    with pytest.raises(InterchangeError) as e:
        import_hf(src, arch)
    assert message in str(e.value)


def test_unknown_arch_lists_the_allowed_ones():
    with pytest.raises(InterchangeError, match=r"--arch 'gpt2' is not supported; choose one of "
                                               r"\['llada', 'dream', 'mdlm', 'bd3lm'\]"):
        import_hf(GOLDEN / "tiny_llada", "gpt2")


def test_wrong_arch_for_a_checkpoint_is_an_error():
    with pytest.raises(InterchangeError, match="key 'hidden_size' is missing"):
        import_hf(GOLDEN / "tiny_llada", "dream")


# --- the command line ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_cli_convert_forward_compare_and_export(arch, tmp_path, capsys):
    d = GOLDEN / f"tiny_{arch}"
    ckpt, ids, out = tmp_path / "ckpt", tmp_path / "ids.npy", tmp_path / "logits.npy"
    assert main(["convert", "--from-hf", str(d), "--arch", arch, "--out", str(ckpt)]) == 0
    np.save(ids, golden_ids(arch).reshape(-1).astype(np.int64))  # one row given as [L]
    assert main(["forward", "--checkpoint", str(ckpt), "--input-ids", str(ids), "--out", str(out)]) == 0
    got, want = np.load(out), np.load(d / "golden_logits.npy")
    assert got.dtype == np.float32 and got.shape == want.shape
    assert float(np.abs(got - want).max()) <= TOL
    assert main(["convert", "--to-hf", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert_same_tensors(d, tmp_path / "hf")
    capsys.readouterr()


def test_cli_errors_without_a_traceback(converted, tmp_path, capsys):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.array([[1, 2, 3]]))
    sigma = tmp_path / "sigma.npy"
    np.save(sigma, np.array([0.5], np.float32))
    cases = [
        (["convert", "--from-hf", str(GOLDEN / "tiny_llada"), "--arch", "gpt2", "--out", str(tmp_path / "x")],
         "--arch 'gpt2' is not supported; choose one of ['llada', 'dream', 'mdlm', 'bd3lm']"),
        (["convert", "--from-hf", str(tmp_path / "nowhere"), "--arch", "llada", "--out", str(tmp_path / "y")],
         "does not exist"),
        (["convert", "--from-hf", str(GOLDEN / "tiny_llada"), "--arch", "llada", "--out", str(converted["llada"])],
         "already holds a converted checkpoint"),
        (["forward", "--checkpoint", str(converted["llada"]), "--input-ids", str(ids), "--sigma", str(sigma),
          "--out", str(tmp_path / "o.npy")], "--sigma applies to DiT models"),
        (["forward", "--checkpoint", str(converted["llada"]), "--input-ids", str(tmp_path / "none.npy"),
          "--out", str(tmp_path / "o.npy")], "--input-ids file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    np.save(ids, np.array([[1, 2, 512]]))
    assert main(["forward", "--checkpoint", str(converted["llada"]), "--input-ids", str(ids),
                 "--out", str(tmp_path / "o.npy")]) == 2
    assert "input ids must be in [0, model.vocab_size=512)" in capsys.readouterr().err


def test_denoiser_aligns_dream_logits_for_the_samplers():
    """Samplers call `Denoiser`; for a Dream checkpoint it must return the shifted logits the reference's
    generation uses (golden_logits_shifted.npy), not the raw forward."""
    from dlmjax.sampling import Denoiser

    cfg, params, _ = import_hf(GOLDEN / "tiny_dream", "dream")
    got = np.asarray(Denoiser(cfg.model)(params, golden_ids("dream")))
    want = np.load(GOLDEN / "tiny_dream" / "golden_logits_shifted.npy")
    assert np.abs(got - want).max() <= TOL


# LLaDA / Fast-dLLM / Dream generate parity on the imported golden checkpoints: tests/test_fast_sampler.py.


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_refused_at_import_and_nothing_is_written(tmp_path, capsys, bad):
    hf = tmp_path / "hf"
    shutil.copytree(GOLDEN / "tiny_llada", hf)
    with safe_open(str(hf / "model.safetensors"), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(k for k in tensors if tensors[k].dtype.kind == "f")[0]
    tensors[name] = tensors[name].copy()
    tensors[name].reshape(-1)[3] = bad
    save_file(tensors, str(hf / "model.safetensors"))
    before = _digest(hf)
    out = tmp_path / "out"
    assert main(["convert", "--from-hf", str(hf), "--arch", "llada", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert name in err and "non-finite" in err
    assert not out.exists() or not any(out.iterdir())  # no partial checkpoint is left behind
    assert _digest(hf) == before


def test_convert_refuses_a_folder_that_is_not_empty_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file\n")
    before = _digest(out)
    assert main(["convert", "--from-hf", str(GOLDEN / "tiny_llada"), "--arch", "llada", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is a folder that is not empty" in err and "--out" in err
    assert _digest(out) == before
