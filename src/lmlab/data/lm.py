"""Language-modeling data: text -> token ids (cached) -> packed fixed-length blocks.

Training batches are blocks of ``block_size + 1`` tokens cut from the token stream at a random
offset each epoch, visited in a random order; both are a pure function of ``(seed, epoch)``, so a
resumed run sees exactly the batches an uninterrupted run would. Validation and test use
non-overlapping blocks from offset 0.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, Sampler

from lmlab.data.cache import cache_key, cached_dir
from lmlab.data.text_sources import TextSource
from lmlab.errors import DataError
from lmlab.tokenizers import Tokenizer, tokenizer_from_state

TokenizerBuilder = Callable[[Iterable[str]], Tokenizer]


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


class LMDataModule(L.LightningDataModule):
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
        super().__init__()
        if block_size < 1 or batch_size < 1:
            raise DataError(f"data.block_size ({block_size}) and data.batch_size ({batch_size}) must be positive.")
        self.source, self.tokenizer_spec = source, tokenizer
        self.block_size, self.batch_size = block_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.cache_root, self.seed = cache_dir, seed
        self.tokenizer: Tokenizer | None = tokenizer if isinstance(tokenizer, Tokenizer) else None
        self.meta: dict[str, Any] = {}
        self.datasets: dict[str, TokenBlocks] = {}
        self._cache: Path | None = None
        self._resume: tuple[int, int] | None = None
        self._train_sampler: EpochBlockSampler | None = None

    # -- building the cache ---------------------------------------------------------------
    def _key(self) -> str:
        spec = self.tokenizer_spec
        if isinstance(spec, Tokenizer):
            tok: Any = {"fingerprint": spec.fingerprint()}
        elif isinstance(spec, partial):
            tok = {"builder": f"{spec.func.__module__}.{spec.func.__qualname__}", "kwargs": spec.keywords}
        elif hasattr(spec, "__qualname__"):
            # a plain function: its repr holds a memory address, which would miss the cache in every new process
            tok = {"builder": f"{spec.__module__}.{spec.__qualname__}", "kwargs": {}}
        else:
            tok = {"builder": repr(spec)}
        return cache_key({"task": "lm", "source": self.source.fingerprint(), "tokenizer": tok})

    def prepare_data(self) -> None:
        self._cache = cached_dir(self.cache_root, self._key(), self._build)

    def _build(self, folder: Path) -> None:
        splits = self.source.load()
        if not splits.get("train", "").strip():
            raise DataError("The training text is empty. Check the data files or data.source settings.")
        tokenizer = self.tokenizer or self.tokenizer_spec([splits["train"]])  # type: ignore[operator]
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
        if self._cache is None:
            self.prepare_data()
        assert self._cache is not None
        if self.tokenizer is None:
            self.tokenizer = tokenizer_from_state(json.loads((self._cache / "tokenizer.json").read_text()))
        self.meta = json.loads((self._cache / "meta.json").read_text())
        for split, info in self.meta["splits"].items():
            if split == "train" and info["tokens"] < 2 * self.block_size:
                # one full block at every random epoch offset in [0, block_size) needs 2*block_size tokens
                raise DataError(
                    f"The train split has {info['tokens']} tokens, fewer than 2*data.block_size "
                    f"({2 * self.block_size}). Lower data.block_size or add text."
                )
            if info["tokens"] < self.block_size + 1:
                continue
            self.datasets[split] = TokenBlocks(self._cache / f"{split}.npy", self.block_size)

    @property
    def data_info(self) -> dict[str, Any]:
        """Values the data decides, handed to the task to build its network."""
        assert self.tokenizer is not None, "call setup() first"
        return {"vocab_size": self.tokenizer.vocab_size, "pad_id": self.tokenizer.pad_id,
                "block_size": self.block_size,
                "chars_per_token": self.chars_per_token()}

    def chars_per_token(self) -> dict[str, float]:
        return {s: i["chars"] / max(i["tokens"], 1) for s, i in self.meta.get("splits", {}).items()}

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        data = self.datasets["train"]
        sampler = EpochBlockSampler(len(data), self.block_size, self.seed, rank, world)
        if sampler.per_rank < self.batch_size:
            raise DataError(
                f"The train split yields {sampler.per_rank} blocks per process, fewer than data.batch_size "
                f"({self.batch_size}). Lower data.batch_size or data.block_size."
            )
        if self._resume is not None:
            sampler.resume_at(*self._resume)
            self._resume = None
        self._train_sampler = sampler
        return self._loader(data, sampler, self.batch_size, drop_last=True)

    def _eval_loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            raise DataError(
                f"The {split} split is missing or shorter than data.block_size+1 tokens; "
                "give it more text or set a smaller data.block_size."
            )
        data = self.datasets[split]
        rank, world = self._rank_world()
        starts = list(range(0, len(data) - self.block_size, self.block_size))[rank::world]
        return self._loader(data, starts, self.eval_batch_size, drop_last=False)

    def _loader(self, data: Dataset, sampler: Iterable[int], batch_size: int, drop_last: bool) -> DataLoader:
        # Its own generator: otherwise every pass over a loader (each epoch, each validation) draws
        # from the global RNG, which a run resumed past that point would not repeat.
        return DataLoader(
            data, batch_size=batch_size, sampler=sampler, drop_last=drop_last, collate_fn=_as_batch,
            num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0, generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def has_split(self, split: str) -> bool:
        return split in self.datasets

    # -- exact resume of the data position ---------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        # During fit, not only while training: checkpoints saved at validation end need it too.
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self._resume = (state["epoch"], state["batches_done"] * self.batch_size)
