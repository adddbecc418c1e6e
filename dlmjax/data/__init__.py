"""Data for diffusion language models: a byte tokenizer, exact-match tasks, local text, grain pipelines.

  tokenizer  `ByteTokenizer`: UTF-8 bytes + PAD/BOS/EOS/MASK (vocab 260).
  tasks      procedurally generated problems (addition, 4x4 Sudoku) with a hash-based held-out split,
             and their SFT rows `[BOS] prompt answer [EOS]...`.
  text       local *.txt/*.md files packed MDLM-style into `[BOS] chunk [EOS]` rows.
  pipeline   grain sources, the resumable train stream, padded eval batches, and `build_data` (task, text).
  formats    corpus files (text, JSON lines, Parquet, ArrayRecord) as numbered records; per-process shards.
  packing    documents packed into rows with `segment_ids` / `positions` (diffusion-block aligned); SFT rows.
  sharded    per-process pipelines for `kind=corpus` / `kind=sft` / `kind=packed`.
  store      packed rows on disk: `write_store` (`dlmjax pack`) and the `kind=packed` reader.
  build      a run's data from its config (`load_data`, `load_eval_data`: the one dispatch on `data.kind`).

Every record and batch is a dict: `tokens` int32, `prompt_mask` bool, `valid_mask` bool, shaped
`[L]` (record) or `[B, L]` (batch). Packed rows add `segment_ids` int32 (0 on padding) and `positions` int32.
"""
from dlmjax.data.pipeline import (
    RowSource,
    TaskSource,
    build_data,
    build_eval_data,
    make_eval_batches,
    make_train_dataset,
    padding_record,
)
from dlmjax.data.tasks import (
    AdditionTask,
    Problem,
    SudokuTask,
    Task,
    encode_problem,
    get_task,
    heldout,
    in_eval_split,
    min_seq_len,
    problem_from_record,
)
from dlmjax.data.text import TextCorpus, pack_rows, read_documents, resolve_text_files, text_record
from dlmjax.data.formats import FORMATS, CorpusIndex, resolve_files, shard_range
from dlmjax.data.packing import (
    iter_packed_rows,
    pack_documents,
    row_record,
    segment_positions,
    sft_row,
    sft_rows,
)
from dlmjax.data.sharded import ProcessShard, build_sharded_data, sharded_eval_records
from dlmjax.data.store import PackedRowSource, StoreMeta, build_store_data, write_store
from dlmjax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    VOCAB_SIZE,
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    check_model_vocab,
    load_tokenizer,
)
from dlmjax.data.build import EvalData, RunData, data_tokenizer, load_data, load_eval_data

__all__ = [
    "AdditionTask", "BOS_ID", "ByteTokenizer", "EOS_ID", "MASK_ID", "PAD_ID", "Problem", "RowSource",
    "SudokuTask", "Task", "TaskSource", "TextCorpus", "VOCAB_SIZE", "build_data", "encode_problem",
    "get_task", "heldout", "in_eval_split", "make_eval_batches", "make_train_dataset", "min_seq_len",
    "pack_rows", "padding_record", "problem_from_record", "read_documents", "resolve_text_files",
    "text_record", "FORMATS", "CorpusIndex", "HFTokenizer", "ProcessShard", "SentencePieceTokenizer", "Tokenizer",
    "build_sharded_data", "check_model_vocab", "load_tokenizer", "pack_documents",
    "resolve_files", "sft_row", "sft_rows", "shard_range", "iter_packed_rows", "row_record", "segment_positions",
    "PackedRowSource", "StoreMeta", "build_store_data", "write_store", "EvalData", "RunData", "build_eval_data",
    "data_tokenizer", "load_data", "load_eval_data", "sharded_eval_records",
]
