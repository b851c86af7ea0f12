"""What every task's data module shares: the tokenized-data cache (built once, with the tokenizer and meta data
beside the splits), loaders with their own seeded generators, sharding across processes, and the data position
saved for exact resume. A task's data module says how a split is read and encoded and how it is batched."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import BatchSampler, DataLoader, Dataset

from lmlab.data.batching import EpochBatchSampler
from lmlab.data.cache import cache_key, cached_dir
from lmlab.data.info import DataInfo
from lmlab.data.storage import as_batch
from lmlab.errors import DataError
from lmlab.tokenizers import Tokenizer, tokenizer_from_state

log = logging.getLogger("lmlab")
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
    """Base data module. A task's data module gives

    - :meth:`cache_parts`: its settings that decide the cached content;
    - :meth:`fit_tokenizer`: the tokenizer, trained on the training split unless one is given;
    - :meth:`encode_split`: writes one split into the cache and returns what the meta data records of it;
    - :meth:`open_split`: the dataset of a cached split;
    - :meth:`train_sampler` and :meth:`eval_sampler`: batch samplers (:class:`EpochBatchSampler`).

    ``tokenizer`` is either a builder, trained on the training split when the cache is built, or a ready
    :class:`Tokenizer` (the one saved in a checkpoint, for evaluation and resume). ``splits`` limits what is
    read (``None``: every split the source has); scoring a checkpoint reads only the splits it scores.

    The loader settings (keywords from ``batch_size`` on) are the same for every task: a task's data module
    takes its own settings and hands the rest on as ``**loading``. ``roles`` are the column roles a task
    reads from a table source (``text`` and ``label``); each must be mapped in ``data.source.columns``.
    """

    roles: tuple[str, ...] = ()
    #: whether a cache build that stops can be continued by the next one (:func:`cached_dir`'s ``resumable``)
    resumable_cache = False
    #: what :attr:`data_info` gives: the values the task builds its network and its loss from
    info_type: type[DataInfo] = DataInfo

    def __init__(
        self,
        source: Any,
        tokenizer: TokenizerBuilder | Tokenizer,
        *,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        cache_dir: str = ".cache/lmlab",
        seed: int = 1337,
        splits: Collection[str] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"data.batch_size must be positive, got {batch_size}.")
        missing = [role for role in self.roles if role not in source.columns]
        if missing:
            example = " ".join(f"data.source.columns.{role}=<column>" for role in missing)
            raise DataError(f"data.source.columns needs a column name for {missing} (e.g. {example}).")
        self.source = source
        self.tokenizer_spec = tokenizer
        self.tokenizer: Tokenizer | None = tokenizer if isinstance(tokenizer, Tokenizer) else None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.cache_root, self.seed = cache_dir, seed
        self.splits = sorted(splits) if splits is not None else None
        self.meta: dict[str, Any] = {}
        self.datasets: dict[str, Dataset] = {}
        self._cache: Path | None = None
        self._resume: tuple[int, int] | None = None

    # -- what a task's data module gives ----------------------------------------------------------
    def cache_parts(self) -> dict[str, Any]:
        """The settings besides the source and the tokenizer that decide the cached content."""
        raise NotImplementedError

    def read_splits(self) -> dict[str, Any]:
        """The splits to encode, from the source (a source of its own that reads every split needs no
        ``splits`` argument)."""
        return self.source.load() if self.splits is None else self.source.load(self.splits)

    def fit_tokenizer(self, splits: dict[str, Any]) -> Tokenizer:
        """A tokenizer the configured builder trains on the training split (:meth:`train_tokenizer`)."""
        raise NotImplementedError

    def given_tokenizer(self, tokenizer: Tokenizer) -> Tokenizer:
        """The tokenizer given ready-made (a checkpoint's), in the form the task's encoding uses."""
        return tokenizer

    def left_out_reason(self, name: str, data: Any) -> str | None:
        """Why a split the source gave cannot be scored and is left out (e.g. it has no labels); ``None`` keeps it."""
        return None

    def describe(self, splits: dict[str, Any]) -> dict[str, Any]:
        """Meta data that holds for all splits (e.g. the label set), decided before they are encoded."""
        return {}

    def encode_split(self, folder: Path, name: str, data: Any, tokenizer: Tokenizer, meta: dict[str, Any]) -> dict:
        """Write split ``name`` into ``folder``; returns what ``meta.json`` records of it."""
        raise NotImplementedError

    def open_split(self, folder: Path, name: str) -> Dataset:
        """The dataset of a split written by :meth:`encode_split`."""
        raise NotImplementedError

    def report(self, name: str, info: dict[str, Any]) -> None:
        """Warn about what encoding left out or cut (``info``: what :meth:`encode_split` returned)."""

    def train_sampler(self, data: Any, rank: int, world: int) -> EpochBatchSampler:
        raise NotImplementedError

    def eval_sampler(self, data: Any, rank: int, world: int) -> Iterable[list[int]]:
        raise NotImplementedError

    def too_few_message(self, data: Any, world: int) -> str:
        """Why the training split gives no batch to each of ``world`` processes, and the fix."""
        return f"The train split is too small for {world} process(es) at this batch size. Lower data.batch_size."

    def unserved_reason(self, name: str, info: dict[str, Any]) -> str:
        """Why a split in the cache serves no batch (``info``: what :meth:`encode_split` returned), and the fix."""
        return f"the {name} split serves no batch"

    def missing_split_message(self, split: str) -> str:
        """The error for a loader of a split the data does not have."""
        return f"The data has no {split} split: {self.absent_reason(split)}."

    def absent_reason(self, split: str) -> str | None:
        """Why the data has no ``split`` to serve, with the fix (``None``: it has one). Asked after :meth:`setup`, so
        that a caller decides which splits to score before scoring any: the source gives none (no files, a hub data
        set without it, a share of 0), the split was left out (:meth:`left_out_reason`), or it serves no batch
        (:meth:`unserved_reason`)."""
        if split in self.datasets:
            return None
        if split in self.meta["splits"]:
            return self.unserved_reason(split, self.meta["splits"][split])
        left_out = self.meta.get("left_out", {}).get(split)
        return left_out or self.source.absent_reason(split)

    # -- the cache ----------------------------------------------------------------------------
    def _key(self) -> str:
        return cache_key(
            {
                **self.cache_parts(),
                "source": self.source.fingerprint() if self.splits is None else self.source.fingerprint(self.splits),
                "splits": self.splits,
                "tokenizer": tokenizer_spec_key(self.tokenizer_spec),
            }
        )

    def prepare_data(self) -> None:
        self._cache = cached_dir(self.cache_root, self._key(), self.build_cache, self.resumable_cache)

    def build_cache(self, folder: Path) -> None:
        """Encode every split into ``folder``, beside ``tokenizer.json`` and ``meta.json`` (which also records the
        splits left out, and why)."""
        splits = self.read_splits()
        left_out = {name: why for name, data in splits.items() if (why := self.left_out_reason(name, data))}
        for name, why in left_out.items():
            log.warning("Left out: %s.", why)
            del splits[name]
        meta = self.describe(splits)
        tokenizer = self._cache_tokenizer(folder, splits)
        meta["splits"] = {name: self.encode_split(folder, name, data, tokenizer, meta) for name, data in splits.items()}
        meta["left_out"] = left_out
        (folder / "meta.json").write_text(json.dumps(meta, indent=2))

    def _cache_tokenizer(self, folder: Path, splits: dict[str, Any]) -> Tokenizer:
        """The entry's tokenizer, saved in ``folder`` before any split is encoded: a resumed build reads it back
        instead of training it again."""
        saved = folder / "tokenizer.json"
        if saved.is_file():
            return tokenizer_from_state(json.loads(saved.read_text()))
        tokenizer = self.fit_tokenizer(splits) if self.tokenizer is None else self.given_tokenizer(self.tokenizer)
        tmp = saved.with_suffix(".tmp")
        tmp.write_text(json.dumps(tokenizer.state()))
        tmp.replace(saved)
        return tokenizer

    def train_tokenizer(self, texts: Iterable[str]) -> Tokenizer:
        """A tokenizer trained on ``texts`` by the configured builder."""
        return self.tokenizer_spec(texts)  # type: ignore[operator]

    def open_cache(self) -> Path:
        """The cache folder, with the tokenizer and meta data loaded from it."""
        if self._cache is None:
            self.prepare_data()
        assert self._cache is not None
        if self.tokenizer is None:
            self.tokenizer = tokenizer_from_state(json.loads((self._cache / "tokenizer.json").read_text()))
        self.meta = json.loads((self._cache / "meta.json").read_text())
        return self._cache

    def setup(self, stage: str | None = None) -> None:
        cache = self.open_cache()
        for name, info in self.meta["splits"].items():
            self.report(name, info)
            dataset = self.open_split(cache, name)
            if dataset is not None:
                self.datasets[name] = dataset

    # -- serving ---------------------------------------------------------------------------
    def rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def loader(self, data: Dataset, batch_sampler: Iterable[list[int]]) -> DataLoader:
        """A DataLoader with its own generator: otherwise every pass over a loader (each epoch, each
        validation) draws from the global RNG, which a run resumed past that point would not repeat."""
        if isinstance(batch_sampler, BatchSampler):
            # examples cut into batches: handed over as such, so that Lightning can replace the sampler of
            # examples (by a sequential one, for trainer.overfit_batches)
            batching = {k: getattr(batch_sampler, k) for k in ("sampler", "batch_size", "drop_last")}
        else:
            batching = {"batch_sampler": batch_sampler}
        return DataLoader(
            data,
            **batching,
            collate_fn=as_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def has_split(self, split: str) -> bool:
        return split in self.datasets

    def train_dataloader(self) -> DataLoader:
        rank, world = self.rank_world()
        data = self.datasets["train"]
        sampler = self.train_sampler(data, rank, world)
        if sampler.per_rank < 1:
            raise DataError(self.too_few_message(data, world))
        resume, self._resume = self._resume, None
        if resume is not None:
            sampler.resume_at(*resume)
        return self.loader(data, sampler)

    def eval_dataloader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            raise DataError(self.missing_split_message(split))
        return self.loader(self.datasets[split], self.eval_sampler(self.datasets[split], *self.rank_world()))

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("validation")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

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
