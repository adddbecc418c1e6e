"""Corpus readers (text, JSON lines, Parquet, ArrayRecord), tokenizers (byte, tokenizer.json, SentencePiece),
per-process sharding, SFT rows and the data config's errors."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlmjax.config import ConfigError, DiffusionConfig, load_config
from dlmjax.data import (
    ByteTokenizer,
    CorpusIndex,
    HFTokenizer,
    ProcessShard,
    SentencePieceTokenizer,
    build_sharded_data,
    check_model_vocab,
    load_tokenizer,
    make_eval_batches,
    shard_range,
)
from dlmjax.diffusion import forward
from dlmjax.data import load_data
from dlmjax.sharding import assemble_global_batch
from dlmjax.train.loop import train_and_evaluate
from dlmjax.train.objective import _protected

DOCS = [f"doc-{i:03d}: the quick brown fox {'jumps ' * (i % 5)}over the lazy dog. café ∑ {i}" for i in range(23)]
SAMPLE_TEXT = "\n".join(DOCS * 3)


def write_corpus(tmp_path, fmt: str, docs=DOCS, n_files: int = 3):
    """`docs` split over `n_files` files of `fmt` under tmp_path/fmt; returns the glob."""
    root = tmp_path / fmt
    root.mkdir()
    parts = np.array_split(np.arange(len(docs)), n_files)
    if fmt == "text":
        for i, doc in enumerate(docs):
            (root / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
        return str(root / "*.txt")
    for k, idx in enumerate(parts):
        chunk = [docs[i] for i in idx]
        if fmt == "jsonl":
            lines = [json.dumps({"id": int(i), "body": d}) for i, d in zip(idx, chunk)]
            (root / f"part{k}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"id": [int(i) for i in idx], "body": chunk}), root / f"part{k}.parquet")
        else:
            from array_record.python.array_record_module import ArrayRecordWriter

            writer = ArrayRecordWriter(str(root / f"part{k}.array_record"), "group_size:1")
            for d in chunk:
                writer.write(d if isinstance(d, bytes) else d.encode("utf-8"))
            writer.close()
    return str(root / "part*")


# ---- readers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet", "array_record"])
def test_reader_round_trip(tmp_path, fmt):
    index = CorpusIndex.build(write_corpus(tmp_path, fmt), fmt)
    assert len(index) == len(DOCS)
    field = "text" if fmt in ("text", "array_record") else "body"
    assert index.read(0, len(DOCS), fields=(field,)) == DOCS
    assert index.read(5, 17, fields=(field,)) == DOCS[5:17]  # a range across file boundaries


def test_array_record_pretokenized_round_trip(tmp_path):
    tok = ByteTokenizer()
    ids = [tok.encode_array(d) for d in DOCS]
    path = write_corpus(tmp_path, "array_record", docs=[a.astype("<i4").tobytes() for a in ids])
    got = CorpusIndex.build(path, "array_record").read(0, len(DOCS), record_type="tokens")
    assert all(g.dtype == np.int32 and np.array_equal(g, a) for g, a in zip(got, ids))


def test_reader_errors_name_the_field(tmp_path):
    index = CorpusIndex.build(write_corpus(tmp_path, "jsonl"), "jsonl")
    with pytest.raises(ValueError, match="no field 'text'"):
        index.read(0, 1, fields=("text",))
    pq_index = CorpusIndex.build(write_corpus(tmp_path, "parquet"), "parquet")
    with pytest.raises(ValueError, match="no column 'text'"):
        pq_index.read(0, 1, fields=("text",))
    with pytest.raises(FileNotFoundError, match="data.path"):
        CorpusIndex.build(str(tmp_path / "nothing*.jsonl"), "jsonl")


# ---- tokenizers -------------------------------------------------------------------------------------

def train_bpe(tmp_path, specials=("<s>", "</s>", "<pad>")):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SAMPLE_TEXT.splitlines(), trainer)
    path = tmp_path / f"tokenizer{len(specials)}.json"
    tok.save(str(path))
    return str(path)


def train_sentencepiece(tmp_path):
    import sentencepiece as spm

    prefix = tmp_path / "spm"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SAMPLE_TEXT.splitlines()), model_prefix=str(prefix),
                                   vocab_size=80, model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=3, normalization_rule_name="identity", minloglevel=2)
    return str(prefix) + ".model"


TEXT = "the lazy fox jumps over the quick dog"


def test_byte_tokenizer_interface():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.model_vocab_size == 260 and tok.mask_id == 259
    assert tok.decode(tok.encode(TEXT + " café", bos=True, eos=True)) == TEXT + " café"


def test_hf_tokenizer_round_trip_and_mask_rule(tmp_path):
    tok = load_tokenizer(train_bpe(tmp_path))
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode(TEXT, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) < len(TEXT)  # merges happened
    assert tok.decode(ids) == TEXT
    assert tok.decode(tok.encode_array(TEXT)) == TEXT
    # the batched (multi-threaded) path the pipelines use gives the same ids as one-by-one encoding
    assert all(np.array_equal(a, tok.encode_array(d)) for a, d in zip(tok.encode_arrays(DOCS), DOCS))
    # No mask token: the mask is one past the tokenizer's ids and the model vocabulary grows by one.
    assert tok.mask_id == tok.vocab_size and tok.model_vocab_size == tok.vocab_size + 1
    assert tok.pad_id != tok.eos_id  # "<pad>" was found
    with_mask = load_tokenizer(train_bpe(tmp_path, specials=("<s>", "</s>", "<pad>", "<mask>")))
    assert with_mask.mask_id < with_mask.vocab_size and with_mask.model_vocab_size == with_mask.vocab_size
    assert with_mask.decode([with_mask.mask_id, *with_mask.encode(TEXT)]) == TEXT  # specials dropped


def test_sentencepiece_round_trip_and_mask_rule(tmp_path):
    tok = load_tokenizer(train_sentencepiece(tmp_path))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    ids = tok.encode(TEXT, bos=True, eos=True)
    assert tok.decode(ids) == TEXT and len(ids) < len(TEXT)
    assert all(np.array_equal(a, tok.encode_array(d)) for a, d in zip(tok.encode_arrays(DOCS), DOCS))
    assert tok.mask_id == tok.vocab_size == 80 and tok.model_vocab_size == 81


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="data.tokenizer='gpt2'"):
        load_tokenizer("gpt2")
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        load_tokenizer(str(tmp_path / "missing.json"))
    tok = load_tokenizer(train_sentencepiece(tmp_path))
    with pytest.raises(ValueError, match="model.vocab_size=80 .*set model.vocab_size=81"):
        check_model_vocab(tok, vocab_size=80, mask_id=80)
    with pytest.raises(ValueError, match="diffusion.mask_id=259 .*set diffusion.mask_id=80"):
        check_model_vocab(tok, vocab_size=81, mask_id=259)


# ---- per-process sharding ---------------------------------------------------------------------------

def doc_ids_in(batch, tok) -> set[int]:
    """The doc numbers of every segment in a packed batch."""
    out = set()
    for tokens, segs in zip(batch["tokens"], batch["segment_ids"]):
        for s in set(segs[segs > 0].tolist()):
            text = tok.decode(tokens[segs == s], stop_at_eos=False)
            if text.startswith("doc-"):
                out.add(int(text[4:7]))
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_two_processes_read_disjoint_shards_with_equal_batch_counts(tmp_path, fmt):
    path, tok = write_corpus(tmp_path, fmt), ByteTokenizer()
    kwargs = dict(kind="corpus", path=path, fmt=fmt, tokenizer=tok, seq_len=64, batch_size=4, seed=3,
                  block_size=8, text_field="body", eval_size=4)
    assert [shard_range(23, p, 2) for p in range(2)] == [(0, 11), (11, 22)]  # doc 22 is dropped by both
    # The row count every process keeps: agree_min's collective, done by hand for simulated processes.
    from dlmjax.data.sharded import corpus_rows
    index = CorpusIndex.build(path, fmt)
    n_rows = [len(corpus_rows(index, tok, ProcessShard(p, 2), seq_len=64, block_size=8,
                              text_field="body")["tokens"]) for p in range(2)]
    agreed = min(n - max(1, round(0.05 * n)) for n in n_rows)
    seen, counts = [], []
    for p in range(2):
        train, evals, _, _ = build_sharded_data(**kwargs, shard=ProcessShard(p, 2), train_rows=agreed)
        it = iter(train)
        epoch = agreed // 2  # local batch = 4 / 2 processes; rows cut to whole local batches
        batches = [next(it) for _ in range(epoch)]
        assert all(b["tokens"].shape == (2, 64) for b in batches)
        counts.append(epoch)
        seen.append(set().union(*(doc_ids_in(b, tok) for b in batches)) | set().union(
            *(doc_ids_in({k: v[None] for k, v in r.items()}, tok) for r in evals)))
    assert counts[0] == counts[1]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] <= set(range(11)) and seen[1] <= set(range(11, 22))


def test_sharded_iterator_resumes_and_assembles_a_global_batch(tmp_path):
    path = write_corpus(tmp_path, "jsonl")
    train, evals, _, _ = build_sharded_data(kind="corpus", path=path, fmt="jsonl", tokenizer=ByteTokenizer(),
                                            seq_len=64, batch_size=2, seed=0, text_field="body")
    it = iter(train)
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    resumed = iter(train)
    resumed.set_state(state)
    for w in want:
        got = next(resumed)
        assert all(np.array_equal(w[k], got[k]) for k in w)
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)),
                                          jax.sharding.PartitionSpec("data"))
    glob = assemble_global_batch(want[0], sharding)
    assert set(glob) == set(want[0]) and glob["segment_ids"].shape == (2, 64)
    assert np.array_equal(np.asarray(glob["tokens"]), want[0]["tokens"])
    eval_batch = make_eval_batches(evals, 4)[0]  # padded eval rows carry the packed keys too
    assert set(eval_batch) == set(want[0]) and not eval_batch["valid_mask"][len(evals):].any()


def test_batch_size_must_split_over_processes(tmp_path):
    with pytest.raises(ValueError, match="data.batch_size=3 must be a multiple of the 2 processes"):
        build_sharded_data(kind="corpus", path=write_corpus(tmp_path, "jsonl"), fmt="jsonl",
                           tokenizer=ByteTokenizer(), seq_len=64, batch_size=3, seed=0, text_field="body",
                           shard=ProcessShard(0, 2), train_rows=4)


# ---- SFT --------------------------------------------------------------------------------------------

def test_sft_rows_prompt_never_masked(tmp_path):
    pairs = [{"prompt": f"Q{i}: what is {i}+{i}?", "response": f"It is {2 * i}."} for i in range(12)]
    pairs.append({"prompt": "x" * 100, "response": "too long"})  # does not fit: dropped
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    tok = ByteTokenizer()
    with pytest.warns(UserWarning, match="1 of 13 SFT examples do not fit data.seq_len=48"):
        train, evals, _, _ = build_sharded_data(kind="sft", path=str(tmp_path / "sft.jsonl"), fmt="jsonl",
                                                tokenizer=tok, seq_len=48, batch_size=4, seed=0, val_frac=0.2)
    batch = next(iter(train))
    assert set(batch) == {"tokens", "prompt_mask", "valid_mask"}
    for tokens, prompt_mask in zip(batch["tokens"], batch["prompt_mask"]):
        n_prompt = int(prompt_mask.sum())
        assert prompt_mask[:n_prompt].all() and tokens[0] == tok.bos_id
        prompt = tok.decode(tokens[1:n_prompt])
        assert prompt.startswith("Q") and prompt.endswith("?")
        assert tok.decode(tokens[n_prompt:]).startswith("It is ") and tokens[-1] == tok.eos_id
    # The forward process at t = 1 masks every slot it may: all but the prompt.
    diff = DiffusionConfig(objective="llada_sft")
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    xt, is_masked = forward.forward_sample(jbatch["tokens"], jnp.ones((4, 1)), jnp.zeros((4, 48)), diff.mask_id,
                                           protect=_protected(jbatch, diff))
    assert not np.asarray(is_masked)[batch["prompt_mask"]].any()
    assert np.array_equal(np.asarray(xt)[batch["prompt_mask"]], batch["tokens"][batch["prompt_mask"]])
    assert np.asarray(is_masked)[~batch["prompt_mask"]].all()


# ---- config -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    (["data.kind=corpus"], "data.path"),
    (["data.kind=corpus", "data.path=x/*.bin", "data.format=bin"], "data.format='bin'"),
    (["data.kind=sft", "data.path=x.parquet", "data.format=parquet"], "data.format='parquet'"),
    (["data.kind=corpus", "data.path=x", "data.format=jsonl", "data.record_type=tokens"], "data.record_type"),
    (["data.kind=corpus", "data.path=x", "data.tokenizer=gpt2"], "data.tokenizer='gpt2'"),
    (["data.kind=corpus", "data.path=x", "data.text_field="], "data.text_field"),
    (["data.kind=corpus", "data.path=x", "diffusion.objective=llada_sft"], "diffusion.objective=llada_sft"),
    (["data.kind=dataset"], "data.kind='dataset'"),
    (["data.kind=corpus", "data.path=x", "data.packing=greedy"], "data.packing='greedy'"),
    (["data.kind=text", "data.path=x.txt", "data.tokenizer=t.json"], "data.tokenizer='t.json'"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace("*", r"\*").replace(".", r"\.")):
        load_config(None, overrides)


def test_config_accepts_corpus_and_sft():
    cfg = load_config(None, ["data.kind=corpus", "data.path=data/*.parquet", "data.format=parquet",
                             "diffusion.objective=mdlm", "diffusion.schedule=loglinear"])
    assert cfg.data.format == "parquet"
    assert load_config(None, ["data.kind=sft", "data.path=sft.jsonl", "data.format=jsonl"]).data.kind == "sft"


# ---- end to end -------------------------------------------------------------------------------------

def test_corpus_run_with_sentencepiece_trains_and_resumes_bitwise(tmp_path):
    """data.kind=corpus through the trainer: a SentencePiece vocabulary (mask = vocab_size), packed BD3 rows,
    the grain iterator checkpointed with the state; a resumed run replays the same losses."""
    spm_path = train_sentencepiece(tmp_path)
    corpus = write_corpus(tmp_path, "jsonl")
    base = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.mlp_hidden=64", "model.max_seq_len=16",
            "data.kind=corpus", f"data.path={corpus}", "data.format=jsonl", "data.text_field=body",
            f"data.tokenizer={spm_path}", "data.seq_len=16", "data.batch_size=4", "data.eval_size=4",
            "diffusion.objective=bd3", "diffusion.block_size=4", "train.steps=4", "train.log_every=1",
            "train.progress=false", "train.eval_batches=1", "checkpoint.every_steps=2"]
    with pytest.raises(ConfigError, match="set diffusion.mask_id=80"):
        load_data(load_config(None, base))
    cfg = load_config(None, base + ["model.vocab_size=81", "diffusion.mask_id=80"])
    result = train_and_evaluate(cfg, tmp_path / "run", show_examples=0)
    assert np.isfinite(result["nelbo_per_token"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]
    assert [s for s, _ in first] == [1, 2, 3, 4]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")
    train_and_evaluate(cfg, tmp_path / "run", show_examples=0)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows if r["split"] == "train"] == first


# ---- a real 2-process job ---------------------------------------------------------------------------

TWO_PROCESS_SCRIPT = """
import json, sys
import jax, numpy as np
from dlmjax import distributed
distributed.maybe_initialize()
from jax.experimental import multihost_utils
from dlmjax.data import ByteTokenizer, build_sharded_data
from dlmjax.sharding import assemble_global_batch
train, _, tok, _ = build_sharded_data(kind="corpus", path=sys.argv[1], fmt="jsonl", tokenizer=ByteTokenizer(),
                                      seq_len=128, batch_size=4, seed=0, block_size=8, text_field="body")
local = next(iter(train))
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
glob = assemble_global_batch(local, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
everything = multihost_utils.process_allgather(glob["tokens"], tiled=True)
docs = sorted({int(tok.decode(r[s == k], stop_at_eos=False)[4:7])
               for r, s in zip(local["tokens"], local["segment_ids"]) for k in set(s[s > 0].tolist())
               if tok.decode(r[s == k], stop_at_eos=False).startswith("doc-")})
from dlmjax.data import CorpusIndex, ProcessShard
from dlmjax.data.sharded import corpus_rows, split_rows
shard = ProcessShard.current()
rows = corpus_rows(CorpusIndex.build(sys.argv[1], "jsonl"), tok, shard, seq_len=128, block_size=8,
                   text_field="body")
kept, _ = split_rows(rows, local_batch=2, val_frac=0.05, shard=shard)  # the collective agree_min
print(json.dumps({"rows": len(kept["tokens"]), "global_shape": list(glob["tokens"].shape),
                  "local_in_global": bool(all(any(np.array_equal(l, g) for g in everything) for l in local["tokens"])),
                  "docs": docs}))
"""


def test_two_real_processes_agree_on_rows_and_read_disjoint_documents(tmp_path):
    root = Path(__file__).resolve().parents[1]
    path = write_corpus(tmp_path, "jsonl")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DLMJAX_", "SLURM_", "TPU_"))}
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   DLMJAX_COORDINATOR=f"127.0.0.1:{port}", DLMJAX_NUM_PROCESSES="2", DLMJAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", TWO_PROCESS_SCRIPT, path], env=env,
                                      cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=170)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert outs[0]["rows"] == outs[1]["rows"]  # agree_min's collective
    assert all(o["global_shape"] == [4, 128] and o["local_in_global"] for o in outs), outs
    assert outs[0]["docs"] and outs[1]["docs"] and not set(outs[0]["docs"]) & set(outs[1]["docs"]), outs
