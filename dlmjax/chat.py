"""`dlmjax chat`: a small interactive loop over a checkpoint's chat template.

Each turn appends the user's line to the conversation, renders the whole conversation through the chat template
(`Run.encode_chat`), samples the assistant's reply with the run's sampler (the user's flags over the checkpoint's
`sample.*` defaults), shows it block by block as the sampler commits each block, and appends the reply (cut at EOS /
end of turn and the stop strings) to the conversation. `/reset` starts over, `/exit` or end of input ends.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Sequence

from dlmjax.errors import DlmjaxError
from dlmjax.inference import Run, SampleRequest, sample_rows

HELP = "/reset starts a new conversation, /exit (or Ctrl-D) ends it"


class BlockPrinter:
    """Prints a reply as its blocks are committed: the text of the committed prefix, once per new block, cut
    where the final reply will be cut (EOS, end of turn, stop strings)."""

    def __init__(self, run: Run, prompt_len: int, stop: Sequence[str], write: Callable[[str], None]):
        self.run, self.prompt_len, self.stop, self.write = run, prompt_len, stop, write
        self.shown = ""

    def __call__(self, block: int, tokens) -> None:
        del block
        ids = [int(t) for t in tokens[self.prompt_len:]]
        mask = self.run.tokens.mask_id
        done = ids[: ids.index(mask)] if mask in ids else ids  # the committed prefix of the generation
        text = self.run.generated_text(done, self.stop)
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text


def chat_loop(run: Run, request: SampleRequest = SampleRequest(), *, system: str | None = None,
              stop: Sequence[str] = (), seed: int = 0, read: Callable[[str], str] = input,
              write: Callable[[str], None] | None = None, log: Callable[[str], None] | None = None) -> list[dict]:
    """Talks with `run` until `/exit` or end of input; returns the conversation (a list of messages)."""
    write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    log = log or (lambda text: print(text, file=sys.stderr))
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    run.encode_chat(start + [{"role": "user", "content": "hello"}])  # a checkpoint without a template fails now
    log(f"dlmjax chat: {run.path} ({run.config.model.arch}); {HELP}")
    turn = 0
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            write("\n")
            break
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = list(start)
            log("(a new conversation)")
            continue
        messages.append({"role": "user", "content": line})
        try:
            prompt = run.encode_chat(messages)
            write("assistant> ")
            printer = BlockPrinter(run, len(prompt), stop, write)
            t0 = time.perf_counter()
            rows, nfe = sample_rows(run, [prompt], request, seed=seed + turn, on_block=printer)
            seconds = time.perf_counter() - t0
        except DlmjaxError as e:  # a user error ends the turn, not the conversation
            messages.pop()
            write("\n")
            log(f"error: {' '.join(str(e).split())}")
            continue
        reply = run.generated_text(rows[0][len(prompt):], stop)
        if reply.startswith(printer.shown):
            write(reply[len(printer.shown):])
        write("\n")
        messages.append({"role": "assistant", "content": reply})
        log(f"({len(rows[0]) - len(prompt)} slots, {nfe} forward passes, {seconds:.1f} s)")
        turn += 1
    return messages


__all__ = ["BlockPrinter", "chat_loop"]
