"""How a conversation is written for a language model: one format for talking to a model (``lmlab-chat``) and
for the prompt/response pairs it is instruction-tuned on (``data=instructions``), so a tuned model reads at
chat time what it was trained on.

The format is a pretrained tokenizer's chat template (the Jinja template saved with it) when
it brings one and ``template=auto``; otherwise the plain template, one turn per line::

    User: <message>
    Assistant: <reply>

with the prefixes ``user_prefix`` and ``assistant_prefix``. A reply starts after the assistant prefix without
its trailing space, so the reply's first token carries the space, as the model saw it in training.

A chat template comes with a downloaded tokenizer, so it is code from a stranger. It is compiled in Jinja's
sandbox, which keeps it from Python's internals but not from looping or growing a value for ever, so every render
is also bounded (:class:`RenderLimits`, the ``template_limits`` of the config): the steps it takes (loop
iterations, calls, lookups), the seconds it runs and the characters it writes or builds. A template the sandbox
refuses, one that does not compile, fails while rendering or runs past a limit is a :class:`ChatTemplateError`
naming the tokenizer it came with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, fields
from functools import lru_cache, wraps
from typing import Any

from jinja2 import TemplateError, TemplateSyntaxError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError, safe_range

from lmlab.errors import ChatTemplateError, ConfigError
from lmlab.tokenizers import Tokenizer

#: ``template``: the tokenizer's chat template when it has one (else plain), or always the plain one
TEMPLATES: tuple[str, ...] = ("auto", "plain")
#: the roles of a conversation's turns, in the order they alternate
ROLES = ("user", "assistant")
#: what stands in for a reply when the format is asked what follows one
_REPLY_MARK = "\x00reply\x00"
#: how to leave a tokenizer's chat template aside, in training and in lmlab-chat
PLAIN_FIX = "Use the plain template (data.template=plain; for lmlab-chat, template=plain) or another tokenizer."
#: a conversation that every chat template can write (:meth:`ChatFormat.check`)
SAMPLE_CONVERSATION = (
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi, how can I help?"},
    {"role": "user", "content": "Tell me a joke."},
)


@dataclass(frozen=True)
class RenderLimits:
    """How much one render of a chat template may do; ``key`` is where the config sets them (for messages)."""

    #: wall-clock seconds
    max_seconds: float = 1.0
    #: loop iterations, calls, attribute and item lookups, operators, and the numbers of each ``range()``
    max_steps: int = 1_000_000
    #: characters written (or held in one value) besides the messages' own text
    max_chars: int = 100_000
    key: str = "template_limits"

    @classmethod
    def of(cls, settings: Mapping[str, Any] | None, key: str) -> RenderLimits:
        """The limits the config node ``key`` sets (``None``: the defaults), each a number above 0."""
        names = [f.name for f in fields(cls) if f.name != "key"]
        given = dict(settings or {})
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ConfigError(f"{key}: unknown setting(s) {', '.join(unknown)}; the settings are {', '.join(names)}.")
        for name, value in given.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"Invalid value {key}.{name}={value!r}: it must be a number > 0.")
        return cls(**{name: type(getattr(cls, name))(value) for name, value in given.items()}, key=key)


@dataclass(frozen=True)
class ChatFormat:
    """Writes messages (``{"role": ..., "content": ...}``) as the model reads them."""

    user_prefix: str = "User: "
    assistant_prefix: str = "Assistant: "
    #: the Jinja source of a chat template; ``None``: the plain template
    template: str | None = None
    eos_token: str | None = None
    #: where the template came from, as messages name it
    origin: str = "The tokenizer's chat template"
    limits: RenderLimits = RenderLimits()

    @classmethod
    def for_tokenizer(
        cls,
        tokenizer: Tokenizer,
        template: str = "auto",
        user_prefix: str = "User: ",
        assistant_prefix: str = "Assistant: ",
        limits: RenderLimits | None = None,
    ) -> ChatFormat:
        """The tokenizer's chat template under ``template=auto`` when it has one, else the plain template; a
        template that does not compile or names Python internals is refused here, before any conversation."""
        if template not in TEMPLATES:
            raise ConfigError(f"template={template!r}: pick one of {', '.join(TEMPLATES)}.")
        source = getattr(tokenizer, "chat_template", None) if template == "auto" else None
        origin = template_origin(tokenizer)
        if source is not None:
            compile_template(source, origin)
        eos = getattr(tokenizer, "eos_token", None)
        return cls(user_prefix, assistant_prefix, source, eos, origin, limits or RenderLimits())

    @property
    def plain(self) -> bool:
        return self.template is None

    def render(self, messages: list[dict[str, str]], reply_follows: bool = True) -> str:
        """The conversation as the model reads it; with ``reply_follows``, up to where the next reply starts."""
        if self.plain:
            prefixes = dict(zip(ROLES, (self.user_prefix, self.assistant_prefix), strict=True))
            text = "".join(f"{prefixes[m['role']]}{m['content']}\n" for m in messages)
            return text + self.assistant_prefix.rstrip(" ") if reply_follows else text
        assert self.template is not None
        specials = {"eos_token": self.eos_token or "", "bos_token": ""}
        return render_template(
            self.template, self.origin, self.limits, messages, add_generation_prompt=reply_follows, **specials
        )

    def exchange(self, prompt: str, response: str) -> tuple[str, str]:
        """One exchange, as the text before the reply and the reply's text, which joined are the whole
        conversation: the loss of instruction tuning covers the second only."""
        asked = [{"role": "user", "content": prompt}]
        before = self.render(asked)
        whole = self.render([*asked, {"role": "assistant", "content": response}], reply_follows=False)
        if not whole.startswith(before):
            raise ConfigError(
                f"{self.origin} does not write a conversation as its prompt followed by the reply, so the reply's "
                "tokens cannot be told apart: use the plain template (data.template=plain; for lmlab-chat, "
                "template=plain)."
            )
        return before, whole[len(before) :]

    def reply_end(self) -> str | None:
        """The text that ends a reply: the start of the next user turn (plain template), or what the chat
        template writes after a reply (Qwen's ``<|im_end|>``, Llama 3's ``<|eot_id|>``), if anything."""
        if self.plain:
            return "\n" + self.user_prefix.strip()
        _, reply = self.exchange("", _REPLY_MARK)
        return reply.split(_REPLY_MARK, 1)[1].strip() or None

    def check(self) -> None:
        """Render :data:`SAMPLE_CONVERSATION`, with and without the start of a reply: a :class:`ChatTemplateError`
        where the template is unsafe or broken. The template's own refusal of the conversation
        (``raise_exception``) is no fault: it works as written."""
        if self.plain:
            return
        for reply_follows in (True, False):
            try:
                self.render(list(SAMPLE_CONVERSATION), reply_follows)
            except ConfigError:
                pass


def template_origin(tokenizer: Tokenizer) -> str:
    """The chat template of ``tokenizer``, named by where the tokenizer was loaded from, for messages."""
    source = getattr(tokenizer, "source", None)
    return f"The chat template of tokenizer '{source}'" if source else "The tokenizer's chat template"


def compile_template(source: str, origin: str) -> Any:
    """``source`` compiled in the bounded sandbox; a :class:`ChatTemplateError` (``origin`` names the template)
    where it does not compile or names Python internals."""
    try:
        return _compiled(source)
    except TemplateSyntaxError as err:
        problem = f"{origin} does not compile (line {err.lineno}: {_one_line(err)}): it is broken."
        raise ChatTemplateError(problem, PLAIN_FIX) from None
    except SecurityError as err:
        problem = f"{origin} {err}, which only a way out of Jinja's sandbox needs: it is unsafe."
        raise ChatTemplateError(problem, PLAIN_FIX) from None


def render_template(
    source: str, origin: str, limits: RenderLimits, messages: list[dict[str, str]], **variables: Any
) -> str:
    """``source`` rendered with ``messages`` and ``variables`` within ``limits``: the output is streamed, and its
    size and the time are checked between pieces as every step of the template charges the render's budget."""
    template = compile_template(source, origin)
    own_text = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
    budget = _Budget(limits, own_text + limits.max_chars)
    entered = _BUDGET.set(budget)
    try:
        pieces = []
        for piece in template.generate(messages=messages, **variables):
            budget.write(len(piece))
            pieces.append(piece)
        return "".join(pieces)
    except _OverLimit as over:
        raise ChatTemplateError(
            f"{origin} was stopped at {over}: a conversation takes a chat template a few steps, so it is unsafe.",
            f"{PLAIN_FIX} Raise the limit only for a template you trust.",
        ) from None
    except SecurityError as err:
        raise ChatTemplateError(
            f"{origin} does what Jinja's sandbox refuses ({_one_line(err)}): it is unsafe.", PLAIN_FIX
        ) from None
    except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError, MemoryError, RecursionError) as err:
        reason = f"{type(err).__name__}: {_one_line(err)}"
        raise ChatTemplateError(
            f"{origin} fails while rendering a conversation ({reason}): it is broken.", PLAIN_FIX
        ) from None
    finally:
        _BUDGET.reset(entered)


def _one_line(err: BaseException) -> str:
    return " ".join(str(getattr(err, "message", None) or err).split())[:300].rstrip(".")


# -- the bounded sandbox ----------------------------------------------------------------------------------
# Jinja has no time or size limit of its own and a template cannot be stopped from outside (a thread cannot be
# killed; a subprocess per render would cost more than the render), so the sandbox charges a budget for what a
# template does and stops it from within.


class _OverLimit(Exception):
    """A render ran past one of its limits (the message names it)."""


#: the values whose size a template could grow: checked against the characters a render may write
_SIZED = (str, list, tuple, dict)


class _Budget:
    """What one render has left of its :class:`RenderLimits`; ``room``: the characters it may write or hold."""

    def __init__(self, limits: RenderLimits, room: int) -> None:
        self.limits, self.room = limits, room
        self.steps, self.written = 0, 0
        self.deadline = time.monotonic() + limits.max_seconds

    def step(self, count: int = 1) -> None:
        self.steps += count
        if self.steps > self.limits.max_steps:
            raise _OverLimit(f"{self.limits.key}.max_steps={self.limits.max_steps} (loop iterations, calls, lookups)")
        if time.monotonic() > self.deadline:
            raise _OverLimit(f"{self.limits.key}.max_seconds={self.limits.max_seconds}")

    def fits(self, size: int) -> None:
        if size > self.room:
            raise _OverLimit(
                f"{self.limits.key}.max_chars={self.limits.max_chars} (a value of {size} characters or items, "
                f"where {self.room - self.limits.max_chars} are the messages' own)"
            )

    def write(self, size: int) -> None:
        self.written += size
        self.fits(self.written)
        self.step(0)

    def sized(self, value: Any) -> Any:
        """``value``, once its size is known to fit."""
        self.fits(_size(value))
        return value

    def arguments(self, values: Iterable[Any]) -> None:
        """What a call, filter or format is given: a value that does not fit, or a number past the room, which
        could only make one that does not (``'x'|center(10**9)``), is refused before anything is made of it."""
        for value in values:
            self.fits(abs(value) if isinstance(value, int) else _size(value))

    def operands(self, operator: str, left: Any, right: Any) -> None:
        """Refuse an operator whose result would not fit, before it is computed."""
        if operator == "+" and isinstance(left, _SIZED) and isinstance(right, _SIZED):
            self.fits(_size(left) + _size(right))
        elif operator == "*":
            for items, times in ((left, right), (right, left)):
                if isinstance(items, _SIZED) and isinstance(times, int):
                    self.fits(_size(items) * times)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            self.fits(abs(left).bit_length() * right // 3)  # about the digits of the result
        elif operator == "%" and isinstance(left, str):
            self.arguments(right if isinstance(right, tuple) else (right,))


def _size(value: Any) -> int:
    """The characters or items of a value, with the characters of the strings a list, tuple or dict holds (a list
    of a few long strings is as big to join as one long string); 0 for other values."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list | tuple):
        return len(value) + sum(len(item) for item in value if isinstance(item, str))
    return 0


_BUDGET: ContextVar[_Budget] = ContextVar("chat_template_budget")
#: the filter every ``for`` loop's items pass through (a name no template can write)
_COUNTED = "lmlab counted"


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, charging the current render's :class:`_Budget` a step for each call, lookup,
    operator and loop iteration, and checking the size of what they make."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self) -> None:
        # as transformers' apply_chat_template compiles templates: {% break %} and {% continue %} included
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self.globals["range"] = _counted_range
        self.globals["raise_exception"] = _raise_exception
        self.filters = {name: _charged(function) for name, function in self.filters.items()}
        self.filters[_COUNTED] = _counted_items

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        budget.step()
        budget.arguments((*args, *kwargs.values()))
        return budget.sized(super().call(context, obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        budget = _BUDGET.get()
        budget.step()
        return budget.sized(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        budget = _BUDGET.get()
        budget.step()
        return budget.sized(super().getitem(obj, argument))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _BUDGET.get()
        budget.step()
        budget.operands(operator, left, right)
        return super().call_binop(context, operator, left, right)


def _charged(function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter charged like a call (``wraps`` keeps what Jinja passes it: context, environment).
    Outside a render there is no budget to charge (``LookupError``): when Jinja tries a filter on constants while
    compiling, it leaves the filter to the render."""

    @wraps(function)
    def charged(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        budget.step()
        budget.arguments((*args, *kwargs.values()))
        return budget.sized(function(*args, **kwargs))

    return charged


def _counted_items(items: Iterable[Any]) -> Iterator[Any]:
    budget = _BUDGET.get()
    for item in items:
        budget.step()
        yield item


def _counted_range(*args: int) -> range:
    """Jinja's sandboxed ``range`` (at most ``MAX_RANGE`` numbers), its numbers charged as it is made, so a
    filter that reads it whole (``range(100000)|sum``) is paid for too."""
    numbers = safe_range(*args)
    _BUDGET.get().step(len(numbers))
    return numbers


def _raise_exception(message: str) -> None:
    """The helper Hugging Face templates call to refuse a conversation."""
    raise ConfigError(f"The tokenizer's chat template refuses the conversation: {message}")


@lru_cache(maxsize=1)
def _sandbox() -> _BoundedSandbox:
    return _BoundedSandbox()


@lru_cache(maxsize=8)
def _compiled(source: str) -> Any:
    """``source`` compiled in the bounded sandbox, each ``for`` loop's items counted; a ``SecurityError`` where it
    names a Python internal (the sandbox would refuse it if it ran, and no honest template names one)."""
    environment = _sandbox()
    tree = environment.parse(source)
    for node in tree.find_all((nodes.Getattr, nodes.Const)):
        name = node.attr if isinstance(node, nodes.Getattr) else node.value
        if isinstance(name, str) and _is_python_internal(name):
            raise SecurityError(f"names the Python internal '{name}'")
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Filter(loop.iter, _COUNTED, [], [], None, None, lineno=loop.iter.lineno)
    return environment.from_string(tree)


def _is_python_internal(name: str) -> bool:
    """A name such as ``__class__`` or ``__globals__``: the first step out of every sandbox escape."""
    return len(name) > 4 and name.startswith("__") and name.endswith("__")
