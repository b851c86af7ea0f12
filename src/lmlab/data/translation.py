"""Translation data: sentence pairs -> source and target token ids (cached) -> padded batches.

Sources come from any :class:`~lmlab.data.tables.TableSource` with the roles ``source`` and
``target``: hub data sets, json/csv/parquet files, or two aligned plain-text files. One tokenizer
(joint vocabulary) or two (separate vocabularies) are trained on the training split. The source gets
an end token; the decoder reads ``[eos] + target`` and predicts ``target + [eos]`` (the end token
doubles as the begin token, so no extra symbol is needed). Training batches hold about
``max_tokens`` tokens each (or ``batch_size`` pairs), grouped by length.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from lmlab.data.base import TaskDataModule, TokenizerBuilder
from lmlab.data.batching import BucketBatchSampler, EpochBatchSampler, TokenBudgetBatchSampler, pad_batch
from lmlab.data.info import TranslationDataInfo
from lmlab.data.storage import BatchedDataset, RaggedIds, save_ragged
from lmlab.data.tables import SplitTable, TableSource, translation_sides
from lmlab.errors import DataError
from lmlab.registry import register
from lmlab.tokenizers import Tokenizer, TokenizerPair

log = logging.getLogger("lmlab")
OVERLONG = ("truncate", "skip")


class PairBatch(NamedTuple):
    src: torch.Tensor  # (B, S) source ids ending in the end token, right-padded
    src_lengths: torch.Tensor  # (B,)
    tgt_in: torch.Tensor  # (B, T) begin token + target ids, right-padded
    tgt_out: torch.Tensor  # (B, T) target ids + end token, right-padded
    references: tuple[str, ...]  # the target sentences as written in the data, for BLEU
    num_target_tokens: int  # target tokens the loss counts (end tokens included, padding not)


def encode_sources(
    tokenizer: TokenizerPair, texts: Sequence[str], max_length: int, prefix: str = ""
) -> tuple[list[list[int]], int]:
    """Source ids of each text after ``prefix``, cut to leave room for the end token, then the end token; and
    how many were cut."""
    ids, truncated = tokenizer.source.encode_batch([prefix + text for text in texts], max_length - 1)
    eos = tokenizer.source.eos_id
    return [seq + [eos] for seq in ids], truncated


class EncodedPairs(BatchedDataset):
    """One split of source and target ids (ragged) and the reference sentences, from the cache."""

    def __init__(self, folder: Path, split: str, tokenizer: TokenizerPair) -> None:
        self.src_pad, self.tgt_pad, self.bos = tokenizer.source.pad_id, tokenizer.pad_id, tokenizer.eos_id
        self.sides = {side: RaggedIds(folder, f"{split}.{side}") for side in ("src", "tgt")}
        self.references: list[str] = json.loads((folder / f"{split}.references.json").read_text())

    def lengths(self, side: str) -> np.ndarray:
        return self.sides[side].lengths

    def sizes(self) -> np.ndarray:
        """Tokens each pair takes in a batch: the longer of the source and the decoder's input."""
        return np.maximum(self.lengths("src"), self.lengths("tgt") + 1)

    def __len__(self) -> int:
        return len(self.references)

    def __getitems__(self, indices: list[int]) -> PairBatch:
        src, src_lengths = pad_batch(self.sides["src"].rows(indices), self.src_pad)
        targets = self.sides["tgt"].rows(indices)
        tgt_in, _ = pad_batch([np.concatenate([[self.bos], t]) for t in targets], self.tgt_pad)
        tgt_out, _ = pad_batch([np.concatenate([t, [self.bos]]) for t in targets], self.tgt_pad)
        references = tuple(self.references[i] for i in indices)
        return PairBatch(src, src_lengths, tgt_in, tgt_out, references, sum(len(t) + 1 for t in targets))


@register("data")
class TranslationDataModule(TaskDataModule):
    """Sentence pairs from a :class:`TableSource` (roles ``src`` and ``tgt``), tokenized once (cached).

    ``source_prefix`` is put before every source sentence (a T5-style task prefix such as "translate English
    to German: "). ``overlong`` decides what happens to training pairs longer than ``max_source_length`` /
    ``max_target_length`` tokens: ``truncate`` (cut and count) or ``skip`` (leave out and count).
    Validation and test sources are always cut (the model cannot read more), never skipped, and
    their references stay whole, so the reported BLEU covers every sentence.
    """

    roles = ("src", "tgt")
    info_type = TranslationDataInfo

    def __init__(
        self,
        source: TableSource,
        tokenizer: TokenizerBuilder | Tokenizer,
        source_lang: str = "src",
        target_lang: str = "tgt",
        joint_vocabulary: bool = True,
        source_prefix: str = "",
        max_source_length: int = 128,
        max_target_length: int = 128,
        overlong: str = "truncate",
        max_tokens: int | None = 4096,
        batch_size: int = 64,
        eval_batch_size: int | None = 128,
        bucket_batches: int = 100,
        **loading: Any,
    ) -> None:
        source.columns = translation_sides(source.columns, "data.source.columns")
        super().__init__(source, tokenizer, batch_size=batch_size, eval_batch_size=eval_batch_size, **loading)
        if overlong not in OVERLONG:
            raise DataError(f"data.overlong must be one of {', '.join(OVERLONG)}, got '{overlong}'.")
        for key, value in (("max_source_length", max_source_length), ("max_target_length", max_target_length)):
            if value < 2:
                raise DataError(f"data.{key} must be at least 2 (a token and the end token), got {value}.")
        if max_tokens is not None and max_tokens < max(max_source_length, max_target_length):
            raise DataError(
                f"data.max_tokens={max_tokens} cannot hold one pair of the longest allowed length "
                f"({max(max_source_length, max_target_length)} tokens). Raise data.max_tokens or lower "
                "data.max_source_length / data.max_target_length."
            )
        self.source_lang, self.target_lang = source_lang, target_lang
        self.joint_vocabulary, self.overlong, self.source_prefix = joint_vocabulary, overlong, source_prefix
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.max_tokens, self.bucket_batches = max_tokens, bucket_batches

    # -- building the cache ---------------------------------------------------------------
    def cache_parts(self) -> dict[str, Any]:
        return {
            "task": "translation",
            "joint": self.joint_vocabulary,
            "source_prefix": self.source_prefix,
            "max_source": self.max_source_length,
            "max_target": self.max_target_length,
            "overlong": self.overlong,
        }

    def given_tokenizer(self, tokenizer: Tokenizer) -> TokenizerPair:
        return tokenizer if isinstance(tokenizer, TokenizerPair) else TokenizerPair(tokenizer)

    def fit_tokenizer(self, splits: dict[str, SplitTable]) -> TokenizerPair:
        """Trained on the training pairs (joint: one vocabulary on both sides)."""
        sources, targets = _texts(splits["train"], "src"), _texts(splits["train"], "tgt")
        if self.joint_vocabulary:
            return TokenizerPair(self.train_tokenizer(_both(sources, targets)))
        return TokenizerPair(
            self.train_tokenizer(t for t in sources if t), self.train_tokenizer(t for t in targets if t)
        )

    def encode_split(
        self, folder: Path, name: str, table: SplitTable, tokenizer: TokenizerPair, meta: dict[str, Any]
    ) -> dict[str, Any]:
        sources, targets = _texts(table, "src"), _texts(table, "tgt")
        keep = [i for i, (s, t) in enumerate(zip(sources, targets, strict=True)) if s.strip() and t.strip()]
        if not keep:
            raise DataError(
                f"Every pair of the {name} split ({table.origin}) has an empty side. Check "
                f"data.source.columns ({self.source.columns})."
            )
        sources, targets = [self.source_prefix + sources[i] for i in keep], [targets[i] for i in keep]
        src_ids, _ = tokenizer.source.encode_batch(sources)
        tgt_ids, _ = tokenizer.target.encode_batch(targets)
        src_over = [len(s) + 1 > self.max_source_length for s in src_ids]
        tgt_over = [len(t) + 1 > self.max_target_length for t in tgt_ids]
        skipped, skipping = 0, name == "train" and self.overlong == "skip"
        if skipping:
            fits = [i for i in range(len(keep)) if not (src_over[i] or tgt_over[i])]
            skipped = len(keep) - len(fits)
            if not fits:
                raise DataError(
                    "Every training pair is longer than data.max_source_length / max_target_length; "
                    "raise them or set data.overlong=truncate."
                )
            src_ids, tgt_ids, targets = ([x[i] for i in fits] for x in (src_ids, tgt_ids, targets))
        src_ids = [s[: self.max_source_length - 1] + [tokenizer.source.eos_id] for s in src_ids]
        tgt_ids = [t[: self.max_target_length - 1] for t in tgt_ids]
        save_ragged(folder, f"{name}.src", src_ids, tokenizer.source.vocab_size)
        save_ragged(folder, f"{name}.tgt", tgt_ids, tokenizer.vocab_size)
        (folder / f"{name}.references.json").write_text(json.dumps(targets, ensure_ascii=False))
        return {
            "origin": table.origin,
            "pairs": len(src_ids),
            "empty": len(table) - len(keep),
            "skipped": skipped,
            "truncated_source": 0 if skipping else sum(src_over),
            "truncated_target": 0 if skipping else sum(tgt_over),
        }

    # -- serving ---------------------------------------------------------------------------
    def open_split(self, folder: Path, name: str) -> EncodedPairs:
        assert isinstance(self.tokenizer, TokenizerPair), "the cache holds a tokenizer pair"
        return EncodedPairs(folder, name, self.tokenizer)

    def report(self, name: str, info: dict[str, Any]) -> None:
        if info["empty"]:
            log.warning(
                "%d pair(s) of the %s split (%s) with an empty side were left out.", info["empty"], name, info["origin"]
            )
        if info["skipped"]:
            log.warning(
                "%d training pair(s) longer than data.max_source_length=%d / max_target_length=%d tokens "
                "were left out (data.overlong=skip).",
                info["skipped"],
                self.max_source_length,
                self.max_target_length,
            )
        for side, key in (("source", "max_source_length"), ("target", "max_target_length")):
            if info[f"truncated_{side}"]:
                log.warning(
                    "%d of %d %s %s sentences were longer than data.%s=%d tokens and were cut; raise it%s.",
                    info[f"truncated_{side}"],
                    info["pairs"],
                    name,
                    side,
                    key,
                    getattr(self, key),
                    " or set data.overlong=skip" if name == "train" else "",
                )

    @property
    def data_info(self) -> TranslationDataInfo:
        """Values the data decides, handed to the task to build its network and decode."""
        tokenizer = self.tokenizer
        assert isinstance(tokenizer, TokenizerPair), "call setup() first"
        return TranslationDataInfo(
            src_vocab_size=tokenizer.source.vocab_size,
            tgt_vocab_size=tokenizer.vocab_size,
            src_pad_id=tokenizer.source.pad_id,
            tgt_pad_id=tokenizer.pad_id,
            eos_id=tokenizer.eos_id,
            shared_vocabulary=tokenizer.joint,
            source_lang=self.source_lang,
            target_lang=self.target_lang,
            max_source_length=self.max_source_length,
            max_target_length=self.max_target_length,
            source_prefix=self.source_prefix,
        )

    def train_sampler(self, data: EncodedPairs, rank: int, world: int) -> EpochBatchSampler:
        if self.max_tokens is not None:
            return TokenBudgetBatchSampler(data.sizes(), self.max_tokens, True, self.seed, rank, world)
        return BucketBatchSampler(data.sizes(), self.batch_size, True, self.seed, self.bucket_batches, rank, world)

    def too_few_message(self, data: EncodedPairs, world: int) -> str:
        return (
            f"The train split has {len(data)} pairs: too few for {world} processes "
            "at this batch size. Lower data.max_tokens or data.batch_size."
        )

    def eval_sampler(self, data: EncodedPairs, rank: int, world: int) -> BucketBatchSampler:
        return BucketBatchSampler(
            data.sizes(), self.eval_batch_size, False, self.seed, self.bucket_batches, rank, world
        )


def _texts(table: SplitTable, role: str) -> list[str]:
    return [text if isinstance(text, str) else "" for text in table.columns[role]]


def _both(sources: Iterable[str], targets: Iterable[str]) -> Iterable[str]:
    """Both sides' sentences, for training a joint vocabulary."""
    yield from (t for t in sources if t)
    yield from (t for t in targets if t)
