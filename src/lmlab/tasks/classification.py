"""Text classification: cross-entropy (optional class weights, label smoothing), accuracy, macro F1,
AUROC and a confusion matrix per evaluation, and batched prediction of class probabilities."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAUROC,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)
from torchmetrics.functional.classification import multiclass_accuracy

from lmlab.data.batching import pad_batch
from lmlab.data.classification import TextBatch
from lmlab.errors import ConfigError, TokenizerError
from lmlab.registry import register
from lmlab.tasks.base import STAGES, TaskModule

log = logging.getLogger("lmlab")


@register("task")
class ClassificationTask(TaskModule):
    """Trains a text classifier; logs ``{split}/loss``, ``/acc``, ``/f1`` (macro) and ``/auroc``.

    The network maps ``(ids, lengths)`` to logits ``(B, num_classes)``. After each validation and
    test epoch ``confusion_matrices[stage]`` holds the counts (rows: true class, columns: predicted)
    for the confusion-matrix callback.
    """

    network_inputs = ("vocab_size", "num_classes", "pad_id", "max_length")
    data_module = "lmlab.data.classification.ClassificationDataModule"
    network = "lmlab.models.base.ClassifierNetwork"
    checkpoint_data_keys = ("max_length", "add_special_tokens")
    fixed_by_checkpoint = ("labels",)
    infer_options = ("batch_size",)

    def __init__(
        self,
        *args: Any,
        class_weights: str | Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.labels: list[str] = list(self.info.labels)
        num_classes = len(self.labels)
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"task.module.label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.register_buffer("class_weight", _class_weights(class_weights, self.info.label_counts, num_classes))
        self.confusion = nn.ModuleDict({s: MulticlassConfusionMatrix(num_classes) for s in STAGES})
        self.confusion_matrices: dict[str, torch.Tensor] = {}

    def stage_metrics(self) -> MetricCollection:
        return _scores(self.info.num_classes)

    def datamodule_kwargs(self) -> dict[str, Any]:
        return {**super().datamodule_kwargs(), "labels": self.labels}

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self._forward(ids, lengths)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.float(), labels, weight=self.class_weight, label_smoothing=self.hparams.label_smoothing
        )

    # -- pretrained word vectors ------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit":  # a resumed run's checkpoint weights are loaded after this and win
            self._load_word_vectors()

    def _load_word_vectors(self) -> None:
        embedding_cfg = self.hparams.model.get("embedding") or {}
        path = embedding_cfg.get("pretrained_path")
        if not path:
            return
        from lmlab.models.embeddings import load_word_vectors

        embedding: nn.Embedding = self.net.embedding
        vocabulary = self.tokenizer.vocabulary() if self.tokenizer is not None else []
        vectors, found = load_word_vectors(path, vocabulary, embedding.embedding_dim)
        with torch.no_grad():
            rows = found.nonzero().squeeze(1)
            embedding.weight[rows] = vectors[rows].to(embedding.weight)
        n_found = int(found.sum())
        log.info(
            "Pretrained word vectors: found %d of %d vocabulary words (%.1f%%) in %s.",
            n_found,
            len(vocabulary),
            100 * n_found / max(len(vocabulary), 1),
            path,
        )

    # -- steps --------------------------------------------------------------------------------
    def training_step(self, batch: TextBatch, batch_idx: int) -> torch.Tensor:
        logits = self(batch.ids, batch.lengths)
        loss = self._loss(logits, batch.labels)
        self.check_finite(loss)
        accuracy = multiclass_accuracy(logits.detach(), batch.labels, len(self.labels), average="micro")
        self.log_training({"train/loss": loss, "train/acc": accuracy}, len(batch.labels))
        return loss

    def eval_step(self, batch: TextBatch, stage: str) -> tuple[torch.Tensor, int]:
        logits = self(batch.ids, batch.lengths).float()
        probs = logits.softmax(-1)
        for metric in self.scores[stage].values():
            metric.update(probs[:, 1] if isinstance(metric, BinaryAUROC) else probs, batch.labels)
        self.confusion[stage].update(probs.argmax(-1), batch.labels)
        return self._loss(logits, batch.labels), len(batch.labels)

    def epoch_metrics(self, stage: str, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        self.confusion_matrices[stage] = self.confusion[stage].compute().cpu()
        self.confusion[stage].reset()
        return super().epoch_metrics(stage, loss)

    # -- prediction ---------------------------------------------------------------------------
    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Class probabilities ``(len(texts), num_classes)``, encoded exactly as the training data was."""
        if self.tokenizer is None:
            raise TokenizerError("This model has no tokenizer attached; load it from a lmlab checkpoint.")
        encoded, _ = self.tokenizer.encode_batch(texts, self.info.max_length, self.info.add_special_tokens)
        empty = [i for i, ids in enumerate(encoded) if not ids]
        if empty:
            raise TokenizerError(
                f"{len(empty)} text(s) encode to no tokens (first at position {empty[0]}); leave out empty texts."
            )
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        probs = torch.empty(len(encoded), len(self.labels))
        with self.inference() as device:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                ids, lengths = pad_batch([encoded[i] for i in rows], self.info.pad_id)
                probs[rows] = self(ids.to(device), lengths.to(device)).float().softmax(-1).cpu()
        return probs

    def infer(self, texts: Sequence[str], batch_size: int = 64) -> list[dict[str, Any]]:
        """The most probable label of each text and every label's probability."""
        probs = self.predict_proba(texts, batch_size=batch_size)
        return [
            {"label": self.labels[int(row.argmax())], "probs": dict(zip(self.labels, row.tolist(), strict=True))}
            for row in probs
        ]


def _scores(num_classes: int) -> MetricCollection:
    """Accuracy, macro F1 and AUROC (binary on the positive class's probability, else macro one-vs-rest)."""
    auroc: Metric = BinaryAUROC() if num_classes == 2 else MulticlassAUROC(num_classes, average="macro")
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            "auroc": auroc,
        },
        compute_groups=False,
    )


def _class_weights(
    spec: str | Sequence[float] | None, counts: Sequence[int] | None, num_classes: int
) -> torch.Tensor | None:
    """Loss weights per class: none, ``balanced`` (``n / (classes * n_c)``, as scikit-learn defines it) or given."""
    if spec is None:
        return None
    if spec == "balanced":
        if not counts:
            raise ConfigError("task.module.class_weights=balanced needs the training label counts from the data.")
        counts_t = torch.tensor(counts, dtype=torch.float).clamp(min=1)
        return counts_t.sum() / (num_classes * counts_t)
    if isinstance(spec, str):
        raise ConfigError(
            f"task.module.class_weights must be null, 'balanced' or a list of {num_classes} numbers, got '{spec}'."
        )
    weights = torch.tensor(list(spec), dtype=torch.float)
    if weights.numel() != num_classes or bool((weights < 0).any()):
        raise ConfigError(
            f"task.module.class_weights has {weights.numel()} value(s); give {num_classes} "
            "non-negative numbers, one per label in the label order."
        )
    return weights
