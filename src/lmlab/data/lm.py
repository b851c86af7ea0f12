"""Language-modeling data: text -> token shards (cached) -> packed fixed-length blocks.

A split of any size is prepared with the memory of a few batches (:mod:`lmlab.data.corpus`): read in
pieces, tokenized in ``num_proc`` processes, written to shards of about ``shard_tokens`` ids, and resumed from
its last finished shard when a preparation stops. Training reads the shards by memory map.

Training batches are blocks of ``block_size + 1`` tokens cut from the token stream at a random
offset each epoch, visited in a random order; both are a pure function of ``(seed, epoch)``, so a
resumed run sees exactly the batches an uninterrupted run would. Validation and test use
non-overlapping blocks from offset 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, Sampler

from lmlab.data.base import TaskDataModule, TokenizerBuilder
from lmlab.data.corpus import no_end_of_text, prepare_split
from lmlab.data.info import LMDataInfo
from lmlab.data.splits import share_key
from lmlab.data.storage import BatchedDataset, TokenShards
from lmlab.data.text_sources import SplitText, TextSource
from lmlab.errors import DataError
from lmlab.registry import register
from lmlab.tokenizers import Tokenizer, declared_end_of_text


class TokenBlocks(BatchedDataset):
    """Blocks of a split's tokens, addressed by start position; ``(x, y)`` with ``y`` shifted by one."""

    def __init__(self, tokens: TokenShards, block_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitems__(self, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(self.tokens.windows(starts, self.block_size + 1).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


class EpochBlockSampler(Sampler[int]):
    """Start positions of one epoch's training blocks for this rank.

    Each epoch draws an offset in ``[0, block_size)`` and a permutation of the blocks from a
    generator seeded with ``seed + epoch``; rank ``r`` of ``w`` takes every ``w``-th block.
    ``resume_at(epoch, n)`` skips the first ``n`` samples of that epoch once.
    """

    def __init__(self, n_tokens: int, block_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.block_size, self.seed, self.rank, self.world_size = block_size, seed, rank, world_size
        self.n_blocks = (n_tokens - block_size) // block_size
        self.per_rank = self.n_blocks // world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, samples_done: int) -> None:
        self._resume = (epoch, samples_done)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        offset = int(torch.randint(self.block_size, (1,), generator=g))
        order = torch.randperm(self.n_blocks, generator=g)[self.rank :: self.world_size][: self.per_rank]
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
        self._resume = None
        for block in order[skip:].tolist():
            yield offset + block * self.block_size


class BlockBatches(BatchSampler):
    """Batches of ``batch_size`` consecutive starts of an :class:`EpochBlockSampler` (the last partial one
    dropped), resumable by batches done."""

    def __init__(self, sampler: EpochBlockSampler, batch_size: int) -> None:
        super().__init__(sampler, batch_size, drop_last=True)

    @property
    def per_rank(self) -> int:
        return len(self)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        self.sampler.resume_at(epoch, batches_done * self.batch_size)  # type: ignore[attr-defined]


class LanguageModelData(TaskDataModule):
    """What every language-modeling data module shares: sequences of at most ``block_size`` input tokens,
    batches ``(x, y)`` of inputs and next-token targets, and the :class:`LMDataInfo` the task builds its
    network from. Each split's meta data records ``chars`` and ``tokens``, the text and the tokens scored,
    for bits per character."""

    info_type = LMDataInfo

    def __init__(
        self,
        source: Any,
        tokenizer: TokenizerBuilder | Tokenizer,
        block_size: int = 128,
        **loading: Any,
    ) -> None:
        super().__init__(source, tokenizer, **loading)
        if block_size < 1:
            raise DataError(f"data.block_size must be positive, got {block_size}.")
        self.block_size = block_size

    @property
    def data_info(self) -> LMDataInfo:
        """Values the data decides, handed to the task to build its network."""
        assert self.tokenizer is not None, "call setup() first"
        return LMDataInfo(
            vocab_size=self.tokenizer.vocab_size,
            pad_id=self.tokenizer.pad_id,
            eos_id=self.tokenizer.eos_id,
            block_size=self.block_size,
            chars_per_token=self.chars_per_token(),
            tokenizer_fingerprint=self.tokenizer.fingerprint(),
        )

    def chars_per_token(self) -> dict[str, float]:
        return {s: i["chars"] / max(i["tokens"], 1) for s, i in self.meta.get("splits", {}).items()}


@register("data")
class LMDataModule(LanguageModelData):
    """Tokenizes a :class:`TextSource` once (cached, in shards, resumable) and serves packed blocks.

    ``num_proc`` processes tokenize a split (``None``: one per available core); a shard closes once it holds
    ``shard_tokens`` ids, and a stopped preparation resumes after the last closed one.
    """

    source: TextSource
    resumable_cache = True

    def __init__(
        self,
        source: Any,
        tokenizer: TokenizerBuilder | Tokenizer,
        block_size: int = 128,
        num_proc: int | None = None,
        shard_tokens: int = 50_000_000,
        **loading: Any,
    ) -> None:
        super().__init__(source, tokenizer, block_size, **loading)
        self.num_proc, self.shard_tokens = num_proc, shard_tokens
        if getattr(source, "end_of_document", False):
            kind, has_it = declared_end_of_text(tokenizer)
            if has_it is False:  # refused before any text is read
                raise no_end_of_text(kind)

    # -- building the cache ---------------------------------------------------------------
    def cache_parts(self) -> dict[str, Any]:
        return {"task": "lm"}

    def read_splits(self) -> dict[str, SplitText]:
        return self.source.streams() if self.splits is None else self.source.streams(self.splits)

    def fit_tokenizer(self, splits: dict[str, SplitText]) -> Tokenizer:
        return self.train_tokenizer(splits["train"])

    def encode_split(
        self, folder: Path, name: str, data: SplitText, tokenizer: Tokenizer, meta: dict[str, Any]
    ) -> dict:
        info = prepare_split(folder, name, data, tokenizer, self.shard_tokens, self.num_proc)
        if name == "train" and not info["tokens"]:
            raise DataError("The training text is empty. Check the data files or data.source settings.")
        return info

    # -- serving ---------------------------------------------------------------------------
    def open_split(self, folder: Path, name: str) -> TokenBlocks | None:
        tokens = self.meta["splits"][name]["tokens"]
        if name == "train" and tokens < 2 * self.block_size:
            # one full block at every random epoch offset in [0, block_size) needs 2*block_size tokens
            raise DataError(
                f"The train split has {tokens} tokens, fewer than 2*data.block_size "
                f"({2 * self.block_size}). Lower data.block_size or add text."
            )
        return TokenBlocks(TokenShards(folder / name), self.block_size) if tokens >= self.block_size + 1 else None

    def train_sampler(self, data: TokenBlocks, rank: int, world: int) -> BlockBatches:
        return BlockBatches(EpochBlockSampler(len(data), self.block_size, self.seed, rank, world), self.batch_size)

    def too_few_message(self, data: TokenBlocks, world: int) -> str:
        blocks = EpochBlockSampler(len(data), self.block_size, self.seed, 0, world).per_rank
        return (
            f"The train split yields {blocks} blocks per process, fewer than data.batch_size "
            f"({self.batch_size}). Lower data.batch_size or data.block_size."
        )

    def eval_sampler(self, data: TokenBlocks, rank: int, world: int) -> list[list[int]]:
        starts = list(range(0, len(data) - self.block_size, self.block_size))[rank::world]
        return [starts[i : i + self.eval_batch_size] for i in range(0, len(starts), self.eval_batch_size)]

    def unserved_reason(self, name: str, info: dict[str, Any]) -> str:
        """A split shorter than one block: no block of it is scored."""
        if not info["tokens"]:
            return f"the {name} text is empty (give it some text)"
        return (
            f"the {name} split has {info['tokens']} tokens, fewer than one block of data.block_size+1="
            f"{self.block_size + 1} (give it more text: in its files, or by a larger {share_key(name)} where it is cut "
            "from the training text)"
        )

    def missing_split_message(self, split: str) -> str:
        message = super().missing_split_message(split)
        # in training, data.block_size is the run's own choice (in scoring, it is the checkpoint's)
        too_short = self.meta["splits"].get(split, {}).get("tokens")
        return f"{message} Or lower data.block_size." if too_short else message
