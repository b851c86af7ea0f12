"""How a conversation is written for a language model: one format for talking to a model (``lmlab-chat``) and
for the prompt/response pairs it is instruction-tuned on (``data=instructions``), so a tuned model reads at
chat time what it was trained on.

The format is a pretrained tokenizer's chat template (the Jinja template saved with it) when
it brings one and ``template=auto``; otherwise the plain template, one turn per line::

    User: <message>
    Assistant: <reply>

with the prefixes ``user_prefix`` and ``assistant_prefix``. A reply starts after the assistant prefix without
its trailing space, so the reply's first token carries the space, as the model saw it in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lmlab.errors import ConfigError
from lmlab.tokenizers import Tokenizer

#: ``template``: the tokenizer's chat template when it has one (else plain), or always the plain one
TEMPLATES: tuple[str, ...] = ("auto", "plain")
#: the roles of a conversation's turns, in the order they alternate
ROLES = ("user", "assistant")
#: what stands in for a reply when the format is asked what follows one
_REPLY_MARK = "\x00reply\x00"


@dataclass(frozen=True)
class ChatFormat:
    """Writes messages (``{"role": ..., "content": ...}``) as the model reads them."""

    user_prefix: str = "User: "
    assistant_prefix: str = "Assistant: "
    #: the Jinja source of a chat template; ``None``: the plain template
    template: str | None = None
    eos_token: str | None = None

    @classmethod
    def for_tokenizer(
        cls,
        tokenizer: Tokenizer,
        template: str = "auto",
        user_prefix: str = "User: ",
        assistant_prefix: str = "Assistant: ",
    ) -> ChatFormat:
        """The tokenizer's chat template under ``template=auto`` when it has one, else the plain template."""
        if template not in TEMPLATES:
            raise ConfigError(f"template={template!r}: pick one of {', '.join(TEMPLATES)}.")
        source = getattr(tokenizer, "chat_template", None) if template == "auto" else None
        return cls(user_prefix, assistant_prefix, source, getattr(tokenizer, "eos_token", None))

    @property
    def plain(self) -> bool:
        return self.template is None

    def render(self, messages: list[dict[str, str]], reply_follows: bool = True) -> str:
        """The conversation as the model reads it; with ``reply_follows``, up to where the next reply starts."""
        if self.plain:
            prefixes = dict(zip(ROLES, (self.user_prefix, self.assistant_prefix), strict=True))
            text = "".join(f"{prefixes[m['role']]}{m['content']}\n" for m in messages)
            return text + self.assistant_prefix.rstrip(" ") if reply_follows else text
        specials = {"eos_token": self.eos_token or "", "bos_token": ""}
        return _compiled(self.template).render(messages=messages, add_generation_prompt=reply_follows, **specials)

    def exchange(self, prompt: str, response: str) -> tuple[str, str]:
        """One exchange, as the text before the reply and the reply's text, which joined are the whole
        conversation: the loss of instruction tuning covers the second only."""
        asked = [{"role": "user", "content": prompt}]
        before = self.render(asked)
        whole = self.render([*asked, {"role": "assistant", "content": response}], reply_follows=False)
        if not whole.startswith(before):
            raise ConfigError(
                "The tokenizer's chat template does not write a conversation as its prompt followed by the reply, "
                "so the reply's tokens cannot be told apart: use the plain template (data.template=plain; for "
                "lmlab-chat, template=plain)."
            )
        return before, whole[len(before) :]

    def reply_end(self) -> str | None:
        """The text that ends a reply: the start of the next user turn (plain template), or what the chat
        template writes after a reply (Qwen's ``<|im_end|>``, Llama 3's ``<|eot_id|>``), if anything."""
        if self.plain:
            return "\n" + self.user_prefix.strip()
        _, reply = self.exchange("", _REPLY_MARK)
        return reply.split(_REPLY_MARK, 1)[1].strip() or None


@lru_cache(maxsize=8)
def _compiled(source: str) -> Any:
    """A chat template compiled in Jinja's sandbox (templates come with downloaded tokenizers), with the
    ``raise_exception`` helper Hugging Face templates call."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ConfigError(f"The tokenizer's chat template refuses the conversation: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(source)
