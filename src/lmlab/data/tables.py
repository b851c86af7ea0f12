"""Where row data comes from (texts with labels, sentence pairs): named columns per split.

A source maps the roles a task needs (``text`` and ``label``; ``source`` and ``target``) to the
column names of the data, and returns one :class:`SplitTable` per split. A source without a
validation split gets one drawn at random from its training rows, with a seed of its own so
every run (and the data cache) sees the same split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmlab.data.files import file_signature, load_hub_dataset, load_table, resolve_files
from lmlab.errors import DataError

SPLITS = ("train", "validation", "test")


@dataclass
class SplitTable:
    """One split: a list per role, the class names of roles stored as class labels, and where it came from."""

    columns: dict[str, list[Any]]
    origin: str
    class_names: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def take(self, indices: Sequence[int], origin: str) -> SplitTable:
        return SplitTable({r: [v[i] for i in indices] for r, v in self.columns.items()}, origin, self.class_names)


class TableSource:
    """Base class: subclasses implement :meth:`load_splits` and :meth:`fingerprint`."""

    def __init__(self, columns: Mapping[str, str], val_fraction: float, split_seed: int) -> None:
        if not 0 <= val_fraction < 1:
            raise DataError(f"data.source.val_fraction must be in [0, 1), got {val_fraction}.")
        self.columns = dict(columns)
        self.val_fraction, self.split_seed = val_fraction, split_seed

    def load_splits(self) -> dict[str, SplitTable]:
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        raise NotImplementedError

    def load(self) -> dict[str, SplitTable]:
        """Every split there is; validation drawn from train when the data has none."""
        splits = self.load_splits()
        if "train" not in splits:
            raise DataError("The data has no training split. Give training files (data.source.train_files) "
                            "or map a hub split to train (data.source.splits.train).")
        if "validation" not in splits and self.val_fraction > 0:
            splits["train"], splits["validation"] = self._draw_validation(splits["train"])
        return splits

    def _draw_validation(self, train: SplitTable) -> tuple[SplitTable, SplitTable]:
        n = len(train)
        n_val = int(round(n * self.val_fraction))
        if n_val < 1 or n_val >= n:
            raise DataError(f"data.source.val_fraction={self.val_fraction} of {n} training rows leaves no "
                            "validation or no training rows; change it or give validation files.")
        order = np.random.default_rng(self.split_seed).permutation(n)
        val, rest = np.sort(order[:n_val]), np.sort(order[n_val:])
        share = f"{self.val_fraction:.0%} of {train.origin}"
        return (train.take(rest.tolist(), f"the rest of {train.origin}"),
                train.take(val.tolist(), f"a random {share} (data.source.split_seed={self.split_seed})"))

    def check_columns(self, available: Sequence[str], where: str) -> None:
        """Every configured column must be there; the error names the role's key and the columns there are."""
        for role, column in self.columns.items():
            if column not in available:
                raise DataError(f"Column '{column}' is not in {where} (columns: {', '.join(available)}). "
                                f"Set data.source.columns.{role} to the {role} column's name.")

    def _base_fingerprint(self) -> dict[str, Any]:
        return {"columns": self.columns, "val": self.val_fraction, "split_seed": self.split_seed}


def _class_names(features: Any, columns: Mapping[str, str]) -> dict[str, list[str]]:
    """Names of the columns stored as ``datasets.ClassLabel`` (IMDB's neg/pos, AG News' topics)."""
    names: dict[str, list[str]] = {}
    for role, column in columns.items():
        feature = features.get(column) if features is not None else None
        if feature is not None and hasattr(feature, "names"):
            names[role] = list(feature.names)
    return names


class HubTable(TableSource):
    """A Hugging Face hub data set (``datasets.load_dataset(path, name)``), or local files through a
    builder (``path=parquet``, ``data_files=...``)."""

    def __init__(
        self,
        path: str,
        columns: Mapping[str, str],
        name: str | None = None,
        splits: Mapping[str, str] | None = None,
        data_files: Any = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        revision: str | None = None,
    ) -> None:
        super().__init__(columns, val_fraction, split_seed)
        self.path, self.name, self.revision = path, name, revision
        self.splits = dict(splits or {s: s for s in SPLITS})
        self.data_files = data_files

    def load_splits(self) -> dict[str, SplitTable]:
        data = load_hub_dataset(self.path, self.name, self.revision, data_files=self.data_files, offline_hint=(
            "Use data=labeled_files with data.source.train_files=<local json/jsonl/csv/parquet files>."))
        out: dict[str, SplitTable] = {}
        for split, hub_split in self.splits.items():
            if hub_split not in data:
                continue
            table = data[hub_split]
            where = f"{self.path}[{hub_split}]"
            self.check_columns(table.column_names, where)
            out[split] = SplitTable({r: table[c] for r, c in self.columns.items()}, where,
                                    _class_names(table.features, self.columns))
        return out

    def fingerprint(self) -> dict[str, Any]:
        return {"source": "hub", "path": self.path, "name": self.name, "splits": self.splits,
                "data_files": self.data_files, "revision": self.revision, **self._base_fingerprint()}


class TableFiles(TableSource):
    """Local json/jsonl/csv/parquet files, given as paths or globs for each split."""

    def __init__(
        self,
        train_files: str | Sequence[str],
        columns: Mapping[str, str],
        val_files: str | Sequence[str] | None = None,
        test_files: str | Sequence[str] | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
    ) -> None:
        super().__init__(columns, val_fraction, split_seed)
        if not train_files:
            raise DataError("data.source.train_files is empty: give at least one training file or glob.")
        self.files = {
            "train": resolve_files(train_files, "data.source.train_files"),
            "validation": resolve_files(val_files, "data.source.val_files"),
            "test": resolve_files(test_files, "data.source.test_files"),
        }

    def load_splits(self) -> dict[str, SplitTable]:
        out: dict[str, SplitTable] = {}
        for split, files in self.files.items():
            if not files:
                continue
            key = f"data.source.{'val' if split == 'validation' else split}_files"
            merged: dict[str, list[Any]] = {role: [] for role in self.columns}
            names: dict[str, list[str]] = {}
            for path in files:
                table = load_table(path, [], key)
                self.check_columns(table.column_names, f"'{path}'")
                for role, column in self.columns.items():
                    merged[role].extend(table[column])
                names.update(_class_names(table.features, self.columns))
            origin = ", ".join(f"'{p}'" for p in files)
            out[split] = SplitTable(merged, origin, names)
        return out

    def fingerprint(self) -> dict[str, Any]:
        return {"source": "files", "files": {s: file_signature(f) for s, f in self.files.items()},
                **self._base_fingerprint()}
