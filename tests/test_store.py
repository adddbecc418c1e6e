"""Packed-row stores (`dlmjax pack`, `data.kind=packed`): the streamed store holds exactly the rows the in-memory
packer makes, it appears atomically, processes read disjoint equal shares, the stream resumes, and a run trains
from a store through the CLI."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dlmjax.config import ConfigError, load_config
from dlmjax.data import ByteTokenizer, CorpusIndex, load_tokenizer, pack_documents
from dlmjax.data.packing import segment_positions
from dlmjax.data.store import PackedRowSource, StoreMeta, build_store_data, check_store, split_store, write_store

ROOT = Path(__file__).resolve().parents[1]
_RNG = np.random.default_rng(0)
DOCS = [f"doc-{i:03d} " + "".join(_RNG.choice(list("abcdefgh "), 18 * (i % 7))) + " sit amet" for i in range(60)]


def jsonl_corpus(tmp_path: Path, docs=DOCS, n_files: int = 3) -> str:
    root = tmp_path / "corpus"
    root.mkdir()
    for k, idx in enumerate(np.array_split(np.arange(len(docs)), n_files)):
        (root / f"part{k}.jsonl").write_text("".join(json.dumps({"text": docs[i]}) + "\n" for i in idx))
    return str(root)


@pytest.mark.parametrize("mode, block", [("wrap", 0), ("wrap", 8), ("fit", 4)])
def test_store_rows_equal_the_in_memory_packer(tmp_path, mode, block):
    index, tok = CorpusIndex.build(jsonl_corpus(tmp_path), "jsonl"), ByteTokenizer()
    meta = write_store(index, tok, tmp_path / "store", seq_len=64, block_size=block, packing=mode,
                       rows_per_file=7, progress=False)
    want = pack_documents([tok.encode_array(d) for d in DOCS], seq_len=64, block_size=block, mode=mode,
                          pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    assert meta.n_rows == len(want["tokens"]) and len(meta.files) == -(-meta.n_rows // 7)
    assert meta.real_tokens == int(want["valid_mask"].sum()) and meta.n_documents == len(DOCS)
    source = PackedRowSource(str(tmp_path / "store"), 0, meta.n_rows, 64)
    got = np.stack([source[i]["tokens"] for i in range(meta.n_rows)])
    segs = np.stack([source[i]["segment_ids"] for i in range(meta.n_rows)])
    assert np.array_equal(got, want["tokens"]) and np.array_equal(segs, want["segment_ids"])
    assert StoreMeta.read(tmp_path / "store") == meta
    assert not (tmp_path / "store.partial").exists()


def test_segment_positions_restart_per_segment():
    segs = np.array([[1, 1, 1, 2, 2, 0, 0, 3], [0, 1, 1, 1, 1, 1, 2, 2]])
    assert segment_positions(segs).tolist() == [[0, 1, 2, 0, 1, 0, 0, 0], [0, 0, 1, 2, 3, 4, 0, 1]]


def test_store_is_written_atomically_and_never_overwritten(tmp_path):
    index, tok = CorpusIndex.build(jsonl_corpus(tmp_path), "jsonl"), ByteTokenizer()

    with pytest.raises(_Boom):
        write_store(index, _DiesHalfWay(), tmp_path / "store", seq_len=64, progress=False)
    assert not (tmp_path / "store").exists()  # nothing half-written under the final name
    assert (tmp_path / "store.partial").exists()
    write_store(index, tok, tmp_path / "store", seq_len=64, progress=False)  # a retry replaces the partial dir
    assert not (tmp_path / "store.partial").exists()
    with pytest.raises(FileExistsError, match="exists"):
        write_store(index, tok, tmp_path / "store", seq_len=64, progress=False)


class _Boom(Exception):
    pass


class _DiesHalfWay:
    """A byte tokenizer that fails on the chunk holding document 40 (chunks are small here)."""

    name, pad_id, bos_id, eos_id, mask_id, model_vocab_size = "dies", 0, 1, 2, 259, 260

    def encode_arrays(self, texts):
        if any(t.startswith("doc-040") for t in texts):
            raise _Boom
        return ByteTokenizer().encode_arrays(texts)


def test_processes_read_disjoint_equal_shares_and_the_stream_resumes(tmp_path):
    index, tok = CorpusIndex.build(jsonl_corpus(tmp_path), "jsonl"), ByteTokenizer()
    meta = write_store(index, tok, tmp_path / "store", seq_len=32, block_size=4, progress=False)
    ranges = [split_store(meta, process_index=p, process_count=2, val_frac=0.1) for p in range(2)]
    (a, av), (b, bv) = ranges
    assert a[1] - a[0] == b[1] - b[0] > 0 and a[1] <= b[0]  # equal, disjoint train shares
    assert av[1] - av[0] == bv[1] - bv[0] > 0 and b[1] <= av[0] and av[1] <= bv[0] <= meta.n_rows

    seen = []
    for p in range(2):
        train, evals = build_store_data(path=str(tmp_path / "store"), seq_len=32, batch_size=4, seed=0,
                                        process_index=p, process_count=2, eval_size=100, val_frac=0.1)
        it = iter(train)
        n_local = ranges[p][0][1] - ranges[p][0][0]
        epoch = [next(it) for _ in range(-(-n_local // 2))]  # one epoch (the last batch may reach into the next)
        assert all(b["tokens"].shape == (2, 32) for b in epoch)
        assert set(epoch[0]) == {"tokens", "segment_ids", "positions", "valid_mask", "prompt_mask"}
        rows = {r.tobytes() for b in epoch for r in b["tokens"]}
        seen.append(rows)
        assert len(evals) == ranges[p][1][1] - ranges[p][1][0]
        state = it.get_state()
        want = [next(it) for _ in range(3)]
        resumed = iter(train)
        resumed.set_state(state)
        for w in want:
            g = next(resumed)
            assert all(np.array_equal(w[k], g[k]) for k in w)
    assert not seen[0] & seen[1]
    source = PackedRowSource(str(tmp_path / "store"), 0, meta.n_rows, 32)
    assert seen[0] | seen[1] == {source[i]["tokens"].tobytes() for i in range(a[0], b[1])}  # one epoch of each


def test_config_must_match_the_store(tmp_path):
    index, tok = CorpusIndex.build(jsonl_corpus(tmp_path), "jsonl"), ByteTokenizer()
    meta = write_store(index, tok, tmp_path / "store", seq_len=32, block_size=4, progress=False)
    base = ["data.kind=packed", f"data.path={tmp_path / 'store'}", "data.seq_len=32", "model.max_seq_len=32",
            "diffusion.objective=llada"]
    check_store(meta, load_config(None, base))
    for extra, words in [(["data.seq_len=16", "model.max_seq_len=16"], "set data.seq_len=32"),
                         (["diffusion.objective=bd3", "diffusion.block_size=8"], "diffusion.block_size=8"),
                         (["diffusion.mask_id=5"], "set diffusion.mask_id=259")]:
        with pytest.raises(ValueError, match=words):
            check_store(meta, load_config(None, base + extra))
    with pytest.raises(ValueError, match="model.vocab_size=260 is too small .* set model.vocab_size=300"):
        check_store(dataclasses.replace(meta, model_vocab_size=300), load_config(None, base))
    with pytest.raises(FileNotFoundError, match="dlmjax pack"):
        StoreMeta.read(tmp_path)
    with pytest.raises(ConfigError, match="data.path is empty"):
        load_config(None, ["data.kind=packed"])


def test_pack_then_train_from_the_store_through_the_cli(tmp_path):
    """`dlmjax pack` with a SentencePiece tokenizer, then `dlmjax train data.kind=packed` (BD3 rows)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS), model_prefix=str(tmp_path / "spm"), vocab_size=40,
                                   model_type="bpe", bos_id=1, eos_id=2, pad_id=3, unk_id=0, minloglevel=2)
    tok = load_tokenizer(str(tmp_path / "spm.model"))
    common = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.mlp_hidden=64",
              "model.max_seq_len=32", f"model.vocab_size={tok.model_vocab_size}", f"diffusion.mask_id={tok.mask_id}",
              "diffusion.objective=bd3", "diffusion.block_size=4", "data.seq_len=32", f"data.tokenizer={tok.name}"]
    corpus = jsonl_corpus(tmp_path)
    run = [sys.executable, "-m", "dlmjax"]
    packed = subprocess.run(run + ["pack", "--config", str(ROOT / "configs/text.yaml"), "--out",
                                   str(tmp_path / "store"), *common, "data.kind=corpus", f"data.path={corpus}",
                                   "data.format=jsonl"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert packed.returncode == 0, packed.stderr[-3000:]
    summary = json.loads(packed.stdout.strip().splitlines()[-1])
    assert summary["documents"] == len(DOCS) and summary["rows"] > 0 and "data.kind=packed" in packed.stderr
    again = subprocess.run(run + ["pack", "--config", str(ROOT / "configs/text.yaml"), "--out",
                                  str(tmp_path / "store"), *common, "data.kind=corpus", f"data.path={corpus}",
                                  "data.format=jsonl"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr
    trained = subprocess.run(run + ["train", "--config", str(ROOT / "configs/text.yaml"), "--workdir",
                                    str(tmp_path / "run"), *common, "data.kind=packed",
                                    f"data.path={tmp_path / 'store'}", "data.batch_size=4", "data.eval_size=4",
                                    "train.steps=3", "train.progress=false", "train.eval_every=0"],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = json.loads(trained.stdout.strip().splitlines()[-1])
    assert result["step"] == 3 and np.isfinite(result["nelbo_per_token"]) and result["eval_tokens"] > 0
