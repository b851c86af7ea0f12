"""Tokenizers shared by every task: character, word, byte-level BPE and pretrained.

A tokenizer is built once from the training split (see the ``conf/tokenizer`` group), cached with
the tokenized data, and saved inside every checkpoint as a JSON-able ``state()`` so evaluation and
generation need nothing but the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFBackend

from lmlab.errors import TokenizerError
from lmlab.registry import register

#: lines longer than this many characters are cut (at a word start, within the last _LINE_CUT_WINDOW of them)
_MAX_LINE_CHARS = 1 << 20
_LINE_CUT_WINDOW = 1 << 12
_SPACE_BEFORE_WORD = re.compile(r"\s(?=\S)")
_WORD_SPECIALS = ("<pad>", "<unk>", "<eos>")
_BPE_SPECIALS = ("<|endoftext|>", "<pad>")
#: the smallest vocabularies that hold a tokenizer's fixed symbols and one learned token
WORD_MIN_VOCAB = len(_WORD_SPECIALS) + 1
BPE_MIN_VOCAB = 256 + len(_BPE_SPECIALS)  # every byte, then the specials; merges come on top

Builder = TypeVar("Builder", bound=Callable[..., Any])


class Tokenizer(ABC):
    """Maps text to token ids and back."""

    kind: str
    eos_id: int | None = None
    pad_id: int | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode(self, text: str, strict: bool = False) -> list[int]:
        """Token ids of ``text``. With ``strict``, text the vocabulary cannot represent is an error."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """A JSON-able description from which :func:`tokenizer_from_state` rebuilds this tokenizer."""

    def fingerprint(self) -> str:
        """A short hash that changes whenever the mapping between text and ids changes.

        Where a pretrained tokenizer was loaded from (``source``) and its chat template are left out: the same
        tokenizer.json from another path must match a checkpoint trained with it.
        """
        state = {k: v for k, v in self.state().items() if k not in ("source", "chat_template")}
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]

    def encode_batch(
        self, texts: Sequence[str], max_length: int | None = None, add_special_tokens: bool = False
    ) -> tuple[list[list[int]], int]:
        """Ids of each text, cut to ``max_length`` tokens, and how many texts were cut.

        ``add_special_tokens`` adds what a pretrained tokenizer's template wraps a text in (BERT's
        ``[CLS] ... [SEP]``); tokenizers trained here have none.
        """
        encoded = [self.encode(text) for text in texts]
        if max_length is None:
            return encoded, 0
        return [ids[:max_length] for ids in encoded], sum(len(ids) > max_length for ids in encoded)

    @abstractmethod
    def vocabulary(self) -> list[str]:
        """The token of every id, in id order (to match pretrained word vectors)."""


class CharTokenizer(Tokenizer):
    """One id per character seen in the training text, plus an optional unknown symbol."""

    kind = "char"
    UNK = "\ufffd"

    def __init__(self, chars: Sequence[str], unk: bool = True) -> None:
        self.chars = list(chars)
        self.unk = unk
        if unk and self.UNK not in self.chars:
            self.chars.append(self.UNK)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.unk_id = self.stoi[self.UNK] if unk else None

    @classmethod
    def train(cls, texts: Iterable[str], unk: bool = True) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen), unk=unk)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str, strict: bool = False) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - stoi.keys())
            if strict or self.unk_id is None:
                shown = ", ".join(repr(c) for c in unknown[:10])
                raise TokenizerError(
                    f"The text has {len(unknown)} character(s) outside the character vocabulary: {shown}. "
                    "Remove them, or train on data that contains them."
                ) from None
            unk = self.unk_id
            return [stoi.get(c, unk) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def vocabulary(self) -> list[str]:
        return list(self.chars)

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars, "unk": self.unk}


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` backend: word level, byte-level BPE, or a pretrained one."""

    def __init__(
        self,
        backend: HFBackend,
        kind: str,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        source: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.kind = kind
        self.eos_token, self.pad_token, self.unk_token = eos_token, pad_token, unk_token
        self.source = source
        #: a pretrained tokenizer's Jinja template for conversations (saved with it), if any
        self.chat_template = chat_template
        self.eos_id = self._special_id(eos_token)
        self.pad_id = self._special_id(pad_token)
        self.unk_id = self._special_id(unk_token)

    def _special_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"Special token {token!r} is not in the {self.kind} tokenizer's vocabulary.")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, strict: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if strict and self.unk_id is not None and self.unk_id in ids:
            raise TokenizerError(
                f"The text has words outside the {self.kind} vocabulary (they map to {self.unk_token!r})."
            )
        return ids

    def encode_batch(
        self, texts: Sequence[str], max_length: int | None = None, add_special_tokens: bool = False
    ) -> tuple[list[list[int]], int]:
        backend = self.backend
        if max_length is not None:
            # truncation by the backend keeps a template's closing token ([SEP]) in place
            backend = HFBackend.from_str(self.backend.to_str())
            backend.enable_truncation(max_length)
        encodings = backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings], sum(bool(e.overflowing) for e in encodings)

    def vocabulary(self) -> list[str]:
        return [self.backend.id_to_token(i) or "" for i in range(self.vocab_size)]

    def decode(self, ids: Sequence[int]) -> str:
        if self.kind == "word":
            tokens = [self.backend.id_to_token(i) or "" for i in ids]
            return re.sub(r" ?\n ?", "\n", " ".join(tokens))
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "backend": self.backend.to_str(),
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "source": self.source,
            **({"chat_template": self.chat_template} if self.chat_template is not None else {}),
        }


class TokenizerPair(Tokenizer):
    """Source and target tokenizers of a translation model, one object so it is saved, cached and
    checked against a checkpoint like any tokenizer. ``encode`` reads source text and ``decode`` writes
    target text; with a joint vocabulary both sides are the same tokenizer."""

    kind = "pair"

    def __init__(self, source: Tokenizer, target: Tokenizer | None = None) -> None:
        self.source, self.target = source, target or source
        self.joint = target is None or target is source
        for side, tokenizer in (("source", self.source), ("target", self.target)):
            if tokenizer.eos_id is None or tokenizer.pad_id is None:
                raise TokenizerError(
                    f"The {side} tokenizer ({tokenizer.kind}) has no end-of-sentence or padding token, which "
                    "translation needs. Use tokenizer=bpe or tokenizer=word, or set tokenizer.eos_token and "
                    "tokenizer.pad_token for a pretrained tokenizer."
                )
        self.eos_id, self.pad_id = self.target.eos_id, self.target.pad_id

    @property
    def vocab_size(self) -> int:
        return self.target.vocab_size

    def encode(self, text: str, strict: bool = False) -> list[int]:
        return self.source.encode(text, strict)

    def encode_batch(
        self, texts: Sequence[str], max_length: int | None = None, add_special_tokens: bool = False
    ) -> tuple[list[list[int]], int]:
        return self.source.encode_batch(texts, max_length, add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return self.target.decode(ids)

    def vocabulary(self) -> list[str]:
        return self.target.vocabulary()

    def fingerprint(self) -> str:
        """Changes when either side's mapping changes (each side's fingerprint leaves out where it was loaded from)."""
        sides = f"{self.source.fingerprint()}:{self.target.fingerprint()}:{self.joint}"
        return hashlib.sha256(sides.encode()).hexdigest()[:16]

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source.state(), "target": None if self.joint else self.target.state()}


def lines_of(pieces: Iterable[str | None]) -> Iterator[str | None]:
    """The lines of text given in pieces: ``str.splitlines(keepends=True)`` of their concatenation, a piece at a
    time. A ``None`` item (a document's end) ends the line before it and is passed on. A line longer than
    :data:`_MAX_LINE_CHARS` is cut before the space that starts a word (where byte-level BPE and word
    tokenizers cut it anyway), so a text without line breaks is not held whole either."""
    carry = ""
    for piece in pieces:
        if piece is None:
            yield from carry.splitlines(keepends=True)
            carry = ""
            yield None
            continue
        text = carry + piece
        cut = text.rfind("\n") + 1
        if cut:
            yield from text[:cut].splitlines(keepends=True)
        carry = text[cut:]
        while len(carry) > _MAX_LINE_CHARS:
            at = _word_start_before(carry, _MAX_LINE_CHARS)
            yield carry[:at]
            carry = carry[at:]
    if carry:
        yield from carry.splitlines(keepends=True)


def _word_start_before(text: str, limit: int) -> int:
    """The last position at or before ``limit`` of a whitespace character followed by a word (``limit`` where
    there is none)."""
    starts = [m.start() for m in _SPACE_BEFORE_WORD.finditer(text, max(limit - _LINE_CUT_WINDOW, 0), limit + 1)]
    return starts[-1] if starts and starts[-1] > 0 else limit


def builds(kind: str, end_of_text: bool | Callable[..., bool]) -> Callable[[Builder], Builder]:
    """Tokenizer-builder decorator: what the builder makes, known before it trains or loads anything.

    ``end_of_text`` says whether the tokenizer has an end-of-text token; a function of the builder's keyword
    arguments when that depends on them. Data modules read it through :func:`declared_end_of_text` to refuse a
    setting the tokenizer cannot serve before any text is read.
    """

    def declare(builder: Builder) -> Builder:
        builder.tokenizer_kind, builder.end_of_text = kind, end_of_text
        return builder

    return declare


def declared_end_of_text(spec: Any) -> tuple[str, bool | None]:
    """The kind of tokenizer ``spec`` is or builds, and whether it has an end-of-text token (``None``: not
    known until it is built). ``spec`` is a :class:`Tokenizer`, a builder, or a ``functools.partial`` of one."""
    if isinstance(spec, Tokenizer):
        return spec.kind, spec.eos_id is not None
    builder = getattr(spec, "func", spec)
    declared = getattr(builder, "end_of_text", None)
    kind = getattr(builder, "tokenizer_kind", getattr(builder, "__name__", "given"))
    if callable(declared):
        return kind, declared(**getattr(spec, "keywords", {}))
    return kind, declared


@register("tokenizer")
@builds("char", end_of_text=False)
def train_char(texts: Iterable[str], unk: bool = True) -> CharTokenizer:
    """Character vocabulary of the training text."""
    return CharTokenizer.train(texts, unk=unk)


@register("tokenizer")
@builds("word", end_of_text=True)
def train_word(
    texts: Iterable[str],
    vocab_size: int = 30000,
    min_frequency: int = 1,
    lowercase: bool = False,
    split_punctuation: bool = True,
    train_max_chars: int | None = None,
) -> HFTokenizer:
    """Word-level vocabulary: the most frequent words, newlines kept as tokens, the rest ``<unk>``; counted over
    the first ``train_max_chars`` characters of the training text (``None``: all of it)."""
    from tokenizers import normalizers

    backend = HFBackend(models.WordLevel(unk_token="<unk>"))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    steps = [
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
    ]
    if split_punctuation:
        steps.append(pre_tokenizers.Punctuation(behavior="isolated"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(_WORD_SPECIALS)
    )
    backend.train_from_iterator(_lines(texts, train_max_chars), trainer=trainer)
    return HFTokenizer(backend, "word", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


@register("tokenizer")
@builds("bpe", end_of_text=True)
def train_bpe(
    texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2, train_max_chars: int | None = None
) -> HFTokenizer:
    """Byte-level BPE (GPT-2 style): every string is representable, no unknown token needed. The merges are
    learned from the first ``train_max_chars`` characters of the training text (``None``: all of it)."""
    backend = HFBackend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(_BPE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_lines(texts, train_max_chars), trainer=trainer)
    return HFTokenizer(backend, "bpe", eos_token="<|endoftext|>", pad_token="<pad>")


@register("tokenizer")
# a named eos_token must be in the vocabulary (loading checks it); without one there is none
@builds("pretrained", end_of_text=lambda eos_token=None, **_: eos_token is not None)
def load_pretrained(
    texts: Iterable[str] | None = None,
    name_or_path: str = "gpt2",
    eos_token: str | None = None,
    pad_token: str | None = None,
    unk_token: str | None = None,
) -> HFTokenizer:
    """A pretrained tokenizer from a local ``tokenizer.json`` (or a folder holding one) or a hub name.

    ``texts`` is accepted so every tokenizer builder has the same call shape; it is not used.
    """
    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(".json")
    if looks_local:
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(
                f"No tokenizer.json at '{file}'. Point tokenizer.name_or_path at a tokenizer.json file or a "
                "folder that holds one (save a Hugging Face fast tokenizer with save_pretrained)."
            )
        backend = HFBackend.from_file(str(file))
    else:
        try:
            backend = HFBackend.from_pretrained(name_or_path)
        except Exception as err:  # the hub client raises many kinds of errors
            raise TokenizerError(
                f"Could not load pretrained tokenizer '{name_or_path}' from the Hugging Face hub ({err}). "
                "When offline, set tokenizer.name_or_path to a local tokenizer.json or its folder."
            ) from None
    # padding and truncation are decided per batch by the data modules, not fixed in the file
    backend.no_padding()
    backend.no_truncation()
    template = chat_template_beside(file.parent) if looks_local else hub_chat_template(name_or_path)
    return HFTokenizer(backend, "pretrained", eos_token, pad_token, unk_token, name_or_path, template)


#: where a pretrained tokenizer keeps its chat template: a file of its own (as ``transformers`` now saves it),
#: or a key of its ``tokenizer_config.json`` (as it did before)
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "tokenizer_config.json")


def chat_template_beside(folder: Path) -> str | None:
    """The chat template saved in ``folder`` (the default one where it names several), or ``None``."""
    return _chat_template({name: folder / name for name in CHAT_TEMPLATE_FILES})


def hub_chat_template(name: str) -> str | None:
    """The chat template of a hub tokenizer (downloaded once, then read from the hub's cache), or ``None``
    when it has none or cannot be reached."""
    from huggingface_hub import hf_hub_download

    files: dict[str, Path] = {}
    for file in CHAT_TEMPLATE_FILES:
        try:
            files[file] = Path(hf_hub_download(name, file))
        except Exception:  # absent, or offline and not cached: the hub client raises many kinds of errors
            continue
    return _chat_template(files)


def _chat_template(files: dict[str, Path]) -> str | None:
    jinja, config_file = (files.get(name) for name in CHAT_TEMPLATE_FILES)
    if jinja is not None and jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if config_file is None or not config_file.is_file():
        return None
    try:
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _lines(texts: Iterable[str], max_chars: int | None = None) -> Iterator[str]:
    """The lines of ``texts``, up to ``max_chars`` characters in all (``None``: every line)."""
    left = max_chars
    for line in lines_of(texts):
        if line is None:
            continue
        if left is not None:
            if left <= 0:
                return
            line, left = line[:left], left - len(line)
        yield line


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer saved by :meth:`Tokenizer.state` (from a checkpoint or the data cache)."""
    kind = state.get("kind")
    if kind == "char":
        return CharTokenizer(state["chars"], unk=state["unk"])
    if kind in {"word", "bpe", "pretrained"}:
        return HFTokenizer(
            HFBackend.from_str(state["backend"]),
            kind,
            eos_token=state.get("eos_token"),
            pad_token=state.get("pad_token"),
            unk_token=state.get("unk_token"),
            source=state.get("source"),
            chat_template=state.get("chat_template"),
        )
    if kind == "pair":
        source = tokenizer_from_state(state["source"])
        return TokenizerPair(source, tokenizer_from_state(state["target"]) if state["target"] else None)
    raise TokenizerError(f"Unknown tokenizer kind {kind!r} in saved state.")
