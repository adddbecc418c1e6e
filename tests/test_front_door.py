"""The sampler front door (`dlmjax.inference`) and the thin CLI: token ids and text come from the run itself,
and every bad input is one line with status 2 that changes no file.

Runs are params-only exports (`save_params`) of random models, so nothing here trains.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO

from dlmjax.checkpoint import save_params
from dlmjax.cli import main
from dlmjax.config import load_config
from dlmjax.data.tokenizer import load_tokenizer
from dlmjax.inference import SampleRequest, open_run, sample_rows
from dlmjax.models.transformer import init_params
from dlmjax.sampling import BlockSamplerSettings

TEXT = ["the lazy fox jumps over the quick dog", "a quick brown dog naps in the sun", "over and over the fox ran",
        "the sun rose over the lazy hills"] * 20


def bpe_tokenizer(folder: Path) -> str:
    """A byte-level BPE tokenizer.json whose EOS `</s>` is id 0 and BOS `<s>` id 1 (no mask token: the model's
    mask id is the tokenizer's vocabulary size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>", "<s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def export_run(folder: Path, objective: str, *, zero_head: bool = False) -> tuple[Path, object]:
    """A params-only export of a random 1-layer model trained (as far as its config says) on a BPE corpus."""
    folder.mkdir(parents=True, exist_ok=True)
    tok_path = bpe_tokenizer(folder)
    tok = load_tokenizer(tok_path)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(TEXT))
    overrides = ["data.kind=corpus", f"data.path={corpus}", "data.format=text", f"data.tokenizer={tok_path}",
                 "data.seq_len=16", f"model.vocab_size={tok.model_vocab_size}", f"diffusion.mask_id={tok.mask_id}",
                 "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.mlp_hidden=64",
                 "model.max_seq_len=32", f"diffusion.objective={objective}"]
    if objective == "bd3":
        overrides.append("diffusion.block_size=4")
    else:
        overrides.append("diffusion.schedule=linear" if objective == "mdlm" else "diffusion.schedule=llada")
    cfg = load_config(None, overrides)
    params = init_params(cfg.model, jax.random.PRNGKey(0))
    if zero_head:
        # Every logit 0: the proposal is the lowest id, 0, which is this tokenizer's EOS.
        params = dict(params, ff_out=np.zeros_like(params["ff_out"]))
    out = folder / "export"
    save_params(out, cfg, params)
    return out, tok


def test_a_bd3_run_on_a_bpe_tokenizer_stops_at_its_own_eos(tmp_path):
    export, tok = export_run(tmp_path / "bd3", "bd3", zero_head=True)
    assert tok.eos_id == 0 != 258  # not the byte tokenizer's EOS
    run = open_run(export)
    assert run.tokens.eos_id == 0 and run.tokens.bos_id == tok.bos_id == 1
    prompt = tok.encode("the lazy fox", bos=True)[:4]
    settings = run.settings(len(prompt), SampleRequest(gen_length=12))
    assert isinstance(settings, BlockSamplerSettings) and settings.tokens.eos_id == 0
    rows, nfe = sample_rows(run, [prompt], SampleRequest(gen_length=12))
    # Prompt = one full block, then block 1 proposes EOS everywhere in its 4 steps (the first runs in the prompt's
    # prefill pass: fused commits): the row is done, the two later blocks are never denoised. Stopping at any other
    # id would run 3 * 4 steps.
    assert nfe == 4
    assert rows[0][:4] == prompt and rows[0][4:] == [0] * 12


def test_sample_prompt_text_is_encoded_and_decoded_with_the_runs_tokenizer(tmp_path, capsys):
    export, tok = export_run(tmp_path / "llada", "llada")
    prompt = "the lazy fox"
    ids = tok.encode(prompt, bos=True)
    assert main(["sample", "--checkpoint", str(export), "--prompt", prompt, "--gen-length", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"][0][:len(ids)] == ids and len(out["tokens"][0]) == len(ids) + 6
    assert main(["sample", "--checkpoint", str(export), "--prompt", prompt, "--gen-length", "6"]) == 0
    text = capsys.readouterr().out
    assert text == tok.decode(out["tokens"][0][len(ids):]) + "\n"


def test_relative_checkpoint_paths_work(tmp_path, monkeypatch, capsys):
    export, _ = export_run(tmp_path / "rel", "llada")
    monkeypatch.chdir(export.parent)
    assert main(["sample", "--checkpoint", export.name, "--prompt-ids", "1,5,6", "--gen-length", "4",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"][0][:3] == [1, 5, 6]


def _tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return {"llada": export_run(root / "llada", "llada")[0], "bd3": export_run(root / "bd3", "bd3")[0]}


BAD_SAMPLE_FLAGS = [
    ("llada", ["--prompt-ids", "1,2", "--gen-length", "0"], "--gen-length"),
    ("llada", ["--prompt-ids", "1,2", "--steps", "0"], "--steps"),
    ("llada", ["--prompt-ids", "1,2", "--threshold", "1.5"], "--threshold"),
    ("llada", ["--prompt-ids", "1,2", "--top-p", "0"], "--top-p"),
    ("llada", ["--prompt-ids", "1,2", "--temperature", "nan"], "--temperature"),
    ("llada", ["--prompt-ids", "1,x"], "--prompt-ids"),
    ("llada", ["--prompt-ids", "1,-3"], "prompt"),
    ("llada", ["--prompt-ids", "1,99999"], "prompt"),
    ("llada", ["--prompt-ids", "1,MASK"], "mask"),
    ("llada", ["--prompt-ids", "1,2", "--gen-length", "5", "--block-length", "2"], "--block-length"),
    ("llada", ["--prompt-ids", "1,2", "--gen-length", "8", "--steps", "3", "--block-length", "4"], "--steps"),
    ("llada", ["--prompt-ids", "1,2", "--gen-length", "64"], "max_seq_len"),
    ("llada", ["--prompt-ids", "1,2", "--steps-per-block", "2"], "--steps-per-block"),
    ("bd3", ["--prompt-ids", "1,2", "--cache", "dual"], "--cache"),
    ("bd3", ["--prompt-ids", "1,2", "--cfg-scale", "1"], "--cfg-scale"),
    ("bd3", ["--prompt-ids", "1,2", "--gen-length", "5"], "multiple of the block length"),
    ("bd3", ["--prompt-ids", "1,2", "--remasking", "margin"], "--remasking"),
    ("bd3", ["--prompt-ids", "1,2", "--block-add-threshold", "0.5"], "--window-blocks"),
    ("bd3", ["--prompt-ids", "1,2", "--window-blocks", "2", "--factor", "1"], "--factor"),
    ("bd3", ["--prompt-ids", "1,2", "--window-blocks", "9"], "--window-blocks=9"),
    ("bd3", ["--prompt-ids", "1,2", "--sub-block-length", "3"], "--sub-block-length=3"),
    ("bd3", ["--prompt-ids", "1,2", "--sub-block-length", "2", "--factor", "1"], "--factor"),
    ("llada", ["--prompt-ids", "1,2", "--window-blocks", "2"], "--window-blocks"),
    ("llada", ["--prompt-ids", "1,2", "--sub-block-length", "2"], "--sub-block-length"),
]


@pytest.mark.parametrize("kind, flags, needle", BAD_SAMPLE_FLAGS)
def test_bad_sample_input_is_one_line_with_status_2_and_changes_nothing(exports, kind, flags, needle, capsys):
    export = exports[kind]
    mask_id = json.loads((export / "config.json").read_text())["diffusion"]["mask_id"]
    flags = [f.replace("MASK", str(mask_id)) for f in flags]
    before = _tree_digest(export)
    assert main(["sample", "--checkpoint", str(export), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and needle in err, err
    assert _tree_digest(export) == before


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--checkpoint", "/nonexistent/run", "--prompt", "1+1="], "/nonexistent/run"),
    (["convert", "--from-hf", "/nonexistent", "--out", "x"], "--arch"),
    (["train", "--config", "configs/demo.yaml", "sample.gen_length=0"], "sample.gen_length"),
    (["train", "--config", "configs/demo.yaml", "sample.block_length=5"], "sample.block_length"),
    (["plan", "--config", "configs/demo.yaml", "--devices", "0"], "--devices"),
])
def test_bad_command_lines_are_one_line_in_a_real_process(argv, needle, tmp_path):
    """Through the installed console script, in a fresh process: exit 2, one line, no traceback, nothing written."""
    cwd_before = sorted(p.name for p in REPO.iterdir())
    proc = subprocess.run([str(Path(sys.executable).with_name("dlmjax")), *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr
    assert sorted(p.name for p in REPO.iterdir()) == cwd_before  # no runs/ folder or output appeared


def test_internal_errors_keep_their_traceback(monkeypatch):
    """A bug (here a TypeError from deep inside) is not dressed up as a user error."""
    import dlmjax.inference

    def broken(*args, **kwargs):
        raise TypeError("an internal bug")

    monkeypatch.setattr(dlmjax.inference, "open_run", broken)
    with pytest.raises(TypeError, match="an internal bug"):
        main(["sample", "--checkpoint", "x", "--prompt-ids", "1"])


@pytest.mark.parametrize("module, forbidden", [
    ("dlmjax.sampling", ("dlmjax.train", "dlmjax.data", "dlmjax.checkpoint", "orbax")),
    ("dlmjax.checkpoint", ("dlmjax.train",)),
])
def test_a_package_imports_only_what_its_job_needs(module, forbidden):
    """Checked in a fresh interpreter: the sampler needs no trainer, data pipeline or orbax; checkpoints no trainer."""
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] in ('dlmjax', 'orbax')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 (our own printed list)
    assert module in loaded  # the check can fail: the listing sees what was imported
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not bad, f"import {module} pulled in {bad}"
