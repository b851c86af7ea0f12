"""How tokenized splits are stored in the cache and read back, memory-mapped on first use.

A flat token stream (language modeling) is a folder of shards, ``<split>/<index>.bin`` (raw ids, appended as
they are made), and ``<split>/shards.json``, which lists the finished shards and the stream position after
the last one, so a preparation that stops resumes there. A split of variable-length rows (texts, sentence
pairs) is ragged: the ids of every row one after the other in ``<stem>.ids.npy`` and the row boundaries in
``<stem>.offsets.npy``. Ids take the smallest integer type that holds the vocabulary, so a split costs 2
bytes a token for vocabularies up to 65,536 ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from lmlab.errors import is_disk_full, no_space_left

SHARDS_FILE = "shards.json"


def token_dtype(vocab_size: int) -> type[np.integer]:
    """The integer type of stored ids ``0 .. vocab_size - 1``."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


class ShardWriter:
    """Appends a split's ids to shard files of about ``shard_tokens`` ids each (a shard closes at the first append
    that fills it), in ``folder``.

    Each finished shard is synced to disk and then recorded in ``shards.json`` with ``position``, how far into
    the split's stream its ids reach. A writer opened on a folder that a stopped preparation left resumes: it
    deletes the shard that was being written and starts from the recorded position.
    """

    def __init__(self, folder: Path, vocab_size: int, shard_tokens: int) -> None:
        self.folder, self.shard_tokens = folder, shard_tokens
        self.dtype = np.dtype(token_dtype(vocab_size))
        folder.mkdir(exist_ok=True)
        self.state: dict[str, Any] = {"dtype": self.dtype.name, "shards": [], "position": 0, "chars": 0, "done": False}
        if (folder / SHARDS_FILE).is_file():
            self.state = json.loads((folder / SHARDS_FILE).read_text())
        for path in folder.glob("*.bin"):
            if int(path.stem) >= len(self.state["shards"]):
                path.unlink()  # written after the last recorded shard: unfinished
        self._file: Any = None
        self._tokens = self._position = self._chars = 0  # of the open shard

    @property
    def done(self) -> bool:
        return self.state["done"]

    @property
    def position(self) -> int:
        """How far into the split's stream the finished shards reach."""
        return self.state["position"]

    @property
    def tokens(self) -> int:
        return sum(self.state["shards"]) + self._tokens

    @property
    def chars(self) -> int:
        return self.state["chars"] + self._chars

    def append(self, ids: np.ndarray, position: int, chars: int) -> None:
        """Add the ids of ``position`` stream units (of which ``chars`` characters)."""
        if self._file is None:
            self._file = open(self.folder / f"{len(self.state['shards']):05d}.bin", "wb")  # noqa: SIM115
        self._write(lambda: self._file.write(ids.astype(self.dtype, copy=False).tobytes()))
        self._tokens, self._position, self._chars = (
            self._tokens + len(ids),
            self._position + position,
            self._chars + chars,
        )
        if self._tokens >= self.shard_tokens:
            self._close_shard()

    def finish(self) -> None:
        """Close the last shard and mark the split done."""
        if self._file is not None and self._tokens == 0:  # the last appends added no ids
            self._file.close()
            Path(self._file.name).unlink()
            self._file = None
            self.state["chars"] += self._chars
        if self._file is not None:
            self._close_shard()
        self.state["done"] = True
        self._save()

    def _close_shard(self) -> None:
        file, self._file = self._file, None
        self._write(lambda: (file.flush(), os.fsync(file.fileno())))
        file.close()
        self.state["shards"].append(self._tokens)
        self.state["position"] += self._position
        self.state["chars"] += self._chars
        self._tokens = self._position = self._chars = 0
        self._save()

    def _save(self) -> None:
        tmp = self.folder / f"{SHARDS_FILE}.tmp"
        self._write(lambda: tmp.write_text(json.dumps(self.state)))
        os.replace(tmp, self.folder / SHARDS_FILE)

    def _write(self, write: Any) -> None:
        try:
            write()
        except OSError as err:
            if not is_disk_full(err):
                raise
            raise no_space_left(
                self.folder,
                "free some space (or set data.cache_dir to a larger disk) and run again: the preparation resumes "
                "from its last finished shard.",
            ) from None


class TokenShards:
    """A split's shards as one sequence of ids, each shard memory-mapped on first use: a DataLoader worker maps
    the files itself instead of receiving a pickled copy, and every process shares them in the page cache."""

    def __init__(self, folder: Path) -> None:
        state = json.loads((folder / SHARDS_FILE).read_text())
        self.folder, self.dtype = folder, np.dtype(state["dtype"])
        self.counts = list(state["shards"])
        self.bounds = np.cumsum([0, *self.counts])
        self._maps: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.bounds[-1])

    @property
    def maps(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [
                np.memmap(self.folder / f"{i:05d}.bin", dtype=self.dtype, mode="r", shape=(n,))
                for i, n in enumerate(self.counts)
            ]
        return self._maps

    def windows(self, starts: Sequence[int] | np.ndarray, length: int) -> np.ndarray:
        """Rows ``ids[start : start + length]`` for each start; a window may run across shards."""
        starts = np.asarray(starts, dtype=np.int64)
        out = np.empty((len(starts), length), dtype=self.dtype)
        shard_of = np.searchsorted(self.bounds, starts, side="right") - 1
        span = np.arange(length)
        for shard in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == shard)
            local = starts[rows] - self.bounds[shard]
            inside = local + length <= self.counts[shard]
            out[rows[inside]] = self.maps[shard][local[inside, None] + span]
            for row in rows[~inside]:
                out[row] = self.read(int(starts[row]), length)
        return out

    def read(self, start: int, length: int) -> np.ndarray:
        """``ids[start : start + length]``, gathered from every shard it touches."""
        parts, shard = [], int(np.searchsorted(self.bounds, start, side="right") - 1)
        while length > 0:
            local = start - int(self.bounds[shard])
            part = self.maps[shard][local : local + length]
            parts.append(part)
            start, length, shard = start + len(part), length - len(part), shard + 1
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}


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
