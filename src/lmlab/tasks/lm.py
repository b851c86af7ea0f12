"""Language modeling: next-token cross-entropy, perplexity and bits per character, and sampling.

The loss averages over the targets that carry one: every target of packed text, the response tokens of
instruction data (the others are :data:`~lmlab.data.instructions.NO_LOSS`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lmlab.data.info import LMDataInfo
from lmlab.data.instructions import NO_LOSS
from lmlab.inference.language_model import DATA_MODULE, NETWORK_INPUTS, LanguageModel
from lmlab.registry import register
from lmlab.tasks.base import TaskModule

_SPLIT_NAMES = {"val": "validation", "test": "test"}


@register("task")
class LanguageModelingTask(TaskModule):
    """Trains a language model; logs ``{split}/loss``, ``{split}/ppl`` and ``{split}/bpc``."""

    network_inputs = NETWORK_INPUTS
    data_module = DATA_MODULE
    network = "lmlab.models.base.LanguageModelNetwork"
    checkpoint_data_keys = ("block_size",)
    infer_options = LanguageModel.infer_options

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self._forward(idx)[0]

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=NO_LOSS)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.check_finite(loss)
        self.log_training({"train/loss": loss}, batch[0].size(0))
        return loss

    def eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        # weighted by the targets scored, counted on the device (no sync)
        return self._loss(batch), (batch[1] != NO_LOSS).sum()

    def epoch_metrics(self, stage: str, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        metrics = {f"{stage}/ppl": torch.exp(loss)}
        chars_per_token = self.info.chars_per_token.get(_SPLIT_NAMES[stage])
        if chars_per_token:
            metrics[f"{stage}/bpc"] = loss / math.log(2) / chars_per_token
        return metrics

    def observe_data(self, info: LMDataInfo) -> None:
        """Bits per character divide by the scored text's characters per token, not the training data's."""
        self.info = dataclasses.replace(self.info, chars_per_token=info.chars_per_token)
        self.hparams.data_info["chars_per_token"] = info.chars_per_token

    # -- sampling -----------------------------------------------------------------------------
    def generate_text(self, prompt: str, **options: Any) -> list[str]:
        """Continue ``prompt`` with this task's network and tokenizer (``options``: those of
        :meth:`LanguageModel.generate_text`)."""
        return LanguageModel(self.net, self.tokenizer).generate_text(prompt, **options)

    def infer(self, texts: Sequence[str], **options: Any) -> list[dict[str, list[str]]]:
        """Samples continuing each prompt (``options``: those of :meth:`LanguageModel.generate_text`)."""
        return LanguageModel(self.net, self.tokenizer).infer(texts, **options)
