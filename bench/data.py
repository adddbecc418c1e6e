"""Corpus pipeline: read, tokenize and pack throughput, row fill with block alignment, grain batch rate.

    .venv/bin/python bench/data.py [--docs 4000] [--seq-len 1024] [--batch 32] [--out bench/data_results.json]

A synthetic web-like corpus (document lengths log-normal, median ~2,000 characters as in OpenWebText; words
drawn from this repository's README) is written once in each format to a temporary directory. Then, side by
side in one run:
- read: documents per second and MB/s of `CorpusIndex.read` over the whole corpus, per format;
- tokenize: MB/s of text (document by document, and in batches as the pipeline does: the subword libraries
  use every core) and tokens/s for the byte tokenizer, a byte-level BPE `tokenizer.json` and a
  SentencePiece BPE model (both trained here on the corpus, vocabulary 4,096);
- pack: tokens/s of `pack_documents` and the fill (real tokens / row slots) in its `wrap` and `fit` modes for
  diffusion block sizes 0, 4, 16, 64, next to one-document-per-row padding (what an unpacked pipeline spends);
- stream: batches/s of the `build_sharded_data` grain stream (shuffle -> repeat -> batch) after packing in
  memory (`data.kind=corpus`, with its start-up time), and of a store written by `dlmjax pack`'s `write_store`
  (`data.kind=packed`: start-up is opening files; rows are read by index from ArrayRecord).
Prints one JSON object per row and a table; with --out writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from dlmjax.data import ByteTokenizer, CorpusIndex, load_tokenizer, pack_documents  # noqa: E402
from dlmjax.data.sharded import build_sharded_data  # noqa: E402
from dlmjax.data.store import build_store_data, write_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_docs(n: int, seed: int = 0) -> list[str]:
    words = (ROOT / "README.md").read_text(encoding="utf-8").split()
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(2000), 0.9, n), 50, 40_000).astype(int)
    out = []
    for n_chars in lengths:
        picked = rng.choice(len(words), size=n_chars // 6 + 1)
        out.append(" ".join(words[i] for i in picked)[:n_chars])
    return out


def write_formats(docs: list[str], root: Path, n_files: int = 4) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    tok = ByteTokenizer()
    parts = np.array_split(np.arange(len(docs)), n_files)
    for fmt in ("jsonl", "parquet", "array_record", "tokens"):
        (root / fmt).mkdir()
    for k, idx in enumerate(parts):
        chunk = [docs[i] for i in idx]
        (root / "jsonl" / f"part{k}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in chunk),
                                                       encoding="utf-8")
        pq.write_table(pa.table({"text": chunk}), root / "parquet" / f"part{k}.parquet")
        for fmt, encode in (("array_record", lambda d: d.encode("utf-8")),
                            ("tokens", lambda d: tok.encode_array(d).astype("<i4").tobytes())):
            writer = ArrayRecordWriter(str(root / fmt / f"part{k}.array_record"), "group_size:1")
            for d in chunk:
                writer.write(encode(d))
            writer.close()
    return {"jsonl": str(root / "jsonl"), "parquet": str(root / "parquet"),
            "array_record": str(root / "array_record"), "array_record (tokens)": str(root / "tokens")}


def train_tokenizers(docs: list[str], root: Path, vocab: int = 4096) -> dict[str, str]:
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(docs[:1000], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(root / "tokenizer.json"))
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs[:1000]), model_prefix=str(root / "spm"),
                                   vocab_size=vocab, model_type="bpe", bos_id=1, eos_id=2, pad_id=3, unk_id=0,
                                   minloglevel=2, max_sentence_length=100_000)
    return {"byte": "byte", "hf_bpe": str(root / "tokenizer.json"), "sentencepiece": str(root / "spm.model")}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    docs = make_docs(args.docs)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_formats(docs, root)
        for name, path in paths.items():
            fmt = "array_record" if name.startswith("array_record") else name
            index = CorpusIndex.build(path, fmt)
            got, sec = timed(lambda: index.read(0, len(index), record_type="tokens" if "tokens" in name else "text"))
            assert len(got) == len(docs)
            rows.append({"bench": "read", "case": name, "docs_per_s": round(len(docs) / sec), "MB_per_s":
                         round(mb / sec, 1)})
        tokenizers = train_tokenizers(docs, root)
        encoded = {}
        for name, spec in tokenizers.items():
            tok = load_tokenizer(spec)
            _, sec_one = timed(lambda: [tok.encode_array(d) for d in docs])
            ids, sec = timed(lambda: tok.encode_arrays(docs))
            encoded[name] = (tok, ids)
            n_tokens = sum(len(i) for i in ids)
            rows.append({"bench": "tokenize", "case": name, "MB_per_s_one_by_one": round(mb / sec_one, 1),
                         "MB_per_s": round(mb / sec, 1),
                         "tokens_per_s": round(n_tokens / sec), "chars_per_token": round(mb * 1e6 / n_tokens, 2)})
        for name in ("byte", "hf_bpe"):
            tok, ids = encoded[name]
            n_real = sum(len(i) + 2 for i in ids)  # + BOS and EOS
            unpacked_rows = sum(-(-(len(i) + 2) // args.seq_len) for i in ids)
            rows.append({"bench": "pack", "case": f"{name} one doc per row", "seq_len": args.seq_len,
                         "fill": round(n_real / (unpacked_rows * args.seq_len), 4), "rows": unpacked_rows})
            for mode in ("fit", "wrap"):
                for block in (0, 4, 16, 64):
                    packed, sec = timed(lambda: pack_documents(ids, seq_len=args.seq_len, block_size=block,
                                                               pad_id=tok.pad_id, bos_id=tok.bos_id,
                                                               eos_id=tok.eos_id, mode=mode))
                    assert int(packed["valid_mask"].sum()) == n_real
                    rows.append({"bench": "pack", "case": f"{name} {mode}, block {block}", "seq_len": args.seq_len,
                                 "fill": round(n_real / packed["tokens"].size, 4), "rows": len(packed["tokens"]),
                                 "tokens_per_s": round(n_real / sec)})
        stream, sec_build = timed(lambda: build_sharded_data(
            kind="corpus", path=paths["parquet"], fmt="parquet", tokenizer=load_tokenizer(tokenizers["hf_bpe"]),
            seq_len=args.seq_len, batch_size=args.batch, seed=0, block_size=16)[0])
        it = iter(stream)
        next(it)
        n_batches = 200
        _, sec = timed(lambda: [next(it) for _ in range(n_batches)])
        rows.append({"bench": "stream", "case": f"parquet + hf_bpe, batch {args.batch} x {args.seq_len}",
                     "startup_s": round(sec_build, 2), "batches_per_s": round(n_batches / sec, 1),
                     "tokens_per_s": round(n_batches * args.batch * args.seq_len / sec)})
        # The same corpus through `dlmjax pack`'s writer, then the store's stream (`data.kind=packed`).
        hf = load_tokenizer(tokenizers["hf_bpe"])
        meta, sec = timed(lambda: write_store(CorpusIndex.build(paths["parquet"], "parquet"), hf, root / "store",
                                              seq_len=args.seq_len, block_size=16, progress=False))
        rows.append({"bench": "store", "case": "write: parquet + hf_bpe, wrap, block 16", "docs_per_s":
                     round(len(docs) / sec), "MB_per_s": round(mb / sec, 1), "tokens_per_s": round(meta.real_tokens / sec),
                     "fill": round(meta.real_tokens / (meta.n_rows * args.seq_len), 4), "rows": meta.n_rows})
        (stream, _), sec_build = timed(lambda: build_store_data(path=str(root / "store"), seq_len=args.seq_len,
                                                                 batch_size=args.batch, seed=0, process_index=0,
                                                                 process_count=1))
        it = iter(stream)
        next(it)
        _, sec = timed(lambda: [next(it) for _ in range(n_batches)])
        rows.append({"bench": "stream", "case": f"store (shuffled rows), batch {args.batch} x {args.seq_len}",
                     "startup_s": round(sec_build, 2), "batches_per_s": round(n_batches / sec, 1),
                     "tokens_per_s": round(n_batches * args.batch * args.seq_len / sec)})
    for r in rows:
        print(json.dumps(r))
    print(f"\ncorpus: {len(docs)} documents, {mb:.1f} MB of text")
    keys = ["bench", "case", "docs_per_s", "MB_per_s_one_by_one", "MB_per_s", "tokens_per_s", "chars_per_token", "fill", "rows",
            "startup_s", "batches_per_s"]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"docs": len(docs), "MB": round(mb, 2), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
