"""Sequence tagging: token-level cross-entropy over the real words (padding left out), token accuracy per
evaluation, and the tags of each text at inference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lmlab.data.batching import pad_batch
from lmlab.errors import TokenizerError
from lmlab.registry import register
from lmlab.tasks.base import TaskModule
from lmlab_tagging.data import IGNORE, TagBatch, word_ids


@register("task")
class TaggingTask(TaskModule):
    """Trains a tagger; logs ``{split}/loss`` (per word) and ``{split}/acc`` (token accuracy)."""

    network_inputs = ("vocab_size", "num_tags", "pad_id")
    data_module = "lmlab_tagging.data.TaggingDataModule"
    network = "lmlab_tagging.model.TaggerNetwork"
    fixed_by_checkpoint = ("tags",)
    checkpoint_data_keys = ("max_length",)
    infer_options = ("batch_size",)

    @property
    def tags(self) -> list[str]:
        return list(self.info.tags)

    def stage_metrics(self) -> MetricCollection:
        return MetricCollection({"acc": MulticlassAccuracy(self.info.num_tags, average="micro")})

    def datamodule_kwargs(self) -> dict[str, Any]:
        return {**super().datamodule_kwargs(), "tags": self.tags}

    def batch_counts(self, batch: TagBatch) -> tuple[int, int]:
        return batch.ids.size(0), int(batch.lengths.sum())

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self._forward(ids, lengths)

    def _loss(self, logits: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), tags.flatten(), ignore_index=IGNORE)

    def training_step(self, batch: TagBatch, batch_idx: int) -> torch.Tensor:
        logits = self(batch.ids, batch.lengths)
        loss = self._loss(logits, batch.tags)
        self.check_finite(loss)
        real = batch.tags != IGNORE
        accuracy = (logits.detach().argmax(-1)[real] == batch.tags[real]).float().mean()
        self.log_training({"train/loss": loss, "train/acc": accuracy}, len(batch.lengths))
        return loss

    def eval_step(self, batch: TagBatch, stage: str) -> tuple[torch.Tensor, int]:
        logits = self(batch.ids, batch.lengths).float()
        real = batch.tags != IGNORE
        self.scores[stage].update(logits[real], batch.tags[real])
        return self._loss(logits, batch.tags), int(real.sum())

    def infer(self, texts: Sequence[str], batch_size: int = 64) -> list[dict[str, Any]]:
        """The words of each text (split at whitespace) and the tag of each word."""
        if self.tokenizer is None:
            raise TokenizerError("This model has no tokenizer attached; load it from a lmlab checkpoint.")
        sentences = [text.split() for text in texts]
        encoded = word_ids(self.tokenizer, sentences)
        predicted: list[list[str]] = [[] for _ in texts]
        pad_id = self.info.pad_id
        with self.inference() as device:
            for first in range(0, len(texts), batch_size):
                rows = [i for i in range(first, min(first + batch_size, len(texts))) if encoded[i]]
                if not rows:
                    continue
                ids, lengths = pad_batch([encoded[i] for i in rows], pad_id)
                best = self(ids.to(device), lengths.to(device)).argmax(-1).cpu()
                for row, i in enumerate(rows):
                    predicted[i] = [self.tags[t] for t in best[row, : len(encoded[i])].tolist()]
        return [{"tokens": words, "tags": tags} for words, tags in zip(sentences, predicted, strict=True)]
