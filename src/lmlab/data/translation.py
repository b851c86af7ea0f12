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
from torch.utils.data import DataLoader, Dataset

from lmlab.data.base import TaskDataModule, TokenizerBuilder
from lmlab.data.batching import BucketBatchSampler, EpochBatchSampler, TokenBudgetBatchSampler, pad_batch
from lmlab.data.tables import SplitTable, TableSource
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


class EncodedPairs(Dataset):
    """One split of source and target ids (flat, with offsets) and the reference sentences, from the cache."""

    def __init__(self, folder: Path, split: str, tokenizer: TokenizerPair) -> None:
        self.folder, self.split = folder, split
        self.src_pad, self.tgt_pad, self.bos = tokenizer.source.pad_id, tokenizer.pad_id, tokenizer.eos_id
        self.offsets = {side: np.load(folder / f"{split}.{side}.offsets.npy") for side in ("src", "tgt")}
        self.references: list[str] = json.loads((folder / f"{split}.references.json").read_text())
        self._ids: dict[str, np.ndarray] = {}

    def ids(self, side: str) -> np.ndarray:
        if side not in self._ids:  # opened lazily so DataLoader workers each map the file themselves
            self._ids[side] = np.load(self.folder / f"{self.split}.{side}.ids.npy", mmap_mode="r")
        return self._ids[side]

    def lengths(self, side: str) -> np.ndarray:
        return np.diff(self.offsets[side])

    def sizes(self) -> np.ndarray:
        """Tokens each pair takes in a batch: the longer of the source and the decoder's input."""
        return np.maximum(self.lengths("src"), self.lengths("tgt") + 1)

    def __len__(self) -> int:
        return len(self.references)

    def _rows(self, side: str, indices: list[int]) -> list[np.ndarray]:
        ids, offsets = self.ids(side), self.offsets[side]
        return [ids[offsets[i] : offsets[i + 1]].astype(np.int64) for i in indices]

    def __getitem__(self, index: int) -> PairBatch:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> PairBatch:
        src, src_lengths = pad_batch(self._rows("src", indices), self.src_pad)
        targets = self._rows("tgt", indices)
        tgt_in, _ = pad_batch([np.concatenate([[self.bos], t]) for t in targets], self.tgt_pad)
        tgt_out, _ = pad_batch([np.concatenate([t, [self.bos]]) for t in targets], self.tgt_pad)
        references = tuple(self.references[i] for i in indices)
        return PairBatch(src, src_lengths, tgt_in, tgt_out, references, sum(len(t) + 1 for t in targets))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ids": {}}


def _as_batch(batch: PairBatch) -> PairBatch:
    """Collate for :meth:`EncodedPairs.__getitems__`, which already returns a padded batch."""
    return batch


@register("data")
class TranslationDataModule(TaskDataModule):
    """Sentence pairs from a :class:`TableSource` (roles ``source`` and ``target``), tokenized once (cached).

    ``source_prefix`` is put before every source sentence (a T5-style task prefix such as "translate English
    to German: "). ``overlong`` decides what happens to training pairs longer than ``max_source_length`` /
    ``max_target_length`` tokens: ``truncate`` (cut and count) or ``skip`` (leave out and count).
    Validation and test sources are always cut (the model cannot read more), never skipped, and
    their references stay whole, so the reported BLEU covers every sentence.
    """

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
        num_workers: int = 0,
        pin_memory: bool = False,
        cache_dir: str = ".cache/lmlab",
        seed: int = 1337,
    ) -> None:
        super().__init__(tokenizer, batch_size, eval_batch_size, num_workers, pin_memory, cache_dir, seed)
        missing = {"source", "target"} - set(source.columns)
        if missing:
            raise DataError(
                f"data.source.columns needs a column name for {sorted(missing)} "
                "(e.g. data.source.columns.source=en data.source.columns.target=de)."
            )
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
        self.source, self.source_lang, self.target_lang = source, source_lang, target_lang
        self.joint_vocabulary, self.overlong, self.source_prefix = joint_vocabulary, overlong, source_prefix
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.max_tokens, self.bucket_batches = max_tokens, bucket_batches

    # -- building the cache ---------------------------------------------------------------
    def cache_parts(self) -> dict[str, Any]:
        return {
            "task": "translation",
            "source": self.source.fingerprint(),
            "joint": self.joint_vocabulary,
            "source_prefix": self.source_prefix,
            "max_source": self.max_source_length,
            "max_target": self.max_target_length,
            "overlong": self.overlong,
        }

    def _tokenizer(self, train: SplitTable) -> TokenizerPair:
        """The given tokenizer pair, or one trained on the training pairs (joint: one vocabulary on both sides)."""
        if self.tokenizer is not None:
            if not isinstance(self.tokenizer, TokenizerPair):
                return TokenizerPair(self.tokenizer)
            return self.tokenizer
        build = self.tokenizer_spec
        sources, targets = _texts(train, "source"), _texts(train, "target")
        if self.joint_vocabulary:
            return TokenizerPair(build(_both(sources, targets)))  # type: ignore[operator]
        return TokenizerPair(build(t for t in sources if t), build(t for t in targets if t))  # type: ignore[operator]

    def build_cache(self, folder: Path) -> None:
        splits = self.source.load()
        tokenizer = self._tokenizer(splits["train"])
        meta: dict[str, Any] = {"splits": {}}
        for name, table in splits.items():
            meta["splits"][name] = self._encode_split(folder, name, table, tokenizer)
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer.state()))
        (folder / "meta.json").write_text(json.dumps(meta, indent=2))

    def _encode_split(self, folder: Path, name: str, table: SplitTable, tokenizer: TokenizerPair) -> dict[str, Any]:
        sources, targets = _texts(table, "source"), _texts(table, "target")
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
        for side, ids, vocab in (("src", src_ids, tokenizer.source.vocab_size), ("tgt", tgt_ids, tokenizer.vocab_size)):
            dtype = np.uint16 if vocab < np.iinfo(np.uint16).max else np.int32
            np.save(folder / f"{name}.{side}.ids.npy", np.fromiter((t for s in ids for t in s), dtype=dtype))
            np.save(folder / f"{name}.{side}.offsets.npy", np.cumsum([0] + [len(s) for s in ids], dtype=np.int64))
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
    def setup(self, stage: str | None = None) -> None:
        cache = self.open_cache()
        assert isinstance(self.tokenizer, TokenizerPair), "the cache holds a tokenizer pair"
        for name, info in self.meta["splits"].items():
            self._report(name, info)
            self.datasets[name] = EncodedPairs(cache, name, self.tokenizer)

    def _report(self, name: str, info: dict[str, Any]) -> None:
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
    def data_info(self) -> dict[str, Any]:
        """Values the data decides, handed to the task to build its network and decode."""
        tokenizer = self.tokenizer
        assert isinstance(tokenizer, TokenizerPair), "call setup() first"
        return {
            "src_vocab_size": tokenizer.source.vocab_size,
            "tgt_vocab_size": tokenizer.vocab_size,
            "src_pad_id": tokenizer.source.pad_id,
            "tgt_pad_id": tokenizer.pad_id,
            "eos_id": tokenizer.eos_id,
            "shared_vocabulary": tokenizer.joint,
            "source_lang": self.source_lang,
            "target_lang": self.target_lang,
            "source_prefix": self.source_prefix,
            "max_source_length": self.max_source_length,
            "max_target_length": self.max_target_length,
        }

    def _sampler(self, data: EncodedPairs, shuffle: bool) -> EpochBatchSampler:
        rank, world = self.rank_world()
        if shuffle and self.max_tokens is not None:
            return TokenBudgetBatchSampler(data.sizes(), self.max_tokens, True, self.seed, rank, world)
        size = self.batch_size if shuffle else self.eval_batch_size
        return BucketBatchSampler(data.sizes(), size, shuffle, self.seed, self.bucket_batches, rank, world)

    def train_dataloader(self) -> DataLoader:
        data = self.datasets["train"]
        sampler = self._sampler(data, shuffle=True)
        if sampler.per_rank < 1:
            raise DataError(
                f"The train split has {len(data)} pairs: too few for {self.rank_world()[1]} processes "
                "at this batch size. Lower data.max_tokens or data.batch_size."
            )
        resume = self.take_resume()
        if resume is not None:
            sampler.resume_at(*resume)
        return self.loader(data, _as_batch, batch_sampler=sampler)

    def _eval_loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            raise DataError(
                f"The data has no {split} split. Give one (data.source.val_files / test_files, or "
                "data.source.validation / test for aligned text files), or set data.source.val_fraction "
                "to draw validation pairs from the training split."
            )
        return self.loader(self.datasets[split], _as_batch, batch_sampler=self._sampler(self.datasets[split], False))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


def _texts(table: SplitTable, role: str) -> list[str]:
    return [text if isinstance(text, str) else "" for text in table.columns[role]]


def _both(sources: Iterable[str], targets: Iterable[str]) -> Iterable[str]:
    """Both sides' sentences, for training a joint vocabulary."""
    yield from (t for t in sources if t)
    yield from (t for t in targets if t)
