"""What the data decides and a task builds its network and its loss from (vocabulary sizes, padding ids, labels),
one dataclass per task: the contract between a data module, its task and the network.

A data module's ``data_info`` is one of these; the task keeps it in its checkpoint as a plain dict
(:meth:`DataInfo.as_dict`, so the checkpoint loads with ``weights_only=True``) and reads it back typed
(:meth:`DataInfo.from_dict`). It also reads as that dict does (``info["vocab_size"]``), being a mapping of its
fields. The names a task hands to its network (``TaskModule.network_inputs``) must be
fields of its data module's info: checked when the task is built, so a misspelt name fails at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from lmlab.errors import ConfigError


@dataclass(frozen=True)
class DataInfo(Mapping[str, Any]):
    """Base of the per-task infos; a new task's data module subclasses it with its own fields."""

    def __getitem__(self, name: str) -> Any:
        if name not in self._names():
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def as_dict(self) -> dict[str, Any]:
        """Plain containers only, as a checkpoint stores them."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        """The info a checkpoint stored. Keys it has that this version no longer knows are left out; a field
        added since takes its default."""
        names = cls._names()
        return cls(**{key: value for key, value in values.items() if key in names})

    @classmethod
    def check_inputs(cls, inputs: tuple[str, ...], task: str) -> None:
        """Every one of a task's network inputs is a field of this info."""
        names = cls._names()
        unknown = [name for name in inputs if name not in names]
        if unknown:
            raise ConfigError(
                f"{task}.network_inputs names {', '.join(unknown)}, which {cls.__name__} (its data module's "
                f"data_info) does not have; its fields are {', '.join(names)}."
            )


@dataclass(frozen=True)
class LMDataInfo(DataInfo):
    vocab_size: int
    #: tokens per training sequence, the network's context
    block_size: int
    #: a character tokenizer has none
    pad_id: int | None = None
    #: the tokenizer's end-of-text token (none for characters), which a pretrained network checks is its own
    eos_id: int | None = None
    #: characters per token of each split, for bits per character
    chars_per_token: dict[str, float] = field(default_factory=dict)
    #: the tokenizer's fingerprint, which a network started from a checkpoint checks is its own
    tokenizer_fingerprint: str | None = None


@dataclass(frozen=True)
class ClassificationDataInfo(DataInfo):
    vocab_size: int
    pad_id: int
    num_classes: int
    labels: list[str]
    #: texts are cut to this many tokens
    max_length: int
    add_special_tokens: bool = True
    #: training examples per label, for class weights
    label_counts: list[int] | None = None


@dataclass(frozen=True)
class TranslationDataInfo(DataInfo):
    src_vocab_size: int
    tgt_vocab_size: int
    src_pad_id: int
    tgt_pad_id: int
    eos_id: int
    #: one vocabulary for both sides (needed to share embeddings)
    shared_vocabulary: bool
    source_lang: str
    target_lang: str
    max_source_length: int
    max_target_length: int
    #: put before every source sentence (a T5 task prefix)
    source_prefix: str = ""
