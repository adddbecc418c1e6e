"""Tests for dlmjax.data: tokenizer, tasks and their held-out split, text packing, grain pipelines."""
from __future__ import annotations

import re

import numpy as np
import pytest

from dlmjax.data import (
    BOS_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    AdditionTask,
    ByteTokenizer,
    Problem,
    RowSource,
    SudokuTask,
    Task,
    TaskSource,
    TextCorpus,
    build_data,
    encode_problem,
    get_task,
    heldout,
    in_eval_split,
    make_eval_batches,
    make_train_dataset,
    min_seq_len,
    pack_rows,
    problem_from_record,
    read_documents,
    resolve_text_files,
)
from dlmjax.data.tasks import all_sudoku_grids

TOK = ByteTokenizer()


# ---- tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_ids():
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.mask_id, TOK.vocab_size) == (256, 257, 258, 259, 260)
    assert (PAD_ID, BOS_ID, EOS_ID, MASK_ID) == (256, 257, 258, 259)


@pytest.mark.parametrize("text", ["", "hello, world", "héllo wörld ✓ 日本語 🙂"])
def test_tokenizer_round_trip(text):
    ids = TOK.encode(text, bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert ids[1:-1] == list(text.encode("utf-8"))
    assert TOK.decode(ids) == text
    assert TOK.decode(np.asarray(ids, dtype=np.int32)) == text
    assert TOK.encode_array(text).tolist() == TOK.encode(text)


def test_tokenizer_drops_specials_and_stops_at_eos():
    ids = [BOS_ID, ord("a"), PAD_ID, MASK_ID, ord("b"), EOS_ID, ord("c"), EOS_ID]
    assert TOK.decode(ids) == "ab"
    assert TOK.decode(ids, stop_at_eos=False) == "abc"


def test_tokenizer_invalid_utf8_and_bad_ids():
    assert TOK.decode([0xFF, ord("a")]) == "\ufffda"
    with pytest.raises(ValueError, match="token id 260"):
        TOK.decode([1, 260])
    with pytest.raises(ValueError, match="1-D"):
        TOK.decode(np.zeros((2, 2), dtype=np.int32))


# ---- addition ----------------------------------------------------------------------------------------


def test_addition_correct_and_msd_first():
    task = AdditionTask(digits=3)
    assert (task.prompt_len, task.answer_len) == (8, 4)
    for i in range(1500):
        p = task.example(0, i)
        m = re.fullmatch(r"([1-9]\d\d)\+([1-9]\d\d)=", p.prompt)
        assert m, p
        # str() of the sum is most-significant digit first with no leading zero.
        assert p.answer == str(int(m[1]) + int(m[2]))
        assert len(p.answer) <= task.answer_len
        assert task.score(p.answer, p) and not task.score(p.answer[::-1] + "0", p)


def test_addition_curriculum_and_padded_answers():
    task = AdditionTask(digits=3, min_digits=1)
    lengths = set()
    for i in range(600):
        p = task.example(0, i)
        a, b = p.prompt[:-1].split("+")
        assert 1 <= len(a) <= 3 and 1 <= len(b) <= 3 and p.answer == str(int(a) + int(b))
        assert a[0] != "0" and b[0] != "0"
        lengths.add((len(a), len(b)))
        rec = encode_problem(p, task, TOK, 16)
        assert rec["prompt_mask"].sum() == 1 + len(p.prompt)
    assert lengths == {(x, y) for x in (1, 2, 3) for y in (1, 2, 3)}
    # Held-out problems are always full length, so evaluation measures 3-digit addition.
    assert all(re.fullmatch(r"[1-9]\d\d\+[1-9]\d\d=", p.prompt) for p in heldout(task, 50))
    # min_digits == digits draws the same stream as no curriculum.
    assert [AdditionTask(3, min_digits=3).example(0, i) for i in range(20)] == \
        [AdditionTask(3).example(0, i) for i in range(20)]
    padded = AdditionTask(3, pad_answer=True)
    answers = [padded.example(1, i).answer for i in range(300)]
    assert all(len(x) == 4 for x in answers) and any(x.startswith("0") for x in answers)
    with pytest.raises(ValueError, match="min_digits=4"):
        AdditionTask(3, min_digits=4)


def test_addition_many_digits_and_bad_digits():
    p = AdditionTask(digits=25).example(0, 0)
    a, b = p.prompt[:-1].split("+")
    assert len(a) == len(b) == 25 and p.answer == str(int(a) + int(b))
    with pytest.raises(ValueError, match="digits=0"):
        AdditionTask(digits=0)


def test_examples_are_deterministic_and_random_access():
    task = AdditionTask()
    first = [task.example(7, i) for i in range(50)]
    assert [task.example(7, i) for i in reversed(range(50))][::-1] == first
    assert [task.example(8, i) for i in range(50)] != first
    sudoku = SudokuTask()
    assert [sudoku.example(3, i) for i in range(10)] == [sudoku.example(3, i) for i in range(10)]
    assert [sudoku.example(3, i) for i in range(10)] != [sudoku.example(4, i) for i in range(10)]
    with pytest.raises(ValueError, match="seed=-1"):
        task.example(-1, 0)
    with pytest.raises(ValueError, match="split='test'"):
        task.example(0, 0, split="test")


# ---- encoding -----------------------------------------------------------------------------------------


def test_encode_problem_layout():
    task = AdditionTask(3)
    assert min_seq_len(task) == 14
    rec = encode_problem(Problem("372+859=", "1231"), task, TOK, 18)
    assert rec["tokens"].dtype == np.int32 and rec["tokens"].shape == (18,)
    assert rec["tokens"].tolist() == [BOS_ID, *b"372+859=", *b"1231"] + [EOS_ID] * 5
    assert rec["prompt_mask"].tolist() == [True] * 9 + [False] * 9
    assert rec["valid_mask"].dtype == bool and rec["valid_mask"].all()
    # A shorter answer starts the EOS padding earlier; the prompt layout does not move.
    short = encode_problem(Problem("123+456=", "579"), task, TOK, 14)
    assert short["tokens"].tolist() == [BOS_ID, *b"123+456=", *b"579"] + [EOS_ID] * 2
    assert problem_from_record(short, TOK) == Problem("123+456=", "579")


def test_encode_problem_errors_name_values():
    task = AdditionTask(3)
    with pytest.raises(ValueError, match=r"seq_len=13 .* at least 14"):
        encode_problem(Problem("372+859=", "1231"), task, TOK, 13)
    with pytest.raises(ValueError, match="does not fit"):
        encode_problem(Problem("1234+567=", "1801"), task, TOK, 16)


# ---- sudoku -------------------------------------------------------------------------------------------


def _fits(cells, i, d):
    r, c = divmod(i, 4)
    for k in range(4):
        if cells[r * 4 + k] == d or cells[k * 4 + c] == d:
            return False
    for rr in range(r // 2 * 2, r // 2 * 2 + 2):
        for cc in range(c // 2 * 2, c // 2 * 2 + 2):
            if cells[rr * 4 + cc] == d:
                return False
    return True


def _count_completions(cells, limit=2):
    """Independent brute force: fill blanks (0) left to right, counting up to `limit` grids."""
    if 0 not in cells:
        return 1
    i = cells.index(0)
    total = 0
    for d in range(1, 5):
        if _fits(cells, i, d):
            cells[i] = d
            total += _count_completions(cells, limit)
            cells[i] = 0
            if total >= limit:
                break
    return total


def _is_valid_grid(cells):
    groups = [[r * 4 + c for c in range(4)] for r in range(4)] + [[r * 4 + c for r in range(4)] for c in range(4)]
    groups += [[(br + i) * 4 + bc + j for i in range(2) for j in range(2)] for br in (0, 2) for bc in (0, 2)]
    return all(sorted(cells[k] for k in g) == [1, 2, 3, 4] for g in groups)


def test_sudoku_grid_table_is_all_valid_grids():
    grids = [tuple(g) for g in all_sudoku_grids().tolist()]
    assert len(set(grids)) == 288 == _count_completions([0] * 16, limit=10**6)
    assert all(_is_valid_grid(g) for g in grids)


def test_sudoku_puzzles_are_unique_and_consistent():
    task = SudokuTask()
    assert (task.prompt_len, task.answer_len, min_seq_len(task)) == (17, 16, 35)
    blank_counts = set()
    for i in range(120):
        p = task.example(0, i)
        assert len(p.prompt) == 17 and p.prompt.endswith("=") and re.fullmatch(r"[1-4]{16}", p.answer)
        solution = [int(ch) for ch in p.answer]
        assert _is_valid_grid(solution)
        clues = [0 if ch == "." else int(ch) for ch in p.prompt[:16]]
        assert all(k in (0, s) for k, s in zip(clues, solution))
        blanks = clues.count(0)
        assert 6 <= blanks <= 10
        blank_counts.add(blanks)
        assert _count_completions(clues) == 1, p
        assert task.score(p.answer, p)
        swapped = p.answer[1] + p.answer[0] + p.answer[2:]
        assert not task.score(swapped, p)
    assert blank_counts == set(range(6, 11))


def test_sudoku_blank_range_validation():
    p = SudokuTask(min_blanks=12, max_blanks=12).example(0, 0)
    assert p.prompt.count(".") == 12
    assert _count_completions([0 if ch == "." else int(ch) for ch in p.prompt[:16]]) == 1
    with pytest.raises(ValueError, match="max_blanks=13"):
        SudokuTask(min_blanks=6, max_blanks=13)


# ---- registry -----------------------------------------------------------------------------------------


def test_get_task():
    assert get_task("addition", digits=2) == AdditionTask(2)
    assert isinstance(get_task("sudoku"), SudokuTask)
    with pytest.raises(ValueError, match=r"task='mult'.*\['addition', 'sort', 'sudoku'\]"):
        get_task("mult")
    with pytest.raises(ValueError, match=r"\['size'\].*'digits'"):
        get_task("addition", size=3)


# ---- train / eval split ----------------------------------------------------------------------------


def test_train_stream_never_contains_eval_problems():
    task = AdditionTask(3)
    train = [task.example(0, i) for i in range(3000)]
    assert not any(in_eval_split(p) for p in train)
    # An index whose first raw draw is held out is redrawn, not dropped or kept.
    raw = [task.sample(np.random.default_rng([0, i])) for i in range(3000)]
    redrawn = [i for i, p in enumerate(raw) if in_eval_split(p)]
    assert redrawn and all(train[i] != raw[i] for i in redrawn)
    assert all(train[i] == raw[i] for i in range(3000) if i not in redrawn)


def test_heldout_distinct_and_disjoint():
    task = AdditionTask(3)
    held = heldout(task, 40, seed=0)
    assert len({p.prompt for p in held}) == 40 and all(in_eval_split(p) for p in held)
    assert heldout(task, 40, seed=0) == held
    train_prompts = {task.example(0, i).prompt for i in range(2000)}
    assert train_prompts.isdisjoint(p.prompt for p in held)
    sudoku_held = heldout(SudokuTask(), 5, seed=1)
    assert len({p.prompt for p in sudoku_held}) == 5 and all(in_eval_split(p) for p in sudoku_held)


class _ConstantTask(Task):
    """A task with a single problem, to exercise the split's failure modes quickly."""

    name = "constant"
    prompt_len = 2
    answer_len = 1

    def __init__(self, prompt):
        self.prompt = prompt

    def sample(self, rng, split="train"):
        return Problem(self.prompt, "x")


def test_split_errors_on_tiny_problem_spaces():
    eval_prompt = next(p for p in (f"{i:02d}" for i in range(1000)) if in_eval_split(Problem(p, "")))
    train_prompt = next(p for p in (f"{i:02d}" for i in range(1000)) if not in_eval_split(Problem(p, "")))
    assert len(heldout(_ConstantTask(eval_prompt), 1)) == 1
    with pytest.raises(ValueError, match=r"only 1 distinct .* n=2"):
        heldout(_ConstantTask(eval_prompt), 2)
    with pytest.raises(ValueError, match="no 'eval' problem"):
        _ConstantTask(train_prompt).example(0, 0, split="eval")


# ---- text ----------------------------------------------------------------------------------------------


def test_resolve_text_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.txt", "sub/a.md", "c.py"):
        (tmp_path / name).write_text("x")
    assert resolve_text_files(str(tmp_path / "b.txt")) == [tmp_path / "b.txt"]
    assert resolve_text_files(str(tmp_path)) == [tmp_path / "b.txt", tmp_path / "sub/a.md"]
    assert resolve_text_files(str(tmp_path / "**/*.md")) == [tmp_path / "sub/a.md"]
    missing = str(tmp_path / "nope*.txt")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        resolve_text_files(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        resolve_text_files(str(tmp_path / "empty"))


def test_pack_rows_framing_and_remainder():
    rows = pack_rows(["abcde", "xy"], TOK, seq_len=5)  # stream: a b c d e EOS x y EOS, chunks of 3
    assert rows.dtype == np.int32
    assert rows.tolist() == [[BOS_ID, *b"abc", EOS_ID], [BOS_ID, *b"de", EOS_ID, EOS_ID],
                             [BOS_ID, *b"xy", EOS_ID, EOS_ID]]
    # "abcd" + EOS is 5 tokens: one chunk of 3, and the 2 left over are dropped.
    assert pack_rows(["abcd"], TOK, seq_len=5).tolist() == [[BOS_ID, *b"abc", EOS_ID]]
    with pytest.raises(ValueError, match="seq_len=2"):
        pack_rows(["abc"], TOK, seq_len=2)


def test_read_documents_paragraphs(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("p1 line\nmore\n\np2\n  \n\np3\n\n\n")
    assert read_documents([f]) == ["p1 line\nmore\n\np2\n  \n\np3\n\n\n"]
    assert read_documents([f], split_paragraphs=True) == ["p1 line\nmore", "p2", "p3"]


def test_text_corpus_split(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 60)
    (tmp_path / "b.txt").write_text("b" * 39)  # stream 60 + 1 + 39 + 1 = 101 tokens: 10 rows of 10
    corpus = TextCorpus.load(str(tmp_path), seq_len=12, tokenizer=TOK)
    assert corpus.rows.shape == (10, 12) and corpus.seq_len == 12
    assert corpus.n_val == 1  # max(1, round(0.05 * 10))
    assert np.array_equal(corpus.val_rows, corpus.rows[-1:]) and len(corpus.train_rows) == 9
    assert TOK.decode(corpus.val_rows[0]) == "b" * 10
    assert TextCorpus.load(str(tmp_path), seq_len=12, tokenizer=TOK, val_frac=0.2).n_val == 2
    with pytest.raises(ValueError, match="seq_len=80"):
        TextCorpus.load(str(tmp_path), seq_len=80, tokenizer=TOK)
    with pytest.raises(ValueError, match="val_frac=1.5"):
        TextCorpus.load(str(tmp_path), seq_len=12, tokenizer=TOK, val_frac=1.5)


# ---- pipelines ----------------------------------------------------------------------------------------


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_task_stream_resumes_exactly():
    source = TaskSource(AdditionTask(3), seq_len=16, seed=0)
    ds = make_train_dataset(source, batch_size=4, seed=0, shuffle=False)
    it = iter(ds)
    first = _take(it, 2)
    assert first[0]["tokens"].shape == (4, 16) and first[0]["tokens"].dtype == np.int32
    assert first[0]["prompt_mask"].dtype == bool
    problems = [AdditionTask(3).example(0, i) for i in range(4)]
    assert [TOK.decode(row) for row in first[0]["tokens"]] == [p.prompt + p.answer for p in problems]
    state = it.get_state()
    expected = _take(it, 3)
    fresh = iter(ds)
    fresh.set_state(state)
    _assert_same_batches(_take(fresh, 3), expected)
    _assert_same_batches(_take(iter(ds), 2), first)


def test_text_stream_shuffles_epochs_and_resumes(tmp_path):
    rows = np.arange(6 * 5, dtype=np.int32).reshape(6, 5)
    ds = make_train_dataset(RowSource(rows), batch_size=3, seed=1, shuffle=True)
    it = iter(ds)
    batches = _take(it, 2)
    state = it.get_state()
    expected = _take(it, 4)
    epochs = [np.concatenate([b["tokens"] for b in (batches + expected)[k:k + 2]]) for k in (0, 2, 4)]
    for epoch in epochs:  # every epoch is a permutation of all rows
        assert sorted(epoch[:, 0].tolist()) == rows[:, 0].tolist()
    assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])
    assert not batches[0]["prompt_mask"].any() and batches[0]["valid_mask"].all()
    fresh = iter(ds)
    fresh.set_state(state)
    _assert_same_batches(_take(fresh, 4), expected)
    with pytest.raises(ValueError, match="batch_size=7"):
        make_train_dataset(RowSource(rows), batch_size=7, seed=1, shuffle=True)


def test_make_eval_batches_pads_last_batch():
    records = [encode_problem(p, AdditionTask(2), TOK, 12) for p in heldout(AdditionTask(2), 10)]
    batches = make_eval_batches(records, 4)
    assert len(batches) == 3 and all(b["tokens"].shape == (4, 12) for b in batches)
    last = batches[-1]
    assert last["valid_mask"].any(-1).tolist() == [True, True, False, False]
    assert (last["tokens"][2:] == PAD_ID).all() and not last["prompt_mask"][2:].any()
    np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in batches])[:10],
                                  np.stack([r["tokens"] for r in records]))


def test_build_data_task_and_text(tmp_path):
    train, evals, tok, task = build_data(kind="task", task="addition", task_kwargs={"digits": 2}, seq_len=12,
                                         batch_size=4, seed=0, eval_size=8)
    assert task == AdditionTask(2) and isinstance(tok, ByteTokenizer) and len(evals) == 8
    assert all(in_eval_split(problem_from_record(r, tok)) for r in evals)
    assert next(iter(train))["tokens"].shape == (4, 12)
    (tmp_path / "a.txt").write_text("hello world " * 20)
    train, evals, _, task = build_data(kind="text", path=str(tmp_path), seq_len=12, batch_size=2, seed=0)
    assert task is None and len(evals) == 1 and next(iter(train))["tokens"].shape == (2, 12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="image"), r"kind='image'.*\['task', 'text'\]"),
    (dict(kind="task"), "needs a task name"),
    (dict(kind="task", task="addition", path="x.txt"), "path='x.txt'"),
    (dict(kind="task", task="addition", seq_len=8), r"seq_len=8 .* at least 14"),
    (dict(kind="text"), "needs path"),
    (dict(kind="text", path="x.txt", task="addition"), "task='addition'"),
    (dict(kind="task", task="addition", batch_size=0), "batch_size=0"),
])
def test_build_data_errors(kwargs, match):
    args = dict(seq_len=16, batch_size=4, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        build_data(**args)
