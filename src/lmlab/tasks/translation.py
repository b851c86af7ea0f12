"""Sequence-to-sequence translation: teacher-forced cross-entropy with label smoothing, loss and
perplexity every validation, and sacreBLEU and chrF from real decoding (greedy or beam search) of
the validation set every ``decode_every_n_epochs`` epochs and of the test set."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection

from lmlab.data.batching import pad_batch
from lmlab.data.translation import PairBatch, encode_sources
from lmlab.errors import ConfigError, TokenizerError
from lmlab.evaluation.metrics import CorpusScore
from lmlab.inference.decoding import beam_search, greedy_decode, max_target_lengths
from lmlab.registry import register
from lmlab.tasks.base import TaskModule
from lmlab.tokenizers import TokenizerPair

log = logging.getLogger("lmlab")


@dataclass(frozen=True)
class Decoding:
    """How translations are searched for: ``beam_size`` 1 is greedy decoding. A hypothesis may have up
    to ``max_length_ratio * source length + max_length_offset`` tokens; its beam score is divided by
    ``length ** length_penalty``; ``early_stopping`` ends a sentence's search once it has
    ``beam_size`` finished hypotheses."""

    beam_size: int = 1
    length_penalty: float = 1.0
    max_length_ratio: float = 1.5
    max_length_offset: int = 10
    early_stopping: bool = True

    @classmethod
    def from_config(cls, values: dict[str, Any] | None, key: str) -> Decoding:
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"{key}: unknown setting(s) {sorted(unknown)}; use {', '.join(cls.__dataclass_fields__)}."
            )
        settings = cls(**values)
        if settings.beam_size < 1:
            raise ConfigError(f"{key}.beam_size must be at least 1, got {settings.beam_size}.")
        if settings.max_length_ratio < 0 or settings.max_length_ratio + settings.max_length_offset < 1:
            raise ConfigError(f"{key}: max_length_ratio and max_length_offset allow no output token.")
        return settings


@register("task")
class TranslationTask(TaskModule):
    """Trains a translation model; logs ``{split}/loss`` (per target token, without smoothing) and
    ``{split}/ppl`` every evaluation, and ``{split}/bleu`` (sacreBLEU with its default 13a tokenization, 0-100) and
    ``{split}/chrf`` (sacreBLEU's chrF, 0-100) of the decoded, detokenized text against the references whenever
    the evaluation decodes."""

    network_inputs = ("src_vocab_size", "tgt_vocab_size", "src_pad_id", "tgt_pad_id", "eos_id", "shared_vocabulary")
    data_module = "lmlab.data.translation.TranslationDataModule"
    network = "lmlab.models.base.Seq2SeqNetwork"
    checkpoint_data_keys = (
        "source_lang",
        "target_lang",
        "source_prefix",
        "joint_vocabulary",
        "max_source_length",
        "max_target_length",
    )
    fixed_by_checkpoint = ("source_lang", "target_lang")
    infer_options = ("batch_size", "beam_size", "length_penalty", "max_length_ratio", "max_length_offset")
    aligned_output = True

    def __init__(
        self,
        *args: Any,
        label_smoothing: float = 0.1,
        decode_every_n_epochs: int = 1,
        val_decoding: dict[str, Any] | None = None,
        test_decoding: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"task.module.label_smoothing must be in [0, 1), got {label_smoothing}.")
        if decode_every_n_epochs < 0:
            raise ConfigError(
                f"task.module.decode_every_n_epochs must be >= 0 (0: never), got {decode_every_n_epochs}."
            )
        self.decoding = {
            "val": Decoding.from_config(val_decoding, "task.module.val_decoding"),
            "test": Decoding.from_config(test_decoding, "task.module.test_decoding"),
        }
        self.pad_id, self.eos_id = self.info.tgt_pad_id, self.info.eos_id
        self._decoding_now = False

    def stage_metrics(self) -> MetricCollection:
        """sacreBLEU and chrF of decoded text, filled only in the evaluations that decode."""
        return MetricCollection({"bleu": CorpusScore("bleu"), "chrf": CorpusScore("chrf")}, compute_groups=False)

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self._forward(src, src_lengths, tgt_in)

    def batch_counts(self, batch: PairBatch) -> tuple[int, int]:
        """Training throughput counts sentence pairs and target tokens (end tokens included, no padding)."""
        return batch.src.size(0), batch.num_target_tokens

    def _token_losses(self, batch: PairBatch, smoothing: float) -> tuple[torch.Tensor, int]:
        logits = self(batch.src, batch.src_lengths, batch.tgt_in)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            batch.tgt_out.reshape(-1),
            ignore_index=self.pad_id,
            label_smoothing=smoothing,
        )
        return loss, batch.num_target_tokens

    # -- steps --------------------------------------------------------------------------------
    def training_step(self, batch: PairBatch, batch_idx: int) -> torch.Tensor:
        loss, _ = self._token_losses(batch, self.hparams.label_smoothing)
        self.check_finite(loss)
        self.log_training({"train/loss": loss}, batch.src.size(0))
        return loss

    def eval_step(self, batch: PairBatch, stage: str) -> tuple[torch.Tensor, int]:
        loss, tokens = self._token_losses(batch, 0.0)
        if self._decoding_now:
            self.scores[stage].update(
                self.decode_texts(batch.src, batch.src_lengths, self.decoding[stage]), batch.references
            )
        return loss, tokens

    def on_validation_epoch_start(self) -> None:
        every = self.hparams.decode_every_n_epochs
        self._decoding_now = bool(every) and (self.current_epoch + 1) % every == 0

    def on_test_epoch_start(self) -> None:
        self._decoding_now = True

    def epoch_metrics(self, stage: str, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        metrics = {f"{stage}/ppl": torch.exp(loss)}
        return {**metrics, **super().epoch_metrics(stage, loss)} if self._decoding_now else metrics

    # -- decoding -----------------------------------------------------------------------------
    def _pair(self) -> TokenizerPair:
        if not isinstance(self.tokenizer, TokenizerPair):
            raise TokenizerError("This model has no tokenizer attached; load it from a lmlab checkpoint.")
        return self.tokenizer

    def decode_ids(self, src: torch.Tensor, src_lengths: torch.Tensor, settings: Decoding) -> list[list[int]]:
        """Target ids (without begin and end tokens) of each source row, by greedy or beam search."""
        cap = self.info.max_target_length
        max_lengths = max_target_lengths(src_lengths, settings.max_length_ratio, settings.max_length_offset, cap)
        with self.inference():
            if settings.beam_size == 1:
                return greedy_decode(self.net, src, src_lengths, self.eos_id, self.eos_id, max_lengths)
            return beam_search(
                self.net,
                src,
                src_lengths,
                self.eos_id,
                self.eos_id,
                max_lengths,
                settings.beam_size,
                settings.length_penalty,
                settings.early_stopping,
            )

    def decode_texts(self, src: torch.Tensor, src_lengths: torch.Tensor, settings: Decoding) -> list[str]:
        tokenizer = self._pair()
        return [tokenizer.decode(ids) for ids in self.decode_ids(src, src_lengths, settings)]

    def translate(self, texts: Sequence[str], settings: Decoding | None = None, batch_size: int = 64) -> list[str]:
        """Translations of ``texts``, encoded as the training sources were, decoded in length-sorted batches
        (``settings`` defaults to the test decoding); an empty text translates to an empty string."""
        settings = settings or self.decoding["test"]
        tokenizer = self._pair()
        info = self.info
        encoded, truncated = encode_sources(tokenizer, texts, info.max_source_length, info.source_prefix)
        if truncated:
            log.warning(
                "%d input sentence(s) were longer than the model's max_source_length=%d tokens and were cut.",
                truncated,
                info.max_source_length,
            )
        device = next(self.net.parameters()).device
        rows = [i for i, text in enumerate(texts) if text.strip()]
        order = sorted(rows, key=lambda i: len(encoded[i]))
        out = [""] * len(texts)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src, lengths = pad_batch([encoded[i] for i in chunk], tokenizer.source.pad_id)
            for i, text in zip(chunk, self.decode_texts(src.to(device), lengths.to(device), settings), strict=True):
                out[i] = text
        return out

    def infer(self, texts: Sequence[str], batch_size: int = 64, **decoding: Any) -> list[str]:
        """Translations of ``texts``; ``decoding`` settings not given are the test decoding's."""
        settings = Decoding.from_config({**dataclasses.asdict(self.decoding["test"]), **decoding}, "decoding")
        return self.translate(texts, settings, batch_size=batch_size)
