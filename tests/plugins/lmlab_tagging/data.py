"""Tagging data: rows of words with one tag per word -> word ids and tag ids (cached) -> padded batches.

A row is ``{"tokens": ["the", "cat", ...], "tags": ["DET", "NOUN", ...]}`` (column names set by
``data.source.columns``). Each word becomes one id: the first piece the configured tokenizer gives it
(a word-level tokenizer gives exactly one). The tag set is recorded in ``meta.json`` and travels with
the checkpoint.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from lmlab.data.base import TaskDataModule, TokenizerBuilder
from lmlab.data.batching import BucketBatchSampler, pad_batch
from lmlab.data.classification import pad_id_of
from lmlab.data.info import DataInfo
from lmlab.data.storage import BatchedDataset, RaggedIds, save_ragged
from lmlab.data.tables import SplitTable, TableSource
from lmlab.errors import DataError
from lmlab.registry import register
from lmlab.tokenizers import Tokenizer

log = logging.getLogger("lmlab")

#: the tag id of padding positions: cross-entropy and the metrics leave them out
IGNORE = -100


class TagBatch(NamedTuple):
    ids: torch.Tensor  # (B, T) word ids, right-padded with the pad id
    lengths: torch.Tensor  # (B,) words per sentence
    tags: torch.Tensor  # (B, T) tag ids, IGNORE at padding


def word_ids(tokenizer: Tokenizer, sentences: Sequence[Sequence[str]]) -> list[list[int]]:
    """One id per word of each sentence: the first piece of the word's encoding (each distinct word encoded
    once)."""
    distinct = sorted({word for words in sentences for word in words})
    encoded, _ = tokenizer.encode_batch(distinct) if distinct else ([], 0)
    ids = {}
    for word, pieces in zip(distinct, encoded, strict=True):
        if not pieces:
            raise DataError(f"The word {word!r} encodes to no token; remove it from the data.")
        ids[word] = pieces[0]
    return [[ids[word] for word in words] for words in sentences]


class EncodedSentences(BatchedDataset):
    """One cached split: word ids and tag ids, both ragged (one row per sentence)."""

    def __init__(self, folder: Path, split: str, pad_id: int) -> None:
        self.words, self.tags = RaggedIds(folder, f"{split}.words"), RaggedIds(folder, f"{split}.tags")
        self.pad_id = pad_id

    @property
    def lengths(self) -> np.ndarray:
        return self.words.lengths

    def __len__(self) -> int:
        return len(self.words)

    def __getitems__(self, indices: list[int]) -> TagBatch:
        ids, lengths = pad_batch(self.words.rows(indices), self.pad_id)
        tags, _ = pad_batch(self.tags.rows(indices), IGNORE)
        return TagBatch(ids, lengths, tags)


@dataclass(frozen=True)
class TaggingDataInfo(DataInfo):
    """What the data decides for tagging: the network's vocabulary and tag count, the tags' names."""

    vocab_size: int
    pad_id: int
    num_tags: int
    tags: list[str]
    max_length: int


@register("data")
class TaggingDataModule(TaskDataModule):
    """Tagged sentences from a :class:`TableSource` (roles ``tokens`` and ``tags``), encoded once (cached).

    ``tags`` fixes the tag set (a checkpoint's, when evaluating); otherwise it is the sorted distinct
    tags of the training split.
    """

    roles = ("tokens", "tags")
    info_type = TaggingDataInfo

    def __init__(
        self,
        source: TableSource,
        tokenizer: TokenizerBuilder | Tokenizer,
        max_length: int = 128,
        bucket_batches: int = 100,
        tags: Sequence[str] | None = None,
        **loading: Any,
    ) -> None:
        super().__init__(source, tokenizer, **loading)
        if max_length < 1:
            raise DataError(f"data.max_length must be positive, got {max_length}.")
        self.max_length, self.bucket_batches = max_length, bucket_batches
        self.fixed_tags = [str(tag) for tag in tags] if tags is not None else None

    # -- building the cache ---------------------------------------------------------------
    def cache_parts(self) -> dict[str, Any]:
        return {"task": "tagging", "max_length": self.max_length, "tags": self.fixed_tags}

    def describe(self, splits: dict[str, SplitTable]) -> dict[str, Any]:
        if self.fixed_tags is not None:
            return {"tags": self.fixed_tags}
        tags = sorted({str(tag) for row in splits["train"].columns["tags"] for tag in row or []})
        if len(tags) < 2:
            raise DataError(f"The training split ({splits['train'].origin}) has {len(tags)} distinct tag(s); need 2+.")
        return {"tags": tags}

    def fit_tokenizer(self, splits: dict[str, SplitTable]) -> Tokenizer:
        return self.train_tokenizer(" ".join(words) for words in splits["train"].columns["tokens"] if words)

    def encode_split(
        self, folder: Path, name: str, data: SplitTable, tokenizer: Tokenizer, meta: dict[str, Any]
    ) -> dict[str, Any]:
        index = {tag: i for i, tag in enumerate(meta["tags"])}
        words, tags, unknown, truncated = [], [], Counter(), 0
        for row, (row_words, row_tags) in enumerate(zip(data.columns["tokens"], data.columns["tags"], strict=True)):
            row_words, row_tags = list(row_words or []), [str(t) for t in row_tags or []]
            if len(row_words) != len(row_tags):
                raise DataError(
                    f"Row {row} of the {name} split ({data.origin}) has {len(row_words)} tokens but "
                    f"{len(row_tags)} tags; give one tag per token."
                )
            if not row_words:
                continue
            unknown.update(t for t in row_tags if t not in index)
            truncated += len(row_words) > self.max_length
            words.append(row_words[: self.max_length])
            tags.append([index.get(t, 0) for t in row_tags[: self.max_length]])
        if unknown:
            shown = ", ".join(f"{t!r} ({n}x)" for t, n in unknown.most_common(5))
            raise DataError(f"The {name} split ({data.origin}) has tags outside the tag set {meta['tags']}: {shown}.")
        if not words:
            raise DataError(f"Every sentence of the {name} split ({data.origin}) is empty.")
        save_ragged(folder, f"{name}.words", word_ids(tokenizer, words), tokenizer.vocab_size)
        save_ragged(folder, f"{name}.tags", tags, len(meta["tags"]))
        return {"origin": data.origin, "examples": len(words), "empty": len(data) - len(words), "truncated": truncated}

    # -- serving ---------------------------------------------------------------------------
    def report(self, name: str, info: dict[str, Any]) -> None:
        if info["empty"]:
            log.warning("%d empty sentence(s) in the %s split were left out.", info["empty"], name)
        if info["truncated"]:
            log.warning(
                "%d %s sentence(s) were cut to data.max_length=%d words; raise it to keep them whole.",
                info["truncated"],
                name,
                self.max_length,
            )

    def open_split(self, folder: Path, name: str) -> EncodedSentences:
        assert self.tokenizer is not None
        return EncodedSentences(folder, name, pad_id_of(self.tokenizer))

    @property
    def data_info(self) -> TaggingDataInfo:
        """What the task builds its network from (and saves in its checkpoint)."""
        assert self.tokenizer is not None, "call setup() first"
        pad_id = pad_id_of(self.tokenizer)
        return TaggingDataInfo(
            vocab_size=max(self.tokenizer.vocab_size, pad_id + 1),
            pad_id=pad_id,
            num_tags=len(self.meta["tags"]),
            tags=list(self.meta["tags"]),
            max_length=self.max_length,
        )

    def train_sampler(self, data: EncodedSentences, rank: int, world: int) -> BucketBatchSampler:
        return BucketBatchSampler(data.lengths, self.batch_size, True, self.seed, self.bucket_batches, rank, world)

    def eval_sampler(self, data: EncodedSentences, rank: int, world: int) -> BucketBatchSampler:
        return BucketBatchSampler(data.lengths, self.eval_batch_size, False, rank=rank, world_size=world)
