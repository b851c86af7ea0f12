"""``lmlab-chat ckpt_path=...``: talk to a language model in the terminal.

Each line typed is a message; the reply streams as it is sampled. The conversation is written for the model
as :mod:`lmlab.data.chat_format` says: the tokenizer's chat template, when a pretrained tokenizer brought one and
``template=auto``, else the plain ``User: <message>`` / ``Assistant: <reply>`` lines (the prefixes are
``user_prefix`` and ``assistant_prefix``), the format instruction tuning trains on. A reply ends at the
model's end-of-text token, or where the format ends a reply (the next user turn, the template's end-of-turn
token). The history is kept within the model's context: the oldest exchanges are left out once the
conversation and a full reply would not fit. ``/reset`` forgets the history, ``/exit`` (or end of input)
quits. With stdin not a terminal, all of stdin is one message and the reply is printed (for scripts);
``interactive=true`` reads a conversation line by line from a pipe too.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import torch
from omegaconf import DictConfig

from lmlab.config.schema import check_devices, validate_config
from lmlab.data.chat_format import ChatFormat, RenderLimits
from lmlab.errors import ConfigError
from lmlab.inference.generation import generate
from lmlab.inference.inputs import read_input_text
from lmlab.inference.language_model import LanguageModel
from lmlab.run.checkpoint import load_language_model
from lmlab.run.runtime import user_errors

log = logging.getLogger("lmlab")

COMMANDS = {"/reset": "forget the conversation so far", "/exit": "quit"}


class Conversation:
    """The turns so far (messages ``{"role": ..., "content": ...}``), and the sampling of each reply."""

    def __init__(
        self,
        model: LanguageModel,
        user_prefix: str,
        assistant_prefix: str,
        template: str = "auto",
        template_limits: RenderLimits | None = None,
        **sampling: Any,
    ) -> None:
        if model.tokenizer is None:
            raise ConfigError("This checkpoint holds no tokenizer, so it cannot read messages.")
        self.model, self.tokenizer = model, model.tokenizer
        self.format = ChatFormat.for_tokenizer(self.tokenizer, template, user_prefix, assistant_prefix, template_limits)
        self.max_new_tokens = int(sampling.pop("max_new_tokens"))
        seed = sampling.pop("seed")
        device = next(model.net.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        self.sampling = sampling
        self.turns: list[dict[str, str]] = []
        #: exchanges left out of the last prompt to fit the context
        self.dropped = 0

    def reset(self) -> None:
        self.turns.clear()

    def prompt_ids(self, message: str) -> list[int]:
        """The conversation with ``message`` and the start of the reply, in as many of the latest turns as leave
        :meth:`reply_room` in the context (the end of ``message`` alone, with a warning, if even it does not)."""
        block = self.model.context
        turns = [*self.turns, {"role": "user", "content": message}]
        self.dropped = 0
        while True:
            ids = self.tokenizer.encode(self.format.render(turns))
            if block is None or len(ids) + self.reply_room(block) <= block or len(turns) == 1:
                break
            turns, self.dropped = turns[2:], self.dropped + 1
        if block is None:
            return ids
        fits = block - self.reply_room(block)
        if len(ids) > fits:
            log.warning(
                "The message takes %d tokens, more than the %d that the model's context (data.block_size=%d) leaves "
                "beside a reply of %d: only its last %d are read.",
                len(ids),
                fits,
                block,
                self.reply_room(block),
                fits,
            )
        return ids[-fits:]

    def reply_room(self, block: int) -> int:
        """The context left for the reply: ``max_new_tokens``, at most half the context (a longer reply
        slides the context along as it grows)."""
        return min(self.max_new_tokens, block // 2)

    def reply(self, message: str, out: TextIO) -> str:
        """Sample the reply to ``message``, writing it to ``out`` as it comes; it joins the history."""
        prompt = self.prompt_ids(message)
        stop = self.format.reply_end()
        eos = self.tokenizer.eos_id
        new: list[int] = []
        shown = 0
        text = ""

        def on_token(token: torch.Tensor) -> bool:
            nonlocal shown, text
            new.append(int(token[0]))
            if eos is not None and new[-1] == eos:
                new.pop()
                return False
            text = self.tokenizer.decode(new)
            ended = stop is not None and stop in text
            if ended:
                text = text[: text.index(stop)]
            ready = len(text) if ended else _safe_length(text, stop)
            if ready > shown:
                out.write(text[shown:ready].lstrip(" ") if shown == 0 else text[shown:ready])
                out.flush()
                shown = ready
            return not ended

        device = next(self.model.net.parameters()).device
        idx = torch.tensor([prompt], dtype=torch.long, device=device)
        was_training = self.model.net.training
        self.model.net.eval()
        try:
            generate(
                self.model.net,
                idx,
                self.max_new_tokens,
                generator=self.generator,
                suppress_ids=self.model.never_sampled(),
                on_token=on_token,
                **self.sampling,
            )
        finally:
            self.model.net.train(was_training)
        answer = text.strip()
        if shown < len(text):
            out.write(text[shown:].lstrip(" ") if shown == 0 else text[shown:])
        out.write("\n")
        out.flush()
        self.turns += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        return answer


def _safe_length(text: str, stop: str | None) -> int:
    """How much of ``text`` can be shown: not a tail that may be the start of ``stop``, nor a character that
    a byte-level token has not finished (decoded as U+FFFD until its last byte comes)."""
    end = len(text.rstrip("\ufffd"))
    for size in range(min(len(stop or "") - 1, end), 0, -1):
        if stop is not None and text[:end].endswith(stop[:size]):
            return end - size
    return end


def messages(stdin: TextIO, interactive: bool, prompt: TextIO | None) -> Iterator[str]:
    """The messages typed, one per line, up to ``/exit`` or the end of input; without ``interactive``, all of
    stdin as one message."""
    if not interactive:
        yield read_input_text(None, "stdin").strip()
        return
    while True:
        if prompt is not None:
            prompt.write("> ")
            prompt.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip():
            yield line.strip()


def chat(cfg: DictConfig, stdin: TextIO | None = None, out: TextIO | None = None) -> Conversation:
    """Hold the conversation of ``cfg`` on ``stdin`` and ``out`` (the process's by default)."""
    validate_config(cfg, schema=None)
    check_devices(cfg)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    model, _ = load_language_model(cfg.ckpt_path, map_location=torch.device(cfg.device))
    if not isinstance(model, LanguageModel):
        raise ConfigError(f"'{cfg.ckpt_path}' is not a language model checkpoint; lmlab-chat needs one.")
    conversation = Conversation(
        model,
        cfg.user_prefix,
        cfg.assistant_prefix,
        cfg.template,
        RenderLimits.of(cfg.template_limits, "template_limits"),
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k or None,
        top_p=cfg.top_p,
        seed=cfg.seed,
    )
    interactive = stdin.isatty() if cfg.interactive is None else bool(cfg.interactive)
    terminal = interactive and stdin.isatty()
    if terminal:
        print(f"chatting with {cfg.ckpt_path}; " + ", ".join(f"{k}: {v}" for k, v in COMMANDS.items()), file=out)
    for message in messages(stdin, interactive, out if terminal else None):
        if message == "/reset":
            conversation.reset()
            print("(history cleared)", file=out, flush=True)
            continue
        conversation.reply(message, out)
        if conversation.dropped and terminal:
            print(f"({conversation.dropped} earliest exchange(s) left out to fit the context)", file=out)
    return conversation


def run(cfg: DictConfig) -> None:
    with user_errors():
        chat(cfg)


if __name__ == "__main__":
    from lmlab.cli import chat as chat_command

    chat_command()
