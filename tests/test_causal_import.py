"""Plain Hugging Face causal LMs (`Qwen2ForCausalLM`, `LlamaForCausalLM`) imported with `dlmjax convert --arch dream
--mask-id N` (`dlmjax.interchange.dream`).

The tiny Dream golden folder (weights and outputs of the original PyTorch Dream code) rewritten as a plain Qwen2
causal LM gives the golden logits; the same weights as a LLaMA folder without q/k/v biases give the logits of the
Qwen2 folder with those biases zeroed (zero biases = no biases); both export back bit for bit; bad configs and mask
ids are one line with status 2 before anything is written; and the converted LLaMA folder as `train.init_from` of a
bd3 run at block size 1 makes the causal LM's next-token predictions at step 0.
"""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from conftest import GOLDEN
from dlmjax.checkpoint import load
from dlmjax.cli import main
from dlmjax.interchange import HF_DIR, MANIFEST, export_to_hf, forward_logits, imported_token_ids
from dlmjax.interchange.safetensors_io import HFCheckpoint
from dlmjax.models.transformer import build_model, shift_logits
from kernels_pallas.masks import Causal

DREAM = GOLDEN / "tiny_dream"
MASK = 500  # the golden Dream's mask_token_id: row 500 of a 512-row embedding; bos 497, pad 498, eos 499
TOL = 1e-4  # as tests/test_interchange.py holds the Dream import to the same golden outputs
# Keys of Dream's config.json that a plain Qwen2 / LLaMA causal LM does not have.
DREAM_ONLY = ("mask_token_id", "pad_token_id")
LLAMA_DROPS = DREAM_ONLY + ("use_sliding_window", "sliding_window", "max_window_layers")
BIAS = ".self_attn.{}_proj.bias"


def golden_ids():
    raw = json.loads((DREAM / "golden.json").read_text())["forward_parity"]["input_ids"]
    return np.asarray(raw).reshape(1, -1)


def read_tensors(path):
    with safe_open(str(path), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def causal_folder(out, config: dict, drop=(), tensors=None):
    """The golden Dream folder copied to `out`, its config.json rewritten (`config` set, `drop` keys removed) and
    its tensors optionally edited (`tensors(dict) -> dict`)."""
    shutil.copytree(DREAM, out)
    cfg = json.loads((DREAM / "config.json").read_text())
    for key in drop:
        cfg.pop(key)
    cfg.update(config)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tensors is not None:
        golden, metadata = read_tensors(DREAM / "model.safetensors")
        save_file(tensors(golden), str(out / "model.safetensors"), metadata=metadata)
    return out


def qwen2_config(**changes):
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **changes}


def llama_config(**changes):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
            "mlp_bias": False, "head_dim": 32, "pretraining_tp": 1, **changes}


def without_biases(t):
    return {k: v for k, v in t.items() if not any(k.endswith(BIAS.format(n)) for n in "qkv")}


def zero_biases(t):
    return {k: np.zeros_like(v) if any(k.endswith(BIAS.format(n)) for n in "qkv") else v for k, v in t.items()}


def convert(src, out, *extra) -> int:
    return main(["convert", "--from-hf", str(src), "--arch", "dream", "--out", str(out), *extra])


def assert_same_folder_tensors(a_dir, b_dir):
    a, b = HFCheckpoint(a_dir), HFCheckpoint(b_dir)
    assert a.names == b.names
    for name in a.names:
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name
    a.close()
    b.close()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{name: (Hugging Face folder, converted checkpoint)} for qwen2 (the golden weights), qwen2_zero (q/k/v biases
    zeroed) and llama (no q/k/v biases), each converted through the CLI with --mask-id 500."""
    root = tmp_path_factory.mktemp("causal")
    made = {
        "qwen2": causal_folder(root / "qwen2", qwen2_config(), DREAM_ONLY),
        "qwen2_zero": causal_folder(root / "qwen2_zero", qwen2_config(), DREAM_ONLY, zero_biases),
        "llama": causal_folder(root / "llama", llama_config(), LLAMA_DROPS, without_biases),
    }
    out = {}
    for name, src in made.items():
        assert convert(src, root / f"{name}_ckpt", "--mask-id", str(MASK)) == 0
        out[name] = (src, root / f"{name}_ckpt")
    return out


# --- parity ---------------------------------------------------------------------------------------------------------

def test_plain_qwen2_with_a_user_mask_id_gives_the_golden_logits(folders, capsys):
    src, ckpt = folders["qwen2"]
    cfg, params = load(ckpt)
    assert (cfg.model.arch, cfg.model.qkv_bias, cfg.diffusion.mask_id) == ("dream", True, MASK)
    logits = forward_logits(cfg, params, golden_ids())
    assert float(np.abs(logits - np.load(DREAM / "golden_logits.npy")).max()) <= TOL
    shifted = np.asarray(shift_logits(logits))
    assert float(np.abs(shifted - np.load(DREAM / "golden_logits_shifted.npy")).max()) <= TOL
    # The mask id travels in the manifest (what `dlmjax sample` reads) and the run config (what init_from reads).
    manifest = json.loads((ckpt / HF_DIR / MANIFEST).read_text())
    assert manifest["meta"] == {"mask_id": MASK, "eos_id": 499, "pad_id": None, "bos_id": 497, "shift_logits": True}
    assert imported_token_ids(ckpt)["mask_id"] == MASK
    assert json.loads((ckpt / "config.json").read_text())["diffusion"]["mask_id"] == MASK
    capsys.readouterr()


def test_llama_without_biases_equals_qwen2_with_zero_biases(folders):
    cfg_l, params_l = load(folders["llama"][1])
    cfg_q, params_q = load(folders["qwen2_zero"][1])
    assert cfg_l.model.qkv_bias is False and cfg_q.model.qkv_bias is True
    blocks = [k for k in params_l if k.startswith("blocks")] or ["blocks"]
    assert all("bias" not in params_l[b]["q_proj"] for b in blocks)
    ids = golden_ids()
    want = forward_logits(cfg_q, params_q, ids)
    got = forward_logits(cfg_l, params_l, ids)
    assert float(np.abs(want - np.load(DREAM / "golden_logits.npy")).max()) > 1e-3  # the biases mattered
    np.testing.assert_array_equal(got, want)  # x @ W + 0 == x @ W exactly


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_import_then_export_is_bit_identical(folders, name, tmp_path, capsys):
    src, ckpt = folders[name]
    assert main(["convert", "--to-hf", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert_same_folder_tensors(src, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert (tmp_path / "hf" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    capsys.readouterr()


def test_a_model_without_qkv_biases_gets_no_generated_dream_config(folders, tmp_path):
    """A dream model without biases and without an import manifest (e.g. a run adapted from a LLaMA import) is
    refused by the generated-config export, which would otherwise write a DreamModel folder missing its biases."""
    from dlmjax.interchange import InterchangeError

    ckpt = tmp_path / "plain"
    shutil.copytree(folders["llama"][1], ckpt)
    shutil.rmtree(ckpt / HF_DIR)
    with pytest.raises(InterchangeError, match=r"^model.qkv_bias=False: a Dream config.json"):
        export_to_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- bad input: one line, status 2, nothing written -----------------------------------------------------------

def _digest(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


CASES = [
    ("qwen2", {}, (), "--mask-id is required for model_type qwen2"),
    ("qwen2", {}, ("--mask-id", "512"), "--mask-id 512 is not a row of the embedding; give an id in [0, 512)"),
    ("qwen2", {}, ("--mask-id", "499"), "eos_token_id=499 equals --mask-id 499; the mask id must be a token of"),
    ("llama", {"eos_token_id": [499, 501]}, ("--mask-id", "501"), "eos_token_id=[499, 501] equals --mask-id 501"),
    ("llama", {"bos_token_id": 500}, ("--mask-id", "500"), "bos_token_id=500 equals --mask-id 500"),
    ("llama", {}, (), "--mask-id is required for model_type llama"),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ("--mask-id", "500"),
     "rope_scaling={'rope_type': 'llama3', 'factor': 8.0} is not supported; supported value(s): [None]"),
    ("llama", {"attention_bias": True}, ("--mask-id", "500"),
     "attention_bias=True is not supported; supported value(s): [False]"),
    ("llama", {"mlp_bias": True}, ("--mask-id", "500"), "mlp_bias=True is not supported; supported value(s): [False]"),
    ("llama", {"head_dim": 64}, ("--mask-id", "500"), "head_dim=64 is not supported; dlmjax needs hidden_size / "
     "num_attention_heads = 32"),
    ("llama", {"hidden_act": "gelu"}, ("--mask-id", "500"), "hidden_act='gelu' is not supported"),
    ("qwen2", {"use_sliding_window": True}, ("--mask-id", "500"), "use_sliding_window=True is not supported"),
    ("qwen2", {"architectures": ["Qwen2ForSequenceClassification"]}, ("--mask-id", "500"),
     "architectures=['Qwen2ForSequenceClassification'] is not supported for model_type qwen2"),
    ("dream", {}, ("--mask-id", "7"), "--mask-id 7 differs from config.json's mask_token_id=500; drop --mask-id"),
    ("dream", {"mask_token_id": None}, (), "key 'mask_token_id' is missing; it is required (a Dream config names"),
]


@pytest.mark.parametrize("kind, change, flags, words", CASES)
def test_bad_causal_config_or_mask_id_is_one_line_before_anything_is_written(kind, change, flags, words, tmp_path,
                                                                              capsys):
    config = {"qwen2": qwen2_config(), "llama": llama_config(), "dream": {}}[kind]
    drop = {"qwen2": DREAM_ONLY, "llama": LLAMA_DROPS, "dream": ()}[kind]
    src = causal_folder(tmp_path / "src", {**config, **change}, drop)
    before = _digest(src)
    out = tmp_path / "out"
    assert convert(src, out, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert _digest(src) == before


@pytest.mark.parametrize("argv, words", [
    (["--from-hf", str(GOLDEN / "tiny_llada"), "--arch", "llada", "--mask-id", "3"],
     "--mask-id applies to --arch dream (plain Qwen2 / LLaMA causal LMs); --arch llada reads its mask token"),
    (["--from-hf", str(DREAM), "--arch", "dream", "--mask-id", "-1"], "argument --mask-id: -1 is not allowed"),
    (["--to-hf", str(DREAM), "--mask-id", "3"], "argument --mask-id: dlmjax convert --to-hf takes no --mask-id"),
])
def test_mask_id_outside_a_dream_import_is_refused(argv, words, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()


# --- adaptation: the converted LLaMA folder as train.init_from ------------------------------------------------

def test_llama_import_as_init_from_of_a_block_1_run_makes_the_causal_predictions(folders):
    """A bd3 run (model.arch dream, block size 1, every slot masked) started from the converted LLaMA folder: its
    step-0 prediction for slot i is the causal LM's row i - 1 (the causal forward checked against a dense
    lower-triangular mask and against a forward of the prefix alone). Tolerance: float32 round-off (1e-5), different
    attention layouts."""
    from dlmjax.config import config_from_dict
    from dlmjax.sharding import make_mesh
    from dlmjax.train import adapt
    from dlmjax.train.objective import bd3_loss_terms
    from dlmjax.train.state import abstract_train_state, init_train_state_from, make_optimizer

    _, converted = folders["llama"]
    base = json.loads((converted / "config.json").read_text())
    base["train"] = {"steps": 2, "init_from": str(converted)}
    base["diffusion"].update(objective="bd3", block_size=1, clip_min=1.0, clip_max=1.0)
    base["data"].update(seq_len=12)
    cfg = config_from_dict(base)
    assert (cfg.model.arch, cfg.model.qkv_bias, cfg.diffusion.mask_id) == ("dream", False, MASK)
    source = adapt.check_init_from(cfg)
    assert source.kind == "export"
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    _, shardings = abstract_train_state(cfg.model, tx, mesh, cfg.mesh.rules)
    params = init_train_state_from(adapt.load_init_params(source, cfg, mesh, shardings.params), tx, cfg.train.seed,
                                   shardings).params

    b, length = 2, 12
    x0 = jax.random.randint(jax.random.PRNGKey(7), (b, length), 0, 497)  # no special / mask tokens
    batch = {"tokens": x0, "prompt_mask": jnp.zeros((b, length), bool).at[:, :2].set(True),
             "valid_mask": jnp.ones((b, length), bool)}
    t = jnp.ones((b, length), jnp.float32)
    u = jax.random.uniform(jax.random.PRNGKey(8), (b, length))
    loss_terms = jax.jit(bd3_loss_terms, static_argnames=("model_cfg", "diff_cfg"))
    _, aux = loss_terms(params, batch, t, u, model_cfg=cfg.model, diff_cfg=cfg.diffusion)

    hf_cfg, hf_params = load(converted)
    causal_model = jax.jit(build_model(hf_cfg.model, Causal()).apply)
    causal = np.asarray(causal_model({"params": hf_params}, x0), np.float32)
    # The causal forward is what a causal LM computes: the same as the bidirectional model under a dense
    # lower-triangular mask (another code path), and each prefix alone gives the same rows (nothing looks ahead).
    tril = jnp.asarray(np.tril(np.ones((length, length), bool))[None])
    dense = jax.jit(build_model(hf_cfg.model).apply)({"params": hf_params}, x0, dense_mask=tril)
    np.testing.assert_allclose(causal, np.asarray(dense), rtol=1e-5, atol=1e-5)
    prefix = np.asarray(causal_model({"params": hf_params}, x0[:, :5]))
    np.testing.assert_allclose(causal[:, :5], prefix, rtol=1e-5, atol=1e-5)
    scored = np.asarray(aux["scored"])
    np.testing.assert_array_equal(scored, np.broadcast_to(np.arange(length) >= 2, (b, length)))
    np.testing.assert_allclose(np.asarray(aux["logits"])[:, 1:], causal[:, :-1], rtol=1e-5, atol=1e-5)
