"""Released models' text: tokenizer files that travel with the checkpoint, chat templates, text in and text out.

Held against independent references: the golden outputs of the original LLaDA / Fast-dLLM code on the
released-layout `tests/golden/tiny_llada_chat` folder (tokens, NFE and text through the command line), and
`transformers`' own `apply_chat_template` / tokenizer on released-layout folders built by
`tests/release_fixture.py` (LLaDA-Instruct / Llama-3-style and Dream / Qwen2-style templates).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dlmjax.cli import main
from dlmjax.interchange import HF_DIR, convert_from_hf, export_to_hf

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_llada_chat"
CHAT = json.loads((GOLDEN / "golden_chat.json").read_text())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    convert_from_hf(GOLDEN, "llada", root / "ckpt")
    return root


def _sample_json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


CASES = [(p, c) for p in CHAT["prompts"] for c in p["cases"]]


@pytest.mark.parametrize("prompt, case", CASES, ids=[c["name"] for _, c in CASES])
def test_chat_goldens_through_the_command_line(converted, monkeypatch, capsys, prompt, case):
    """LLaDA `generate` and Fast-dLLM's dual cache + threshold 0.9, on the chat template's input and on the plain
    prompt: the same tokens, NFE and text (decoded without special tokens, cut at EOS / EoT) as the original code,
    from a converted copy at a relative path."""
    monkeypatch.chdir(converted)
    k = case["kwargs"]
    argv = ["sample", "--checkpoint", "ckpt", "--prompt", prompt["prompt"], "--gen-length", str(k["gen_length"]),
            "--steps", str(k["steps"]), "--block-length", str(k["block_length"]), "--temperature", "0", "--json"]
    if case["input"] == "chat":
        argv.append("--chat")
    if k.get("threshold") is not None:
        argv += ["--cache", "dual", "--threshold", str(k["threshold"])]
    out = _sample_json(capsys, argv)
    assert out["tokens"] == case["output_ids"]
    assert out["nfe"] == case["nfe"]
    assert out["text"] == [case["text_until_eos"]]


def test_the_tokenizer_travels_with_the_checkpoint_and_back(converted, tmp_path):
    """convert copies the tokenizer files; export writes them back byte for byte."""
    names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]
    for name in names:
        assert (converted / "ckpt" / HF_DIR / name).read_bytes() == (GOLDEN / name).read_bytes()
    out = export_to_hf(converted / "ckpt", tmp_path / "back")
    for name in names + ["config.json", "model.safetensors"]:
        assert (out / name).read_bytes() == (GOLDEN / name).read_bytes(), name


def test_special_tokens_are_read_from_the_files(converted):
    """BOS / EOS / pad from config.json and the tokenizer files, EoT from the chat template: none guessed."""
    from dlmjax.inference import open_run

    run = open_run(converted / "ckpt")
    assert (run.tokens.mask_id, run.tokens.bos_id, run.tokens.eos_id, run.tokens.pad_id, run.tokens.eot_id) == \
        (CHAT["mask_id"], CHAT["bos_id"], CHAT["eos_id"], 481, CHAT["eot_id"])


def test_generated_text_cuts_at_stop_tokens_then_stop_strings(converted):
    from dlmjax.inference import open_run

    run = open_run(converted / "ckpt")
    case = CHAT["prompts"][0]["cases"][2]
    ids = case["generated_ids"]
    assert run.generated_text(ids) == case["text_until_eos"]  # the golden generation starts with <|eot_id|>
    last_stop = max(i for i, t in enumerate(ids) if t in (CHAT["eos_id"], CHAT["eot_id"]))
    tail = ids[last_stop + 1:]
    text = run.decode(tail)
    assert run.generated_text(tail) == text and len(text) > 4
    stop = text[2:4]
    assert run.generated_text(tail, ["zzz-never", stop]) == text[: text.find(stop)]
    assert run.generated_text([5] + [CHAT["eot_id"]] + tail) == run.decode([5])


def test_chat_flags_are_checked_before_any_work(converted, monkeypatch, capsys):
    monkeypatch.chdir(converted)
    assert main(["sample", "--checkpoint", "ckpt", "--prompt-ids", "1,2", "--chat"]) == 2
    assert "--chat" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", "ckpt", "--prompt", "hi", "--system", "be brief"]) == 2
    assert "--system" in capsys.readouterr().err


# -- released-layout folders built here, held against transformers ----------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": " What is the capital of France? "}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "How many cats?"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
     {"role": "user", "content": "three\nfour"}],
]


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    from release_fixture import make_release

    root = tmp_path_factory.mktemp("releases")
    return {"llada": make_release("llada", root / "llada"),
            "dream": make_release("dream", root / "dream", dtype="bfloat16")}


@pytest.mark.parametrize("kind", ["llada", "dream"])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["user", "system+user", "three-turns"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(releases, kind, conversation, add_generation_prompt):
    """The template rendered with jinja2 and tokenized with `tokenizers` = `apply_chat_template` (text and ids)."""
    import transformers  # noqa: PLC0415 (the test-only reference, in the dev extra)
    from dlmjax.text import ReleaseText

    ref = transformers.AutoTokenizer.from_pretrained(releases[kind])
    ours = ReleaseText.from_folder(releases[kind])
    text = ref.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = ref.apply_chat_template(conversation, tokenize=True, add_generation_prompt=add_generation_prompt)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ours.render_chat(conversation, add_generation_prompt=add_generation_prompt) == text
    assert ours.encode_chat(conversation, add_generation_prompt=add_generation_prompt) == ids
    assert ids.count(ours.bos_id) <= 1  # never a doubled BOS


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_release_tokenizer_equals_transformers(releases, kind):
    import transformers  # noqa: PLC0415 (the test-only reference, in the dev extra)
    from dlmjax.text import ReleaseText

    ref = transformers.AutoTokenizer.from_pretrained(releases[kind])
    ours = ReleaseText.from_folder(releases[kind])
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.eot_id == ref.convert_tokens_to_ids({"llada": "<|eot_id|>", "dream": "<|im_end|>"}[kind])
    for text in ("Hello world", " The capital city of France is Paris.\n", "über naïve 東京"):
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids
        assert ours.decode(ids + [ours.eos_id]) == ref.decode(ids + [ours.eos_id], skip_special_tokens=True)


def test_a_converted_release_chats_from_the_command_line(releases, tmp_path, monkeypatch, capsys):
    """convert, then `dlmjax sample --chat --system ... --json`: the prompt is the template's ids, the text is the
    generation decoded and cut; `--stop` cuts it; bfloat16 Dream weights sample with --alg."""
    from dlmjax.text import ReleaseText, conversation

    monkeypatch.chdir(tmp_path)
    convert_from_hf(releases["llada"], "llada", "llada")
    release = ReleaseText.from_folder(releases["llada"])
    base = ["sample", "--checkpoint", "llada", "--prompt", "What is the capital of France?", "--chat",
            "--system", "Answer briefly.", "--gen-length", "16", "--steps", "16", "--block-length", "8", "--json"]
    out = _sample_json(capsys, base)
    prompt = release.encode_chat(conversation("What is the capital of France?", "Answer briefly."))
    assert out["tokens"][0][:len(prompt)] == prompt and len(out["tokens"][0]) == len(prompt) + 16
    generated = out["tokens"][0][len(prompt):]
    stops = {release.eos_id, release.eot_id}
    cut = next((i for i, t in enumerate(generated) if t in stops), len(generated))
    assert out["text"] == [release.decode(generated[:cut])]
    if len(out["text"][0]) > 2:
        stop = out["text"][0][1:3]
        assert _sample_json(capsys, base + ["--stop", stop])["text"] == [out["text"][0][: out["text"][0].find(stop)]]
    convert_from_hf(releases["dream"], "dream", "dream")
    out = _sample_json(capsys, ["sample", "--checkpoint", "dream", "--prompt", "How many cats?", "--chat",
                                "--alg", "entropy", "--gen-length", "8", "--steps", "8", "--temperature", "0",
                                "--json"])
    dream = ReleaseText.from_folder(releases["dream"])
    assert out["tokens"][0][:-8] == dream.encode_chat(conversation("How many cats?"))
    assert isinstance(out["text"][0], str)


def test_chat_keeps_the_conversation_and_shows_blocks_as_they_are_committed(converted, monkeypatch):
    """Two turns: the second prompt is the template over [user, assistant reply, user]; the reply printed block by
    block ends as the final reply; the sampler is observed once per block, in order, on every turn."""
    from dlmjax.chat import chat_loop
    from dlmjax.inference import SampleRequest, open_run
    from dlmjax.sampling import api

    run = open_run(converted / "ckpt")
    prompts, blocks = [], []
    real_generate = api.generate

    def spy(*args, on_block=None, **kwargs):
        prompts.append(list(args[2][0]))

        def seen(block, rows):
            blocks.append(block)
            on_block(block, rows)

        return real_generate(*args, on_block=seen, **kwargs)

    monkeypatch.setattr("dlmjax.inference.generate_rows", spy)
    lines = iter(["What is the capital of France?", "  ", "And of Italy?", "/exit"])
    written, logged = [], []
    request = SampleRequest(gen_length=16, steps=16, block_length=8, temperature=0.0)
    messages = chat_loop(run, request, read=lambda _: next(lines), write=written.append, log=logged.append)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert prompts[0] == run.encode_chat(messages[:1])
    assert prompts[1] == run.encode_chat(messages[:3])  # the first reply is part of the second prompt
    assert blocks == [0, 1, 0, 1]  # two blocks of 8 per turn, observed in order
    shown = "".join(written).split("assistant> ")[1:]
    assert [s.rstrip("\n") for s in shown] == [messages[1]["content"], messages[3]["content"]]
    assert "forward passes" in logged[-1]


def test_chat_refuses_a_checkpoint_without_a_template_and_survives_a_bad_turn(converted, tmp_path, monkeypatch):
    from dlmjax.chat import chat_loop
    from dlmjax.errors import DlmjaxError
    from dlmjax.inference import SampleRequest, open_run

    run = open_run(converted / "ckpt")
    lines = iter(["hello " * 2000, "/reset", "/exit"])  # the first turn does not fit the context
    logged = []
    messages = chat_loop(run, SampleRequest(gen_length=8, steps=8), read=lambda _: next(lines),
                         write=lambda _: None, log=logged.append)
    assert messages == [] and any(line.startswith("error:") for line in logged)
    no_template = dataclasses.replace(run, text=dataclasses.replace(run.text, template=None))
    with pytest.raises(DlmjaxError, match="no chat_template"):
        chat_loop(no_template, read=lambda _: "/exit")


def test_sample_with_the_cache_kernel_in_interpret_mode_gives_the_dense_tokens(converted, monkeypatch, capsys):
    """`--attention pallas_interpret`: every cached step of the dual cache runs the Pallas kernel (on CPU, in
    interpret mode) and the golden chat case comes out token for token."""
    monkeypatch.chdir(converted)
    prompt = CHAT["prompts"][0]
    case = next(c for c in prompt["cases"] if "dual_cache" in c["name"])
    out = _sample_json(capsys, ["sample", "--checkpoint", "ckpt", "--prompt", prompt["prompt"], "--chat",
                                "--gen-length", "32", "--steps", "32", "--block-length", "8", "--temperature", "0",
                                "--cache", "dual", "--threshold", "0.9", "--attention", "pallas_interpret",
                                "--json"])
    assert out["tokens"] == case["output_ids"] and out["nfe"] == case["nfe"]
