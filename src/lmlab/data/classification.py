"""Text-classification data: labelled texts -> token ids and class indices (cached) -> padded batches.

Training batches come from length buckets (:class:`~lmlab.data.batching.BucketBatchSampler`): each
epoch the examples are shuffled, cut into pools of ``bucket_batches`` batches, sorted by length within
a pool and cut into batches, whose order is shuffled again.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from lmlab.data.base import TaskDataModule, TokenizerBuilder
from lmlab.data.batching import BucketBatchSampler, pad_batch
from lmlab.data.info import ClassificationDataInfo
from lmlab.data.storage import BatchedDataset, RaggedIds, save_ragged
from lmlab.data.tables import SplitTable, TableSource
from lmlab.errors import DataError
from lmlab.registry import register
from lmlab.tokenizers import Tokenizer

log = logging.getLogger("lmlab")

#: label value that Hugging Face data sets use for unlabelled rows (e.g. the SST-2 test split)
UNLABELLED = -1


class TextBatch(NamedTuple):
    ids: torch.Tensor  # (B, T) token ids, right-padded with the pad id
    lengths: torch.Tensor  # (B,) true lengths
    labels: torch.Tensor  # (B,) class indices


def pad_id_of(tokenizer: Tokenizer) -> int:
    """The tokenizer's pad id, or one id past its vocabulary when it has none (the character vocabulary)."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.vocab_size


class EncodedTexts(BatchedDataset):
    """One split of token ids (ragged) and class indices, from the cache."""

    def __init__(self, folder: Path, split: str, pad_id: int) -> None:
        self.texts, self.pad_id = RaggedIds(folder, split), pad_id
        self.labels = torch.from_numpy(np.load(folder / f"{split}.labels.npy"))

    @property
    def lengths(self) -> np.ndarray:
        return self.texts.lengths

    def __len__(self) -> int:
        return len(self.texts)

    def __getitems__(self, indices: list[int]) -> TextBatch:
        ids, lengths = pad_batch(self.texts.rows(indices), self.pad_id)
        return TextBatch(ids, lengths, self.labels[indices])


@register("data")
class ClassificationDataModule(TaskDataModule):
    """Labelled texts from a :class:`TableSource` (roles ``text`` and ``label``), tokenized once (cached).

    ``labels`` fixes the label set (a checkpoint's, when evaluating or predicting); otherwise it is
    the class names the data declares, or the sorted distinct labels of the training split.
    """

    roles = ("text", "label")
    info_type = ClassificationDataInfo

    def __init__(
        self,
        source: TableSource,
        tokenizer: TokenizerBuilder | Tokenizer,
        max_length: int = 256,
        bucket_batches: int = 100,
        add_special_tokens: bool = True,
        labels: Sequence[str] | None = None,
        **loading: Any,
    ) -> None:
        super().__init__(source, tokenizer, **loading)
        if max_length < 1:
            raise DataError(f"data.max_length must be positive, got {max_length}.")
        self.max_length, self.bucket_batches = max_length, bucket_batches
        self.add_special_tokens = add_special_tokens
        self.fixed_labels = [str(label) for label in labels] if labels is not None else None

    # -- building the cache ---------------------------------------------------------------
    def cache_parts(self) -> dict[str, Any]:
        return {
            "task": "classification",
            "max_length": self.max_length,
            "special": self.add_special_tokens,
            "labels": self.fixed_labels,
        }

    def left_out_reason(self, name: str, data: SplitTable) -> str | None:
        """A split whose labels are all missing or ``-1`` (SST-2's test split) is left out; the training split
        must have labels."""
        values = data.columns["label"]
        if not all(v is None or v == UNLABELLED for v in values):
            return None
        if name == "train":
            raise DataError(f"The training split ({data.origin}) has no labels (all missing or -1).")
        return f"the {name} split ({data.origin}) has no labels (all missing or -1)"

    def describe(self, splits: dict[str, SplitTable]) -> dict[str, Any]:
        return {"labels": self.fixed_labels or _label_names(splits["train"], self.source.columns["label"])}

    def fit_tokenizer(self, splits: dict[str, SplitTable]) -> Tokenizer:
        return self.train_tokenizer(t for t in _texts(splits["train"]) if t)

    def encode_split(
        self, folder: Path, name: str, data: SplitTable, tokenizer: Tokenizer, meta: dict[str, Any]
    ) -> dict[str, Any]:
        texts = _texts(data)
        keep = [i for i, t in enumerate(texts) if t.strip()]
        targets = _label_indices(
            [data.columns["label"][i] for i in keep],
            data,
            meta["labels"],
            name,
            self.source.columns["label"],
            self.fixed_labels is not None,
        )
        ids, truncated = tokenizer.encode_batch([texts[i] for i in keep], self.max_length, self.add_special_tokens)
        nonempty = [i for i, seq in enumerate(ids) if seq]
        ids, targets = [ids[i] for i in nonempty], targets[nonempty]
        if not ids:
            raise DataError(
                f"Every text of the {name} split ({data.origin}) is empty. "
                f"Check data.source.columns.text ('{self.source.columns['text']}')."
            )
        save_ragged(folder, name, ids, tokenizer.vocab_size)
        np.save(folder / f"{name}.labels.npy", targets)
        return {
            "origin": data.origin,
            "examples": len(ids),
            "empty": len(data) - len(ids),
            "truncated": truncated,
            "label_counts": np.bincount(targets, minlength=len(meta["labels"])).tolist(),
        }

    # -- serving ---------------------------------------------------------------------------
    def report(self, name: str, info: dict[str, Any]) -> None:
        if info["empty"]:
            log.warning("%d empty text(s) in the %s split (%s) were left out.", info["empty"], name, info["origin"])
        if info["truncated"]:
            log.warning(
                "%d of %d %s texts were longer than data.max_length=%d tokens and were truncated; "
                "raise data.max_length to keep more of them.",
                info["truncated"],
                info["examples"],
                name,
                self.max_length,
            )

    def open_split(self, folder: Path, name: str) -> EncodedTexts:
        assert self.tokenizer is not None
        return EncodedTexts(folder, name, pad_id_of(self.tokenizer))

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    @property
    def data_info(self) -> ClassificationDataInfo:
        """Values the data decides, handed to the task to build its network and its loss."""
        assert self.tokenizer is not None, "call setup() first"
        pad_id = pad_id_of(self.tokenizer)
        return ClassificationDataInfo(
            vocab_size=max(self.tokenizer.vocab_size, pad_id + 1),
            pad_id=pad_id,
            num_classes=len(self.labels),
            labels=self.labels,
            max_length=self.max_length,
            add_special_tokens=self.add_special_tokens,
            label_counts=self.meta["splits"].get("train", {}).get("label_counts"),
        )

    def train_sampler(self, data: EncodedTexts, rank: int, world: int) -> BucketBatchSampler:
        return BucketBatchSampler(data.lengths, self.batch_size, True, self.seed, self.bucket_batches, rank, world)

    def too_few_message(self, data: EncodedTexts, world: int) -> str:
        return (
            f"The train split has {len(data)} examples: too few for {world} processes at "
            f"data.batch_size={self.batch_size}. Lower data.batch_size."
        )

    def eval_sampler(self, data: EncodedTexts, rank: int, world: int) -> BucketBatchSampler:
        return BucketBatchSampler(data.lengths, self.eval_batch_size, False, rank=rank, world_size=world)


def _texts(table: SplitTable) -> list[str]:
    return [text if isinstance(text, str) else "" for text in table.columns["text"]]


def _label_names(train: SplitTable, column: str) -> list[str]:
    """The label set: the class names the data declares, else the sorted distinct training labels."""
    values = train.columns["label"]
    present = {v for v in values if v is not None}
    if len(present) < 2:
        raise DataError(
            f"Label column '{column}' of {train.origin} has {len(present)} distinct value(s) "
            f"({', '.join(map(repr, sorted(present, key=str))) or 'none'}); classification needs at least 2. "
            "Check data.source.columns.label."
        )
    if "label" in train.class_names:
        return list(train.class_names["label"])
    numeric = all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in present)
    return [str(v) for v in sorted(present, key=int if numeric else str)]


def _label_indices(
    values: Sequence[Any], table: SplitTable, labels: list[str], split: str, column: str, from_checkpoint: bool
) -> np.ndarray:
    """Class index of every label value; a value outside the label set is an error naming it."""
    names = table.class_names.get("label")
    index = {name: i for i, name in enumerate(labels)}
    out = np.empty(len(values), dtype=np.int64)
    unknown: Counter[str] = Counter()
    for row, value in enumerate(values):
        name = names[value] if names is not None and isinstance(value, int) and 0 <= value < len(names) else str(value)
        if name not in index:
            unknown[name] += 1
            continue
        out[row] = index[name]
    if unknown:
        shown = ", ".join(f"{k!r} ({n}x)" for k, n in unknown.most_common(5))
        where = "the checkpoint's" if from_checkpoint else "the training split's"
        raise DataError(
            f"The {split} split ({table.origin}) has label(s) outside {where} label set {labels}: {shown} "
            f"(column '{column}'). Fix or drop those rows"
            + (
                ", or evaluate a checkpoint trained on these labels."
                if from_checkpoint
                else ", or add examples of them to the training data."
            )
        )
    return out
