"""Data for diffusion language models: a byte tokenizer, exact-match tasks, local text, grain pipelines.

  tokenizer  `ByteTokenizer`: UTF-8 bytes + PAD/BOS/EOS/MASK (vocab 260).
  tasks      procedurally generated problems (addition, 4x4 Sudoku) with a hash-based held-out split,
             and their SFT rows `[BOS] prompt answer [EOS]...`.
  text       local *.txt/*.md files packed MDLM-style into `[BOS] chunk [EOS]` rows.
  pipeline   grain sources, the resumable train stream, padded eval batches, and `build_data`.

Every record and batch is a dict: `tokens` int32, `prompt_mask` bool, `valid_mask` bool, shaped
`[L]` (record) or `[B, L]` (batch).
"""
from dlmjax.data.pipeline import (
    RowSource,
    TaskSource,
    build_data,
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
from dlmjax.data.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer

__all__ = [
    "AdditionTask", "BOS_ID", "ByteTokenizer", "EOS_ID", "MASK_ID", "PAD_ID", "Problem", "RowSource",
    "SudokuTask", "Task", "TaskSource", "TextCorpus", "VOCAB_SIZE", "build_data", "encode_problem",
    "get_task", "heldout", "in_eval_split", "make_eval_batches", "make_train_dataset", "min_seq_len",
    "pack_rows", "padding_record", "problem_from_record", "read_documents", "resolve_text_files",
    "text_record",
]
