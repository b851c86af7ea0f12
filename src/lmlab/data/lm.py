"""Language-modeling data: text -> token ids (cached) -> packed fixed-length blocks.

Training batches are blocks of ``block_size + 1`` tokens cut from the token stream at a random
offset each epoch, visited in a random order; both are a pure function of ``(seed, epoch)``, so a
resumed run sees exactly the batches an uninterrupted run would. Validation and test use
non-overlapping blocks from offset 0.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lmlab.data.base import TaskDataModule, TokenizerBuilder
from lmlab.data.text_sources import TextSource
from lmlab.errors import DataError
from lmlab.registry import register
from lmlab.tokenizers import Tokenizer


class TokenBlocks(Dataset):
    """Blocks of a token file, addressed by start position; ``(x, y)`` with ``y`` shifted by one."""

    def __init__(self, path: Path, block_size: int) -> None:
        self.path, self.block_size = path, block_size
        self._tokens: np.ndarray | None = None
        self._span = np.arange(block_size + 1)

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:  # opened lazily so DataLoader workers each map the file themselves
            self._tokens = np.load(self.path, mmap_mode="r")
        return self._tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([start])
        return x[0], y[0]

    def __getitems__(self, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(self.tokens[np.asarray(starts)[:, None] + self._span].astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}


def _as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for :meth:`TokenBlocks.__getitems__`, which already returns a stacked batch."""
    return batch


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


@register("data")
class LMDataModule(TaskDataModule):
    """Tokenizes a :class:`TextSource` once (cached) and serves packed blocks."""

    def __init__(
        self,
        source: TextSource,
        tokenizer: TokenizerBuilder | Tokenizer,
        block_size: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        cache_dir: str = ".cache/lmlab",
        seed: int = 1337,
    ) -> None:
        super().__init__(tokenizer, batch_size, eval_batch_size, num_workers, pin_memory, cache_dir, seed)
        if block_size < 1:
            raise DataError(f"data.block_size must be positive, got {block_size}.")
        self.source, self.block_size = source, block_size

    # -- building the cache ---------------------------------------------------------------
    def cache_parts(self) -> dict[str, Any]:
        return {"task": "lm", "source": self.source.fingerprint()}

    def build_cache(self, folder: Path) -> None:
        splits = self.source.load()
        if not splits.get("train", "").strip():
            raise DataError("The training text is empty. Check the data files or data.source settings.")
        tokenizer = self.train_tokenizer([splits["train"]])
        dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        meta: dict[str, Any] = {"vocab_size": tokenizer.vocab_size, "splits": {}}
        for split, text in splits.items():
            ids = np.asarray(tokenizer.encode_documents([text]), dtype=dtype)
            np.save(folder / f"{split}.npy", ids)
            meta["splits"][split] = {"tokens": len(ids), "chars": len(text)}
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer.state()))
        (folder / "meta.json").write_text(json.dumps(meta, indent=2))

    # -- serving ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        cache = self.open_cache()
        for split, info in self.meta["splits"].items():
            if split == "train" and info["tokens"] < 2 * self.block_size:
                # one full block at every random epoch offset in [0, block_size) needs 2*block_size tokens
                raise DataError(
                    f"The train split has {info['tokens']} tokens, fewer than 2*data.block_size "
                    f"({2 * self.block_size}). Lower data.block_size or add text."
                )
            if info["tokens"] < self.block_size + 1:
                continue
            self.datasets[split] = TokenBlocks(cache / f"{split}.npy", self.block_size)

    @property
    def data_info(self) -> dict[str, Any]:
        """Values the data decides, handed to the task to build its network."""
        assert self.tokenizer is not None, "call setup() first"
        return {
            "vocab_size": self.tokenizer.vocab_size,
            "pad_id": self.tokenizer.pad_id,
            "block_size": self.block_size,
            "chars_per_token": self.chars_per_token(),
        }

    def chars_per_token(self) -> dict[str, float]:
        return {s: i["chars"] / max(i["tokens"], 1) for s, i in self.meta.get("splits", {}).items()}

    def train_dataloader(self) -> DataLoader:
        rank, world = self.rank_world()
        data = self.datasets["train"]
        sampler = EpochBlockSampler(len(data), self.block_size, self.seed, rank, world)
        if sampler.per_rank < self.batch_size:
            raise DataError(
                f"The train split yields {sampler.per_rank} blocks per process, fewer than data.batch_size "
                f"({self.batch_size}). Lower data.batch_size or data.block_size."
            )
        resume = self.take_resume()
        if resume is not None:
            sampler.resume_at(resume[0], resume[1] * self.batch_size)
        return self.loader(data, _as_batch, sampler=sampler, batch_size=self.batch_size, drop_last=True)

    def _eval_loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            raise DataError(
                f"The {split} split is missing or shorter than data.block_size+1 tokens; "
                "give it more text or set a smaller data.block_size."
            )
        data = self.datasets[split]
        rank, world = self.rank_world()
        starts = list(range(0, len(data) - self.block_size, self.block_size))[rank::world]
        return self.loader(data, _as_batch, sampler=starts, batch_size=self.eval_batch_size, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
