"""Where row data comes from (texts with labels, sentence pairs): named columns per split.

A source maps the roles a task needs (``text`` and ``label``; ``source`` and ``target``) to the
column names of the data, and returns one :class:`SplitTable` per split. A source without a
validation (or test) split gets one drawn at random from its training rows (``val_fraction``,
``test_fraction``), with a seed of its own so every run (and the data cache) sees the same split.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.data.files import (
    SplitFiles,
    data_files_signature,
    file_signature,
    files_key,
    load_hub_dataset,
    load_table,
    read_text_file,
    resolve_files,
)
from lmlab.data.splits import SPLITS, hub_split_absent, keep_wanted, not_drawn, splits_to_read
from lmlab.errors import DataError
from lmlab.registry import register

log = logging.getLogger("lmlab")

#: the local-files data option of each task that reads tables, by a column role only that task reads
_LOCAL_OPTIONS = {"src": "translation_files", "prompt": "instructions"}
#: the names the translation sides had before ``src`` and ``tgt``; configs and checkpoints that use them still read
_FORMER_SIDES = {"source": "src", "target": "tgt"}
#: how a table source draws a split it lacks (:func:`~lmlab.data.splits.not_drawn`)
DRAWN_FROM_TRAIN = "drawn at random from the training rows"


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
    """Base class: subclasses implement :meth:`load_splits` and :meth:`fingerprint`, both of the ``splits``
    to read (``None``: every split)."""

    def __init__(
        self, columns: Mapping[str, str], val_fraction: float, split_seed: int, test_fraction: float = 0.0
    ) -> None:
        for key, share in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= share < 1:
                raise DataError(f"data.source.{key} must be in [0, 1), got {share}.")
        if val_fraction + test_fraction >= 1:
            raise DataError(
                f"data.source.val_fraction + test_fraction must leave training rows, got "
                f"{val_fraction} + {test_fraction}."
            )
        # a role mapped to no column (null) is one the data does not have
        self.columns = {role: column for role, column in columns.items() if column is not None}
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed

    def load_splits(self, splits: Collection[str] | None = None) -> dict[str, SplitTable]:
        raise NotImplementedError

    def fingerprint(self, splits: Collection[str] | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def absent_reason(self, split: str) -> str:
        """Why this source gives no ``split`` (asked of a split it did not give), and the fix."""
        return f"the data source ({type(self).__name__}) gives no {split} split"

    def to_read(self, splits: Collection[str] | None, given: Collection[str]) -> set[str]:
        """Which of the ``given`` splits to read to serve ``splits``."""
        return splits_to_read(splits, given, {"validation": self.val_fraction, "test": self.test_fraction})

    def load(self, splits: Collection[str] | None = None) -> dict[str, SplitTable]:
        """The ``splits`` asked for (``None``: every split there is); validation and test drawn from train when
        the data has none."""
        loaded = self.load_splits(splits)
        if splits is not None and "train" not in loaded and "train" not in splits:
            return keep_wanted(loaded, splits)
        if "train" not in loaded:
            raise DataError(
                "The data has no training split. Give training files (data.source.train_files) "
                "or map a hub split to train (data.source.splits.train)."
            )
        wanted = {
            split: share
            for split, share in (("validation", self.val_fraction), ("test", self.test_fraction))
            if split not in loaded and share > 0
        }
        if wanted:
            loaded.update(self._draw(loaded["train"], wanted))
        return keep_wanted(loaded, splits)

    def _draw(self, train: SplitTable, shares: dict[str, float]) -> dict[str, SplitTable]:
        """Random held-out splits of the training rows (validation first, then test), and the rest as train."""
        n = len(train)
        order = np.random.default_rng(self.split_seed).permutation(n)
        out, start = {}, 0
        for split, share in shares.items():
            count = int(round(n * share))
            key = "val_fraction" if split == "validation" else "test_fraction"
            if count < 1 or start + count >= n:
                raise DataError(
                    f"data.source.{key}={share} of {n} training rows leaves no {split} or no training rows; "
                    f"change it or give {split} files."
                )
            chosen = np.sort(order[start : start + count])
            out[split] = train.take(
                chosen.tolist(), f"a random {share:.0%} of {train.origin} (data.source.split_seed={self.split_seed})"
            )
            start += count
        out["train"] = train.take(np.sort(order[start:]).tolist(), f"the rest of {train.origin}")
        return out

    def check_columns(self, available: Sequence[str], where: str) -> None:
        """Every configured column must be there; the error names the role's key and the columns there are."""
        for role, column in self.columns.items():
            if column not in available and column.split(".", 1)[0] not in available:
                raise DataError(
                    f"Column '{column}' is not in {where} (columns: {', '.join(available)}). "
                    f"Set data.source.columns.{role} to the {role} column's name{_role_hint(role)}."
                )

    def column_values(self, table: Any, role: str, where: str) -> list[Any]:
        """The values of a role's column; ``translation.de`` reads key ``de`` of a column of dicts (the
        layout of the WMT and IWSLT data sets on the hub)."""
        column = self.columns[role]
        # ``table[name][:]``: the whole column as a list in one Arrow read (``table[name]`` is a lazy column,
        # read again at every index)
        if column in table.column_names:
            return table[column][:]
        head, key = column.split(".", 1)
        rows = table[head][:]
        keys = sorted(rows[0]) if rows and isinstance(rows[0], dict) else []
        if key not in keys:
            raise DataError(
                f"'{key}' is not a key of column '{head}' in {where} (keys: {', '.join(keys) or 'none'}). "
                f"Set data.source.columns.{role}{_role_hint(role)} to one of them."
            )
        return [row[key] for row in rows]

    def _base_fingerprint(self) -> dict[str, Any]:
        return {
            "columns": self.columns,
            "val": self.val_fraction,
            "split_seed": self.split_seed,
            **({"test": self.test_fraction} if self.test_fraction else {}),
        }


def _role_hint(role: str) -> str:
    """Where a translation config sets a role's column: its language code."""
    return {"src": " (data.source_lang)", "tgt": " (data.target_lang)"}.get(role, "")


def translation_sides(mapping: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``mapping`` (a source's columns, or a split's two files) keyed by the sides ``src`` and ``tgt``, read
    from their former names too (``source``, ``target``); where both names are there, the new one wins."""
    former = [name for name in mapping if name in _FORMER_SIDES]
    if former:
        log.warning(
            "%s names the translation sides %s; they are now %s.",
            key,
            " and ".join(former),
            " and ".join(_FORMER_SIDES[name] for name in former),
        )
    sides = {name: value for name, value in mapping.items() if name not in _FORMER_SIDES}
    for name in former:
        sides.setdefault(_FORMER_SIDES[name], mapping[name])
    return sides


def _class_names(features: Any, columns: Mapping[str, str]) -> dict[str, list[str]]:
    """Names of the columns stored as ``datasets.ClassLabel`` (IMDB's neg/pos, AG News' topics)."""
    names: dict[str, list[str]] = {}
    for role, column in columns.items():
        feature = features.get(column) if features is not None else None
        if feature is not None and hasattr(feature, "names"):
            names[role] = list(feature.names)
    return names


@register("source")
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
        test_fraction: float = 0.0,
    ) -> None:
        super().__init__(columns, val_fraction, split_seed, test_fraction)
        self.path, self.name, self.revision = path, name, revision
        self.splits = dict(splits or {s: s for s in SPLITS})
        self.data_files = data_files

    def load_splits(self, splits: Collection[str] | None = None) -> dict[str, SplitTable]:
        data = load_hub_dataset(
            self.path,
            self.name,
            self.revision,
            data_files=self.data_files,
            offline_hint=(
                f"Use data={self._local_option()} with data.source.train_files=<local json/jsonl/csv/parquet files>."
            ),
        )
        out: dict[str, SplitTable] = {}
        for split, hub_split in self.splits.items():
            if hub_split not in data:
                continue
            table = data[hub_split]
            where = f"{self.path}[{hub_split}]"
            self.check_columns(table.column_names, where)
            out[split] = SplitTable(
                {r: self.column_values(table, r, where) for r in self.columns},
                where,
                _class_names(table.features, self.columns),
            )
        return out

    def _local_option(self) -> str:
        """The data option that reads such a table from local files, told by a role only its task reads."""
        return next((option for role, option in _LOCAL_OPTIONS.items() if role in self.columns), "labeled_files")

    def fingerprint(self, splits: Collection[str] | None = None) -> dict[str, Any]:
        return {
            "source": "hub",
            "path": self.path,
            "name": self.name,
            "splits": self.splits,
            "data_files": data_files_signature(self.data_files),
            "revision": self.revision,
            **self._base_fingerprint(),
        }

    def absent_reason(self, split: str) -> str:
        return hub_split_absent(self.path, self.data_files, self.splits, split, DRAWN_FROM_TRAIN)


@register("source")
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
        test_fraction: float = 0.0,
    ) -> None:
        super().__init__(columns, val_fraction, split_seed, test_fraction)
        self.files = SplitFiles(train_files, val_files, test_files)

    def _files(self, splits: Collection[str] | None) -> dict[str, list[Path]]:
        return self.files.resolve(self.to_read(splits, self.files.given))

    def load_splits(self, splits: Collection[str] | None = None) -> dict[str, SplitTable]:
        out: dict[str, SplitTable] = {}
        for split, files in self._files(splits).items():
            key = files_key(split)
            merged: dict[str, list[Any]] = {role: [] for role in self.columns}
            names: dict[str, list[str]] = {}
            for path in files:
                table = load_table(path, [], key)
                self.check_columns(table.column_names, f"'{path}'")
                for role in self.columns:
                    merged[role].extend(self.column_values(table, role, f"'{path}'"))
                names.update(_class_names(table.features, self.columns))
            origin = ", ".join(f"'{p}'" for p in files)
            out[split] = SplitTable(merged, origin, names)
        return out

    def fingerprint(self, splits: Collection[str] | None = None) -> dict[str, Any]:
        return {
            "source": "files",
            "files": {s: file_signature(f) for s, f in self._files(splits).items()},
            **self._base_fingerprint(),
        }

    def absent_reason(self, split: str) -> str:
        key = files_key(split)
        return not_drawn(split, f"no {key} are given", f"give {key}", DRAWN_FROM_TRAIN)


@register("source")
class AlignedTextFiles(TableSource):
    """Sentence pairs from two aligned plain-text files per split, one sentence per line (the layout of
    most parallel corpora): ``{src: train.en, tgt: train.de}``. The files of a split must have the
    same number of lines."""

    def __init__(
        self,
        train: Mapping[str, str],
        validation: Mapping[str, str] | None = None,
        test: Mapping[str, str] | None = None,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        test_fraction: float = 0.0,
    ) -> None:
        super().__init__({"src": "src", "tgt": "tgt"}, val_fraction, split_seed, test_fraction)
        self.pairs: dict[str, Mapping[str, str]] = {}
        for split, files in (("train", train), ("validation", validation), ("test", test)):
            if not files:
                continue
            pair = translation_sides(files, f"data.source.{split}")
            missing = sorted({"src", "tgt"} - set(pair))
            if missing:
                raise DataError(
                    f"data.source.{split} needs a file for {missing}: data.source.{split}={{src: <file>, tgt: <file>}}."
                )
            self.pairs[split] = pair

    def _files(self, splits: Collection[str] | None) -> dict[str, dict[str, Path]]:
        """The two files of each split read to serve ``splits``."""
        read = self.to_read(splits, self.pairs)
        return {
            split: {role: resolve_files(str(pair[role]), f"data.source.{split}.{role}")[0] for role in pair}
            for split, pair in self.pairs.items()
            if split in read
        }

    def load_splits(self, splits: Collection[str] | None = None) -> dict[str, SplitTable]:
        out: dict[str, SplitTable] = {}
        for split, pair in self._files(splits).items():
            lines = {role: read_text_file(path).splitlines() for role, path in pair.items()}
            if len(lines["src"]) != len(lines["tgt"]):
                raise DataError(
                    f"The {split} files are not aligned: '{pair['src']}' has {len(lines['src'])} lines and "
                    f"'{pair['tgt']}' has {len(lines['tgt'])}. Line n of one must translate line n of the "
                    "other; fix the files (keep empty lines as placeholders, they are skipped and counted)."
                )
            out[split] = SplitTable(lines, f"'{pair['src']}' / '{pair['tgt']}'")
        return out

    def fingerprint(self, splits: Collection[str] | None = None) -> dict[str, Any]:
        return {
            "source": "aligned_text",
            **self._base_fingerprint(),
            "files": {s: file_signature([p["src"], p["tgt"]]) for s, p in self._files(splits).items()},
        }

    def absent_reason(self, split: str) -> str:
        key = f"data.source.{split}"
        return not_drawn(split, f"no {key} files are given", f"give them ({key}.src, {key}.tgt)", DRAWN_FROM_TRAIN)
