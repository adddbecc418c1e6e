"""Generative perplexity (`dlmjax.genppl`), held against independent computations.

- the counting rule (truncation, EOS padding, first EOS counted and later ones not, chunks of the judge's context
  whose first token is context only) against a plain Python loop, with a fake judge of known log-probabilities;
- unigram entropy against its closed forms;
- a freshly initialised (near-uniform) dlmjax AR judge puts the gen-PPL of random texts near its vocabulary size;
  a trained one puts its own greedy samples far below random text (slow);
- the Hugging Face judge against a direct torch computation on a tiny random GPT-2 (when torch is installed);
- a bad --judge is one line, before anything is sampled.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, compiles, tiny_run_config

from dlmjax import genppl
from dlmjax.checkpoint import save_params
from dlmjax.errors import DlmjaxError, InputError, SettingsError
from dlmjax.genppl import (generative_perplexity_of_checkpoint, judge_rows, judge_texts, load_judge,
                           mean_unigram_entropy, unigram_entropy)
from dlmjax.inference import SampleRequest
from dlmjax.models.transformer import init_params

AR = ("diffusion.objective=bd3", "diffusion.block_size=1", "diffusion.clip_min=1.0", "diffusion.clip_max=1.0")


def text_config(*extra):
    return tiny_run_config("data.seq_len=32", "model.max_seq_len=32", f"data.path={REPO / 'README.md'}", *extra,
                           base=str(REPO / "configs" / "text_ar.yaml"))


def export(path, cfg, seed=0):
    """A params-only export of freshly initialised parameters: a checkpoint without training."""
    return str(save_params(path, cfg, init_params(cfg.model, jax.random.PRNGKey(seed))))


# -- the counting rule ------------------------------------------------------------------------------------------

ALPHABET = "|abcdefghijklmnopqrstuvwxyz"  # "|" is the fake judge's EOS (id 0)


@dataclasses.dataclass(frozen=True)
class FakeJudge:
    """log p(x_j | x_<j) = -(1 + x_j / 10 + x_{j-1} / 100 + j / 1000), j the slot within the scored row: every
    value says which token, which previous token and which chunk slot it was computed for. Slot 0 and invalid
    slots hold +5, which no log-probability can be, so counting them shows."""

    context: int
    eos_id: int | None = 0
    name: str = "fake"

    def encode(self, text):
        return [ALPHABET.index(c) for c in text]

    def token_log_probs(self, tokens, valid):
        tokens = np.asarray(tokens, np.float64)
        previous = np.pad(tokens, ((0, 0), (1, 0)))[:, :-1]
        slot = np.arange(tokens.shape[1])[None]
        out = -(1 + tokens / 10 + previous / 100 + slot / 1000)
        out[:, 0] = 5.0
        return np.where(valid, out, 5.0)


def loop_gen_ppl(texts, judge: FakeJudge, length: int):
    """The protocol one token at a time: cut, pad with EOS, chunk, count non-EOS tokens and the first EOS."""
    eos, total, counts = judge.eos_id, 0.0, []
    for text in texts:
        ids = judge.encode(text)[:length]
        if eos is not None:
            ids = ids + [eos] * (length - len(ids))
        first_eos = ids.index(eos) if eos in ids else None
        count = 0
        for start in range(0, len(ids), judge.context):
            chunk = ids[start:start + judge.context]
            for k in range(1, len(chunk)):
                if chunk[k] == eos and start + k != first_eos:
                    continue
                total += 1 + chunk[k] / 10 + chunk[k - 1] / 100 + k / 1000
                count += 1
        counts.append(count)
    return math.exp(total / sum(counts)), counts


TEXTS = ["abc", "abcd", "ab|cd|ef", "abcdefghijklmn", "", "|abc", "zzzzzzzzz", "a"]


@pytest.mark.parametrize("eos_id", [0, None])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_the_counting_rule_matches_a_plain_loop(eos_id, batch_size):
    judge = FakeJudge(context=4, eos_id=eos_id)
    score = judge_texts(TEXTS, judge, length=10, batch_size=batch_size)
    expected, counts = loop_gen_ppl(TEXTS, judge, length=10)
    assert score.sample_tokens.tolist() == counts
    np.testing.assert_allclose(score.gen_ppl, expected, rtol=1e-12)
    # Pooled over tokens, not a mean of per-sample perplexities.
    assert score.gen_ppl == pytest.approx(math.exp(score.sample_nll.sum() / score.sample_tokens.sum()), rel=1e-12)


def test_the_counting_rule_by_hand():
    judge = FakeJudge(context=4)
    rows = judge_rows([judge.encode(t) for t in TEXTS], length=10, context=4, eos_id=0)
    counted = [np.flatnonzero(c).tolist() for c in rows.counted]
    assert counted[0] == [1, 2, 3]  # "abc" + its end: the first padding EOS (slot 3) is scored
    assert counted[1] == [1, 2, 3]  # "abcd": its end falls on a chunk start (slot 4), context only
    assert counted[2] == [1, 2, 3, 6, 7]  # "ab|cd|ef": the first EOS counts, the second (slot 5) and a chunk
    #                                        start (slot 4) do not, the padding EOS at 8 does not
    assert counted[3] == [1, 2, 3, 5, 6, 7, 9]  # cut to 10 tokens: no EOS, slots 0, 4, 8 start chunks
    assert counted[4] == [] and counted[5] == [1, 2, 3]  # "" and "|abc": their first EOS is a chunk's context
    assert rows.valid[0].tolist() == [True] * 4 + [False] * 6  # the sample and its first padding EOS


def test_nothing_counted_is_nan_not_an_error():
    score = judge_texts(["", ""], FakeJudge(context=4), length=6, batch_size=2)
    assert score.tokens == 0 and math.isnan(score.gen_ppl)


# -- unigram entropy --------------------------------------------------------------------------------------------


def test_unigram_entropy_closed_forms():
    assert unigram_entropy([7] * 12) == 0.0
    assert unigram_entropy([]) == 0.0
    for k in (1, 2, 5, 64):
        assert unigram_entropy(list(range(100, 100 + k))) == pytest.approx(math.log(k), rel=1e-12)
    assert unigram_entropy([3, 3, 4, 5]) == pytest.approx(1.5 * math.log(2), rel=1e-12)  # (1/2, 1/4, 1/4)
    assert mean_unigram_entropy([[5] * 7, list(range(9))]) == pytest.approx(math.log(9) / 2, rel=1e-12)


# -- dlmjax judges ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_ar_run(tmp_path_factory):
    """A freshly initialised AR text run (init_std 0.02: near-uniform predictions over the 259 byte ids)."""
    return export(tmp_path_factory.mktemp("judge") / "ar", text_config(*AR))


@pytest.fixture(scope="module")
def fresh_ar_judge(fresh_ar_run):
    return load_judge(fresh_ar_run)


def test_untrained_ar_judge_puts_random_text_near_its_vocabulary_size(fresh_ar_judge):
    judge = fresh_ar_judge
    vocab = judge.run.config.model.vocab_size - 1  # SUBS: the mask id is never predicted (259 byte ids)
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list(ALPHABET[1:] + " .,;ABCXYZ"), 70)) for _ in range(12)]
    score = judge_texts(texts, judge, length=64, batch_size=8)
    assert score.tokens == 12 * (64 - 2)  # BOS + 63 bytes per 64-slot row, two chunks of 32: their first slots
    # Why 5%: at init (init_std 0.02) the logits spread by sigma ~ 0.1 nats around their mean, so a token's NLL is
    # log V plus a zero-mean term of that size; the pooled mean over 744 tokens moves log(PPL) off log V by about
    # sigma^2 / 2 + sigma / sqrt(n) ~ 0.01. A slip in the protocol moves it much further: a log-softmax over the
    # wrong axis, counting unscored slots (log-prob 0), or a missing exp.
    tokens = np.asarray([judge.encode(t)[:32] for t in texts], np.int32)
    logp = np.asarray(judge.token_log_probs(tokens, np.ones(tokens.shape, bool)))[:, 1:]
    assert logp.std() < 0.2
    assert abs(math.log(score.gen_ppl / vocab)) < 0.05, score.gen_ppl


def test_dlmjax_judge_gives_normalised_next_token_probabilities(fresh_ar_judge):
    judge = fresh_ar_judge
    cfg = judge.run.config
    vocab = [v for v in range(cfg.model.vocab_size) if v != cfg.diffusion.mask_id]
    base = np.asarray(judge.encode("hello, w"), np.int32)  # BOS + 8 bytes
    rows = np.repeat(base[None], len(vocab), axis=0)
    rows[:, 4] = vocab  # every token at slot 4
    rows[:, 6] = np.roll(vocab, 7)  # and something different after it
    logp = np.asarray(judge.token_log_probs(rows, np.ones(rows.shape, bool)), np.float64)
    # p(. | slots < 4) sums to 1 over the vocabulary, and nothing at a slot depends on a later token.
    assert abs(np.logaddexp.reduce(logp[:, 4])) < 1e-5
    np.testing.assert_array_equal(logp[:, :4], np.repeat(logp[:1, :4], len(vocab), axis=0))
    assert np.ptp(logp[:, 5]) > 0  # slot 5 does see slot 4


def test_the_dlmjax_judge_compiles_once_for_any_texts_of_one_length(fresh_ar_judge):
    with compiles("ar_token_log_probs") as counter:  # a batch size no other test uses: the first call compiles
        judge_texts(["a", "bc" * 30, "", "hello there", "x" * 47, "why", "q"], fresh_ar_judge, length=48,
                    batch_size=5)
        first = counter.count
        judge_texts(["other", "texts" * 9, "of other lengths"], fresh_ar_judge, length=48, batch_size=5)
        second = counter.count - first
    assert (first, second) == (1, 0)


def test_checkpoint_end_to_end_with_a_near_uniform_sampler_and_judge(fresh_ar_run, fresh_ar_judge):
    # The untrained run samples near-random bytes at temperature 1 and judges them near-uniformly: gen-PPL near
    # the vocabulary size (the 5% band as above; bytes that are not UTF-8 come back as U+FFFD, 3 bytes, which a
    # near-uniform judge scores like any other bytes).
    lines = []
    request = SampleRequest(temperature=1.0)
    report = generative_perplexity_of_checkpoint(fresh_ar_run, fresh_ar_judge, samples=6, batch_size=4,
                                                 request=request, progress=False, log=lines.append)
    assert report["samples"] == 6 and report["batch_size"] == 4 and report["sample_length"] == 32
    assert report["nfe"] == 31  # block size 1, fused commits: 31 generated slots, one forward each
    assert report["judge"] == fresh_ar_run and report["judge_context"] == 32 and len(lines) == 2
    assert abs(math.log(report["gen_ppl"] / 259)) < 0.05, report
    assert report["gen_ppl"] == pytest.approx(math.exp(report["nll_per_token"]), rel=1e-12)
    # The same samples (seeded per call), and their entropy from the sampler's own ids.
    run = fresh_ar_judge.run
    drawn = genppl.sample_texts(run, 6, seed=0, batch_size=4, request=request)
    assert list(drawn.texts[:3]) == report["examples"]
    assert report["unigram_entropy"] == pytest.approx(np.mean([unigram_entropy(s) for s in drawn.ids]), rel=1e-12)
    assert report["unigram_entropy"] > 0.8 * math.log(31)  # near-random bytes: few repeats in 31 slots
    other = genppl.sample_texts(run, 6, seed=1, batch_size=4, request=request)
    assert other.ids != drawn.ids and len(set(drawn.ids)) == 6  # batches and seeds draw different samples


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("sampled before the judge was checked")

    monkeypatch.setattr(genppl, "sample_generation", refuse)


def test_a_missing_judge_is_one_line_before_sampling(tmp_path, no_sampling):
    missing = str(tmp_path / "no-such-run")
    with pytest.raises(InputError) as err:
        generative_perplexity_of_checkpoint(missing, missing, samples=2)
    assert "--judge" in str(err.value) and missing in str(err.value) and "\n" not in str(err.value)
    assert err.value.field == "judge"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="--judge .*not a readable dlmjax checkpoint") as err:
        load_judge(str(empty))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("objective", [("diffusion.objective=mdlm",),
                                       ("diffusion.objective=bd3", "diffusion.block_size=4")])
def test_a_judge_that_is_not_autoregressive_is_one_line_before_sampling(tmp_path, no_sampling, objective):
    run = export(tmp_path / "run", text_config(*objective))
    with pytest.raises(SettingsError) as err:
        generative_perplexity_of_checkpoint(run, run, samples=2)  # the checkpoint itself would sample fine
    message = str(err.value)
    assert message.startswith(f"--judge {run}: ") and "\n" not in message and err.value.field == "judge"
    assert "diffusion.block_size=1" in message and objective[0] in message


def test_bad_counts_and_a_missing_hugging_face_install_are_one_line(monkeypatch, no_sampling):
    with pytest.raises(SettingsError, match="--samples=0 is not allowed"):
        generative_perplexity_of_checkpoint("unused", "unused", samples=0)
    with pytest.raises(SettingsError, match="--batch-size=-1 is not allowed"):
        generative_perplexity_of_checkpoint("unused", "unused", samples=2, batch_size=-1)
    with pytest.raises(SettingsError, match="--seed=-3 is not allowed"):
        generative_perplexity_of_checkpoint("unused", "unused", samples=2, seed=-3)
    with pytest.raises(SettingsError, match="--judge hf: names no model; give hf:NAME_OR_FOLDER"):
        load_judge("hf:")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(SettingsError, match=r"--judge hf:gpt2 needs torch and transformers .*pip install torch") as e:
        generative_perplexity_of_checkpoint("unused", "hf:gpt2", samples=2)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_trained_judge_finds_its_own_greedy_samples_likely_and_random_text_not(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 400)
    cfg = text_config(*AR, f"data.path={corpus}", "train.steps=150", "train.eval_every=0",
                      "checkpoint.every_steps=1000", "optim.warmup_steps=10", "optim.lr=3e-3")
    from dlmjax.train.loop import train_and_evaluate

    run = tmp_path / "run"
    train_and_evaluate(cfg, run, log=lambda s: None, show_examples=0)
    lines = []
    report = generative_perplexity_of_checkpoint(run, str(run), samples=6, batch_size=4, progress=False,
                                                 request=SampleRequest(temperature=0.0), log=lines.append)
    assert report["samples"] == 6 and report["sample_length"] == 32 and report["judge_context"] == 32
    assert report["nfe"] == 31  # block size 1, fused commits: 31 generated slots, one forward each
    assert report["judge"] == str(run) and len(lines) == 2
    assert 1.0 < report["gen_ppl"] < 2.0, report
    assert report["gen_ppl"] == pytest.approx(math.exp(report["nll_per_token"]), rel=1e-12)
    # Greedy unconditional samples are one text; its bytes are those of the corpus sentence.
    assert report["unigram_entropy"] == pytest.approx(unigram_entropy(report["examples"][0].encode()), rel=1e-12)
    judge = load_judge(str(run))
    rng = np.random.default_rng(0)
    noise = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz .,"), 40)) for _ in range(6)]
    random_ppl = judge_texts(noise, judge, length=32, batch_size=4).gen_ppl
    assert random_ppl > 50 * report["gen_ppl"], (random_ppl, report["gen_ppl"])


# -- the Hugging Face judge -------------------------------------------------------------------------------------

CORPUS = ["the cat sat on the mat", "a dog ran in the park", "diffusion models denoise text",
          "judges score samples token by token"] * 4


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):  # used only by `torch`-marked tests
    """A 2-layer d_model 32 random GPT-2 (context 16) and a byte-level BPE tokenizer, saved as a Hugging Face
    folder."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eos = tok.token_to_id("<|endoftext|>")
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=16, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=eos, eos_token_id=eos, initializer_range=0.3)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def direct_log_probs(model, ids):
    """float64[n]: log p(ids[j] | ids[:j]) from one unpadded torch forward (slot 0: 0)."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()
    return np.array([0.0] + [logp[j - 1, ids[j]] for j in range(1, len(ids))])


@pytest.mark.torch
def test_hugging_face_judge_matches_a_direct_torch_computation(tiny_gpt2):
    import transformers

    judge = load_judge(f"hf:{tiny_gpt2}")
    assert judge.name == f"hf:{tiny_gpt2}" and judge.context == 16 and judge.eos_id == judge.tokenizer.eos_token_id
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    texts = ["the cat sat", "a dog ran in the park and the cat sat on the mat", "denoise"]
    ids = [judge.encode(t)[:16] for t in texts]
    assert ids[0] == transformers.AutoTokenizer.from_pretrained(tiny_gpt2)("the cat sat")["input_ids"]
    tokens = np.zeros((3, 16), np.int32)
    valid = np.zeros((3, 16), bool)
    for i, row in enumerate(ids):  # right-padded rows of different lengths
        tokens[i, :len(row)], valid[i, :len(row)] = row, True
    ours = np.asarray(judge.token_log_probs(tokens, valid), np.float64)
    for i, row in enumerate(ids):
        expected = direct_log_probs(model, row)
        np.testing.assert_allclose(ours[i, 1:len(row)], expected[1:], rtol=1e-5)
        assert not ours[i, len(row):].any()
    assert np.ptp(ours[valid]) > 0.5  # peaked random weights: the comparison is not between constants

    # The whole protocol with chunks of the judge's 16-token context, against torch one chunk at a time.
    length, eos = 40, judge.eos_id
    total, count = 0.0, 0
    for text in texts:
        row = judge.encode(text)[:length]
        row = row + [eos] * (length - len(row))
        first_eos = row.index(eos) if eos in row else None
        for start in range(0, length, 16):
            chunk = row[start:start + 16]
            end = next((k + 1 for k in range(len(chunk)) if start + k == first_eos), len(chunk))
            logp = direct_log_probs(model, chunk[:end])  # padding after the first EOS is never read
            for k in range(1, end):
                if chunk[k] != eos or start + k == first_eos:
                    total, count = total - logp[k], count + 1
    score = judge_texts(texts, judge, length=length, batch_size=2)
    assert score.tokens == count
    np.testing.assert_allclose(score.gen_ppl, math.exp(total / count), rtol=1e-5)


@pytest.mark.torch
def test_hugging_face_judge_that_cannot_load_is_one_line(tiny_gpt2, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"--judge hf:\S+: cannot load a Hugging Face causal LM") as err:
        load_judge(f"hf:{tmp_path / 'nothing-here'}")
    assert "\n" not in str(err.value) and isinstance(err.value, DlmjaxError)


# -- the command line -------------------------------------------------------------------------------------------


def test_dlmjax_eval_gen_ppl_prints_one_json_line(fresh_ar_run, capsys):
    from dlmjax.cli import main

    argv = ["eval", "--checkpoint", fresh_ar_run, "--gen-ppl", "--judge", fresh_ar_run, "--samples", "2",
            "--batch-size", "2", "--temperature", "1", "--seed", "3"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["samples"] == 2 and report["batch_size"] == 2 and report["seed"] == 3
    assert report["judge"] == fresh_ar_run and report["nfe"] == 31  # one forward per generated slot
    assert abs(math.log(report["gen_ppl"] / 259)) < 0.3, report  # 2 samples only: a wider band than above


@pytest.mark.parametrize("extra,named", [
    (["--gen-ppl"], "--judge"),
    (["--judge", "x"], "--judge"),
    (["--samples", "3"], "--samples"),
    (["--gen-ppl", "--judge", "x", "--mc-num", "4"], "--mc-num"),
    (["--gen-ppl", "--judge", "x", "--lm-eval", "dlmjax_addition"], "--gen-ppl"),
    (["--gen-ppl", "--judge", "x", "sample.steps=2"], "--gen-ppl"),
    (["--gen-ppl", "--judge", "x", "--samples", "0"], "--samples"),
])
def test_gen_ppl_flags_are_checked_before_any_work(extra, named, capsys, no_sampling):
    from dlmjax.cli import main

    assert main(["eval", "--checkpoint", "nowhere", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
