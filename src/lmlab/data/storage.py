"""How tokenized splits are stored in the cache and read back: numpy files, memory-mapped on first use.

A flat token stream (language modeling) is one ``<stem>.npy``; a split of variable-length rows (texts,
sentence pairs) is ragged: the ids of every row one after the other in ``<stem>.ids.npy`` and the row
boundaries in ``<stem>.offsets.npy``. Ids take the smallest integer type that holds the vocabulary, so
a split costs 2 bytes a token for vocabularies up to 65,536 ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

#: tokens copied at a time from a stream's raw file into its ``.npy`` file
_COPY_BLOCK = 1 << 24


def token_dtype(vocab_size: int) -> type[np.integer]:
    """The integer type of stored ids ``0 .. vocab_size - 1``."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def save_token_stream(path: Path, chunks: Iterable[Sequence[int]], vocab_size: int) -> int:
    """Write a flat token stream given in chunks, holding one chunk at a time: the ids go to a raw file as they
    come, and then into the ``.npy`` file by blocks; returns the stream's length."""
    dtype = token_dtype(vocab_size)
    raw = path.with_name(path.name + ".raw")
    with raw.open("wb") as out:
        for chunk in chunks:
            out.write(np.asarray(chunk, dtype=dtype).tobytes())
    n = raw.stat().st_size // np.dtype(dtype).itemsize
    stream = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n,))
    source = np.memmap(raw, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
    for start in range(0, n, _COPY_BLOCK):
        stream[start : start + _COPY_BLOCK] = source[start : start + _COPY_BLOCK]
    stream.flush()
    del stream, source
    raw.unlink()
    return n


def save_ragged(folder: Path, stem: str, rows: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Write rows of ids as ``<stem>.ids.npy`` and ``<stem>.offsets.npy``."""
    flat = np.fromiter((t for row in rows for t in row), dtype=token_dtype(vocab_size))
    np.save(folder / f"{stem}.ids.npy", flat)
    np.save(folder / f"{stem}.offsets.npy", np.cumsum([0] + [len(row) for row in rows], dtype=np.int64))


class MappedArray:
    """A cached ``.npy`` file, memory-mapped on first use: a DataLoader worker maps the file itself
    instead of receiving a pickled copy (an object that crosses to a worker carries only the path)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self.array)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}


class RaggedIds:
    """The rows of a ragged split: offsets in memory (small), ids memory-mapped."""

    def __init__(self, folder: Path, stem: str) -> None:
        self.ids = MappedArray(folder / f"{stem}.ids.npy")
        self.offsets: np.ndarray = np.load(folder / f"{stem}.offsets.npy")

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def rows(self, indices: Iterable[int]) -> list[np.ndarray]:
        ids, offsets = self.ids.array, self.offsets
        return [ids[offsets[i] : offsets[i + 1]].astype(np.int64) for i in indices]


class BatchedDataset(Dataset):
    """A dataset that builds a whole batch at once in :meth:`__getitems__`, which DataLoader calls with a
    batch's indices; the loader's collate function is then :func:`as_batch`."""

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> Any:
        raise NotImplementedError


def as_batch(batch: Any) -> Any:
    """Collate for a :class:`BatchedDataset`, whose ``__getitems__`` already returns the batch."""
    return batch
