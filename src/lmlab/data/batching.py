"""Batching shared by the tasks that read one example per row: right-padding, and batch samplers that
group examples of similar length so padding stays small.

Every sampler's order is a pure function of ``(seed, epoch)``, so a resumed run sees the same batches,
and every example is seen exactly once per epoch. Under DDP each rank takes every ``world``-th batch
and all ranks take the same number.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id sequences to the longest one: ``(ids, lengths)``."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
    return ids, lengths


class EpochPermutation(Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``seed + epoch``; Lightning calls :meth:`set_epoch`."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + self.epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator()).tolist())


class EpochBatchSampler(Sampler[list[int]]):
    """Base class: subclasses give :meth:`batches` (every batch of this epoch, before sharding), whose
    count must not change from epoch to epoch (Lightning sizes an epoch once)."""

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int, world_size: int) -> None:
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size
        # Lightning sets the epoch on ``batch_sampler.sampler``
        self.sampler = EpochPermutation(n, seed)
        self._skip: tuple[int, int] | None = None
        self._per_rank: int | None = None

    def batches(self) -> list[list[int]]:
        raise NotImplementedError

    @property
    def per_rank(self) -> int:
        """Batches each rank takes per epoch: equal on all ranks, so DDP never waits on a missing batch."""
        if self._per_rank is None:
            n_batches = len(self.batches())
            self._per_rank = (
                n_batches // self.world_size if self.shuffle else len(range(self.rank, n_batches, self.world_size))
            )
        return self._per_rank

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Skip the first ``batches_done`` batches of ``epoch`` once."""
        self._skip = (epoch, batches_done)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.batches()[self.rank :: self.world_size][: self.per_rank]
        skip = 0
        if self._skip is not None and self._skip[0] == self.sampler.epoch:
            skip = self._skip[1]
        self._skip = None
        yield from mine[skip:]

    def _shuffled(self, batches: list[list[int]], g: torch.Generator) -> list[list[int]]:
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


class BucketBatchSampler(EpochBatchSampler):
    """Batches of ``batch_size`` examples of similar length.

    Training (``shuffle``): pools of ``bucket_batches * batch_size`` shuffled examples are sorted by
    length and cut into batches, and the batches are shuffled. Evaluation: all examples longest first.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        bucket_batches: int = 100,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(len(lengths), shuffle, seed, rank, world_size)
        self.lengths, self.batch_size, self.bucket_batches = lengths, batch_size, max(1, bucket_batches)

    def batches(self) -> list[list[int]]:
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        g = self.sampler.generator()
        order = torch.randperm(len(self.lengths), generator=g).numpy()
        pool = self.batch_size * self.bucket_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size))
        return self._shuffled(batches, g)


class TokenBudgetBatchSampler(EpochBatchSampler):
    """Batches holding at most ``max_tokens`` tokens after padding (rows x longest row), as translation
    systems batch: short sentences come many to a batch, long ones few, and the work per step is even.

    ``lengths`` is each example's size in tokens (for sentence pairs, the longer side). Examples are
    sorted by length, with ties broken at random each epoch, and cut greedily into batches; since the
    sorted lengths are the same every epoch, so are the batch boundaries and the batch count, while
    which examples share a batch changes. Batches are then shuffled (training) or kept longest first.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        max_tokens: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(len(lengths), shuffle, seed, rank, world_size)
        longest = int(lengths.max()) if len(lengths) else 0
        if max_tokens < longest:
            raise ValueError(f"max_tokens={max_tokens} is smaller than the longest example ({longest} tokens)")
        self.lengths, self.max_tokens = lengths, max_tokens
        self.bounds = self._bounds(np.sort(lengths)[::-1])

    def _bounds(self, sorted_lengths: np.ndarray) -> list[tuple[int, int]]:
        """``(start, end)`` of each batch in the longest-first order: the longest row of a batch is its first."""
        bounds, start = [], 0
        while start < len(sorted_lengths):
            fit = self.max_tokens // int(sorted_lengths[start])
            bounds.append((start, min(start + fit, len(sorted_lengths))))
            start += fit
        return bounds

    def batches(self) -> list[list[int]]:
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            return [order[a:b].tolist() for a, b in self.bounds]
        g = self.sampler.generator()
        tie_break = torch.randperm(len(self.lengths), generator=g).numpy()
        order = tie_break[np.argsort(-self.lengths[tie_break], kind="stable")]
        return self._shuffled([order[a:b].tolist() for a, b in self.bounds], g)
