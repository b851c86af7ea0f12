"""What every task's data module shares: the tokenized-data cache, loaders with their own seeded
generators, sharding across processes, and the data position saved for exact resume."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset

from lmlab.data.cache import cache_key, cached_dir
from lmlab.errors import DataError
from lmlab.tokenizers import Tokenizer, tokenizer_from_state

TokenizerBuilder = Callable[[Iterable[str]], Tokenizer]


def tokenizer_spec_key(spec: TokenizerBuilder | Tokenizer) -> dict[str, Any]:
    """What identifies a tokenizer (or the recipe that trains one) in a cache key."""
    if isinstance(spec, Tokenizer):
        return {"fingerprint": spec.fingerprint()}
    if isinstance(spec, partial):
        return {"builder": f"{spec.func.__module__}.{spec.func.__qualname__}", "kwargs": spec.keywords}
    if hasattr(spec, "__qualname__"):
        # a plain function: its repr holds a memory address, which would miss the cache in every new process
        return {"builder": f"{spec.__module__}.{spec.__qualname__}", "kwargs": {}}
    return {"builder": repr(spec)}


class TaskDataModule(L.LightningDataModule):
    """Base data module: subclasses give :meth:`cache_parts`, :meth:`build_cache` and the loaders.

    ``tokenizer`` is either a builder, trained on the training split when the cache is built, or a
    ready :class:`Tokenizer` (the one saved in a checkpoint, for evaluation and resume).
    """

    def __init__(
        self,
        tokenizer: TokenizerBuilder | Tokenizer,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        pin_memory: bool,
        cache_dir: str,
        seed: int,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"data.batch_size must be positive, got {batch_size}.")
        self.tokenizer_spec = tokenizer
        self.tokenizer: Tokenizer | None = tokenizer if isinstance(tokenizer, Tokenizer) else None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.cache_root, self.seed = cache_dir, seed
        self.meta: dict[str, Any] = {}
        self.datasets: dict[str, Dataset] = {}
        self._cache: Path | None = None
        self._resume: tuple[int, int] | None = None

    # -- the cache ----------------------------------------------------------------------------
    def cache_parts(self) -> dict[str, Any]:
        """Everything besides the tokenizer that decides the cached content."""
        raise NotImplementedError

    def build_cache(self, folder: Path) -> None:
        """Tokenize every split into ``folder``; must write ``tokenizer.json`` and ``meta.json``."""
        raise NotImplementedError

    def _key(self) -> str:
        return cache_key({**self.cache_parts(), "tokenizer": tokenizer_spec_key(self.tokenizer_spec)})

    def prepare_data(self) -> None:
        self._cache = cached_dir(self.cache_root, self._key(), self.build_cache)

    def train_tokenizer(self, texts: Iterable[str]) -> Tokenizer:
        """The given tokenizer, or one trained on the training texts by the configured builder."""
        return self.tokenizer or self.tokenizer_spec(texts)  # type: ignore[operator]

    def open_cache(self) -> Path:
        """The cache folder, with the tokenizer and meta data loaded from it."""
        if self._cache is None:
            self.prepare_data()
        assert self._cache is not None
        if self.tokenizer is None:
            self.tokenizer = tokenizer_from_state(json.loads((self._cache / "tokenizer.json").read_text()))
        self.meta = json.loads((self._cache / "meta.json").read_text())
        return self._cache

    # -- serving ---------------------------------------------------------------------------
    def rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def loader(self, data: Dataset, collate_fn: Callable[[Any], Any], **kwargs: Any) -> DataLoader:
        """A DataLoader with its own generator: otherwise every pass over a loader (each epoch, each
        validation) draws from the global RNG, which a run resumed past that point would not repeat."""
        return DataLoader(
            data,
            collate_fn=collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )

    def has_split(self, split: str) -> bool:
        return split in self.datasets

    def take_resume(self) -> tuple[int, int] | None:
        """``(epoch, batches done)`` to skip once in the next training loader, set by a resumed checkpoint."""
        resume, self._resume = self._resume, None
        return resume

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
            self._resume = (state["epoch"], state["batches_done"])
