"""Batch samplers: length buckets that cover every example once per epoch across ranks, keep padding small,
change order each epoch and resume mid-epoch."""

from __future__ import annotations

import numpy as np
import pytest

from lmlab.data.batching import BucketBatchSampler


@pytest.mark.parametrize("world", [1, 3])
def test_bucket_batches_cover_every_example_once_per_epoch(world: int) -> None:
    lengths = np.random.default_rng(0).integers(1, 200, size=1003)
    seen: list[int] = []
    for rank in range(world):
        sampler = BucketBatchSampler(lengths, 16, shuffle=True, seed=3, bucket_batches=10, rank=rank, world_size=world)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        seen += [i for b in batches for i in b]
    if world == 1:
        assert sorted(seen) == list(range(len(lengths)))
    else:  # every rank takes the same number of batches: at most world-1 batches are left out
        assert len(seen) == len(set(seen)) and len(seen) >= len(lengths) - (world - 1) * 16


def test_bucket_batches_keep_padding_small_and_change_each_epoch() -> None:
    lengths = np.random.default_rng(1).integers(1, 400, size=2000)
    sampler = BucketBatchSampler(lengths, 32, shuffle=True, seed=0, bucket_batches=20)

    def padding(batches: list[list[int]]) -> float:
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches) / lengths.sum()

    first = list(sampler)
    random_batches = [list(range(i, min(i + 32, 2000))) for i in range(0, 2000, 32)]
    assert padding(first) < 0.1 * padding(random_batches)
    sampler.sampler.set_epoch(1)
    second = list(sampler)
    assert first != second
    sampler.sampler.set_epoch(0)
    assert list(sampler) == first, "the order is a function of (seed, epoch) only"


def test_bucket_batches_resume_skips_the_batches_done() -> None:
    lengths = np.arange(1, 301)
    sampler = BucketBatchSampler(lengths, 10, shuffle=True, seed=5)
    sampler.sampler.set_epoch(2)
    full = list(sampler)
    sampler.resume_at(2, 7)
    assert list(sampler) == full[7:]
    assert list(sampler) == full, "the skip applies once"


def test_eval_batches_are_longest_first_and_complete() -> None:
    lengths = np.array([3, 9, 1, 7, 7, 2])
    batches = list(BucketBatchSampler(lengths, 4, shuffle=False))
    assert [i for b in batches for i in b] == [1, 3, 4, 0, 5, 2]
