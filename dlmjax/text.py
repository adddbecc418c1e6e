"""Text in and out of a released model: its tokenizer files, special tokens and chat template.

A Hugging Face release carries `tokenizer.json` (read here with `tokenizers`, no `transformers`),
`tokenizer_config.json` (the special tokens by name and the Jinja chat template), `special_tokens_map.json` and
`config.json` (the model's token ids). `dlmjax convert --from-hf` copies them into `<checkpoint>/hf/`, and
`ReleaseText.from_folder` reads them from there (or from a release folder directly).

Prompts are built the way the reference scripts build them:

* a plain prompt is `tokenizer(text)["input_ids"]`: whatever the tokenizer's own post-processor adds (LLaDA's and
  Qwen2's add nothing, so a plain prompt has no BOS);
* a chat is rendered as text by the chat template (`messages`, `add_generation_prompt`, the special tokens by
  name, in a sandboxed Jinja environment configured as Hugging Face configures it), then tokenized *without* added
  special tokens: the template writes the BOS itself, and adding another would double it.

Generated text is the generation decoded without special tokens, cut before the first stop token (EOS, or the
end-of-turn token the chat template closes a message with), then before the first stop string.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any, Sequence

from dlmjax.errors import InputError

TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE = "tokenizer.json", "tokenizer_config.json", \
    "special_tokens_map.json"
# What travels with a converted checkpoint (`dlmjax convert` copies those present; export writes them back).
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE, "tokenizer.model")
# The special tokens a chat template may name (Hugging Face passes the whole special-tokens map).
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
ROLES = ("system", "user", "assistant")


def _content(value) -> str | None:
    """A special token as the config files write it: a string, or `{"content": ...}`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


class ChatTemplate:
    """A Jinja chat template, rendered in an immutable sandbox with Hugging Face's conventions: blocks trimmed
    (`trim_blocks`, `lstrip_blocks`), loop controls, a `tojson` filter, and `raise_exception` / `strftime_now`
    helpers; the special tokens are variables (`bos_token`, ...)."""

    def __init__(self, source: str, tokens: dict[str, str]):
        from jinja2 import TemplateError  # noqa: PLC0415 (jinja2 is only needed for chats)
        from jinja2.ext import loopcontrols  # noqa: PLC0415
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(value, indent=None):
            return json.dumps(value, ensure_ascii=False, indent=indent)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self.source = source
        self.tokens = dict(tokens)
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise InputError(f"the chat template does not parse: {e}") from None

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError  # noqa: PLC0415

        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.tokens)
        except TemplateError as e:
            raise InputError(f"the chat template refused the conversation: {e}") from None


def check_messages(messages: Sequence[dict]) -> list[dict]:
    """Each message a {"role", "content"} mapping with a known role and string content."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise InputError(f"message {i} must be {{'role': one of {list(ROLES)}, 'content': text}}, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    if not out:
        raise InputError("a chat needs at least one message")
    return out


def conversation(prompt: str, system: str | None = None) -> list[dict]:
    """The messages of a one-turn chat: an optional system message, then the user's prompt."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


@dataclasses.dataclass(frozen=True)
class ReleaseText:
    """A released model's text interface (see the module docstring)."""

    folder: Path
    tokenizer: Any  # tokenizers.Tokenizer
    tokens: dict[str, str]  # named special tokens (bos_token, eos_token, ...) as the template sees them
    template: ChatTemplate | None
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    eot_id: int | None  # the token a chat template closes each message with (<|eot_id|>, <|im_end|>), if any
    special_ids: frozenset[int]

    @classmethod
    def from_folder(cls, folder: str | Path, model_ids: dict | None = None) -> "ReleaseText | None":
        """The text interface of the tokenizer files in `folder`; None if it has no `tokenizer.json`.

        Special tokens come from the files: `tokenizer_config.json` (then `special_tokens_map.json`) names them, the
        tokenizer gives their ids, and `model_ids` (the model's config.json ids: bos_id, eos_id, pad_id) fill in
        what the tokenizer files do not name. EoT is the special token the chat template writes after a message.
        """
        import tokenizers  # noqa: PLC0415

        folder = Path(folder)
        if not (folder / TOKENIZER_FILE).is_file():
            return None
        try:
            tok = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        except Exception as e:  # noqa: BLE001 - the library's own message names what is wrong with the file
            raise InputError(f"{folder / TOKENIZER_FILE} cannot be read by `tokenizers`: {e}") from None
        config = _read_json(folder / TOKENIZER_CONFIG_FILE) if (folder / TOKENIZER_CONFIG_FILE).is_file() else {}
        mapping = _read_json(folder / SPECIAL_TOKENS_FILE) if (folder / SPECIAL_TOKENS_FILE).is_file() else {}
        tokens = {}
        for name in NAMED_TOKENS:
            text = _content(config.get(name)) or _content(mapping.get(name))
            if text is not None:
                if tok.token_to_id(text) is None:
                    raise InputError(f"{folder / TOKENIZER_CONFIG_FILE}: {name}={text!r} is not a token of "
                                     f"{folder / TOKENIZER_FILE}")
                tokens[name] = text
        ids = {name: tok.token_to_id(tokens[name]) if name in tokens else None for name in NAMED_TOKENS}
        model_ids = model_ids or {}
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        chat = ChatTemplate(template, tokens) if isinstance(template, str) else None
        special = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        text = cls(folder=folder, tokenizer=tok, tokens=tokens, template=chat,
                   bos_id=ids["bos_token"] if ids["bos_token"] is not None else model_ids.get("bos_id"),
                   eos_id=ids["eos_token"] if ids["eos_token"] is not None else model_ids.get("eos_id"),
                   pad_id=ids["pad_token"] if ids["pad_token"] is not None else model_ids.get("pad_id"),
                   eot_id=None, special_ids=special)
        return dataclasses.replace(text, eot_id=text._end_of_turn())

    def _end_of_turn(self) -> int | None:
        """The special token the template writes right after a message's text (None without a template)."""
        if self.template is None:
            return None
        marker = "dlmjax-end-of-turn-probe"
        try:
            rendered = self.template.render([{"role": "user", "content": marker}], add_generation_prompt=False)
        except InputError:
            return None
        after = rendered[rendered.find(marker) + len(marker):] if marker in rendered else ""
        ids = self.tokenizer.encode(after, add_special_tokens=False).ids if after else []
        return ids[0] if ids and ids[0] in self.special_ids else None

    # -- prompts ---------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """A plain prompt, as `tokenizer(text)["input_ids"]` (the tokenizer's post-processor adds what it adds)."""
        return list(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def render_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        if self.template is None:
            raise InputError(f"{self.folder / TOKENIZER_CONFIG_FILE} has no chat_template; sample without --chat")
        return self.template.render(check_messages(messages), add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """A chat: the template's text, tokenized without added special tokens (the template wrote them)."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    # -- output ----------------------------------------------------------------------------------------------
    def stop_ids(self) -> frozenset[int]:
        return frozenset(i for i in (self.eos_id, self.eot_id) if i is not None)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids as text, special tokens left out (ids past the tokenizer's vocabulary are dropped too)."""
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        return self.tokenizer.decode([int(i) for i in ids if 0 <= int(i) < size], skip_special_tokens=True)


@dataclasses.dataclass(frozen=True)
class RunText:
    """The text interface of a run trained here: prompts framed as its training rows (BOS + text), no chat
    template, output decoded by the run's tokenizer (`dlmjax.data.tokenizer`) without its special ids."""

    tokenizer: Any

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_id

    @property
    def pad_id(self) -> int | None:
        return self.tokenizer.pad_id

    eot_id = None  # no chat template, so no end-of-turn token

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=True)

    def encode_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> list[int]:
        raise InputError(f"--chat: this run's tokenizer ({self.tokenizer.name}) has no chat template; sample a "
                         "plain --prompt, or a converted release that ships one")

    def stop_ids(self) -> frozenset[int]:
        return frozenset({self.tokenizer.eos_id})

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), stop_at_eos=False)


def generated_text(decode, ids: Sequence[int], stop_ids: frozenset[int], stop: Sequence[str] = ()) -> str:
    """A generation as text: cut before the first stop token, decoded, then cut before the first stop string."""
    ids = list(ids)
    cut = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
    text = decode(ids[:cut])
    ends = [text.find(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else text


__all__ = ["ChatTemplate", "ReleaseText", "RunText", "TOKENIZER_FILES", "check_messages", "conversation", "generated_text"]
