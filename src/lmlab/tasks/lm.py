"""Language modeling: next-token cross-entropy, perplexity and bits per character, and sampling."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from lmlab.language_model import DATA_MODULE, NETWORK_INPUTS, LanguageModel
from lmlab.registry import register
from lmlab.tasks.base import TaskModule

_SPLIT_NAMES = {"val": "validation", "test": "test"}


@register("task")
class LanguageModelingTask(TaskModule):
    """Trains a language model; logs ``{split}/loss``, ``{split}/ppl`` and ``{split}/bpc``."""

    network_inputs = NETWORK_INPUTS
    data_module = DATA_MODULE
    checkpoint_data_keys = ("block_size",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_means = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self._forward(idx)[0]

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.check_finite(loss)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        loss = self._loss(batch)
        self.loss_means[stage].update(loss, weight=batch[1].numel())

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_epoch(self, stage: str) -> None:
        mean_loss = self.loss_means[stage].compute()
        self.loss_means[stage].reset()
        chars_per_token = self.hparams.data_info.get("chars_per_token", {}).get(_SPLIT_NAMES[stage])
        metrics = {f"{stage}/loss": mean_loss, f"{stage}/ppl": torch.exp(mean_loss)}
        if chars_per_token:
            metrics[f"{stage}/bpc"] = mean_loss / math.log(2) / chars_per_token
        self.log_dict(metrics, prog_bar=stage == "val", sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    # -- sampling -----------------------------------------------------------------------------
    def generate_text(self, prompt: str, **options: Any) -> list[str]:
        """Continue ``prompt`` with this task's network and tokenizer (``options``: those of
        :meth:`LanguageModel.generate_text`)."""
        return LanguageModel(self.net, self.tokenizer).generate_text(prompt, **options)
