"""Language modeling: next-token cross-entropy, perplexity and bits per character, and sampling."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from lmlab.errors import TokenizerError
from lmlab.generation import generate
from lmlab.registry import register
from lmlab.tasks.base import TaskModule

_SPLIT_NAMES = {"val": "validation", "test": "test"}


@register("task")
class LanguageModelingTask(TaskModule):
    """Trains a language model; logs ``{split}/loss``, ``{split}/ppl`` and ``{split}/bpc``."""

    network_inputs = ("vocab_size", "block_size")
    data_module = "lmlab.data.lm.LMDataModule"
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
    def generate_text(
        self,
        prompt: str,
        max_new_tokens: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        num_samples: int = 1,
        stop_at_eos: bool = False,
    ) -> list[str]:
        """Continue ``prompt``; with a ``seed`` the result is the same on every call."""
        if self.tokenizer is None:
            raise TokenizerError("This model has no tokenizer attached; load it from a lmlab checkpoint.")
        ids = self.tokenizer.encode(prompt, strict=True) if prompt else self._start_ids()
        if not ids:
            raise TokenizerError(f"The prompt {prompt!r} encodes to no tokens.")
        device = next(self.net.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
        was_training = self.net.training
        self.net.eval()
        try:
            out = generate(
                self.net,
                idx,
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                generator,
                eos_id=self.tokenizer.eos_id if stop_at_eos else None,
                suppress_ids=self._never_sampled(),
            )
        finally:
            self.net.train(was_training)
        return [self._continuation(ids, row.tolist()) for row in out]

    def _continuation(self, prompt_ids: list[int], ids: list[int]) -> str:
        """The text after the prompt, as the tokenizer writes the whole sequence: decoding the new tokens
        alone would drop the space a word tokenizer puts between the prompt's last word and the next."""
        assert self.tokenizer is not None
        whole, prompt = self.tokenizer.decode(ids), self.tokenizer.decode(prompt_ids)
        if whole.startswith(prompt):
            return whole[len(prompt) :]
        return self.tokenizer.decode(ids[len(prompt_ids) :])

    def _never_sampled(self) -> list[int]:
        """The character vocabulary's unknown symbol: by construction absent from the training text."""
        unk = getattr(self.tokenizer, "unk_id", None)
        return [unk] if self.tokenizer is not None and self.tokenizer.kind == "char" and unk is not None else []

    def _start_ids(self) -> list[int]:
        """Where an empty prompt starts: end-of-text if the tokenizer has one, else a newline."""
        assert self.tokenizer is not None
        if self.tokenizer.eos_id is not None:
            return [self.tokenizer.eos_id]
        return self.tokenizer.encode("\n")
