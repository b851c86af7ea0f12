"""Where language-modeling text comes from: one string per split.

Each source returns ``{"train": str, "validation": str, "test": str}`` (or only the splits asked for)
and a ``fingerprint()`` of what it reads, which goes into the data cache key. When a source has only
training text, validation and test text are cut from its end by character fractions (the nanoGPT
convention: first 90% train).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from lmlab.data.files import (
    SplitFiles,
    data_files_signature,
    file_signature,
    files_key,
    load_hub_dataset,
    read_column,
)
from lmlab.data.splits import SPLITS, keep_wanted, splits_to_read
from lmlab.errors import DataError
from lmlab.registry import register


def carve_splits(text: str, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Contiguous split of one text: train first, then validation, then test."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum below 1."
        )
    n = len(text)
    train_end = int(n * (1 - val_fraction - test_fraction))
    val_end = int(n * (1 - test_fraction))
    return {"train": text[:train_end], "validation": text[train_end:val_end], "test": text[val_end:]}


class TextSource:
    """Base class: subclasses implement :meth:`load` and :meth:`fingerprint`, both of the ``splits`` asked
    for (``None``: every split)."""

    def load(self, splits: Collection[str] | None = None) -> dict[str, str]:
        raise NotImplementedError

    def fingerprint(self, splits: Collection[str] | None = None) -> dict[str, Any]:
        raise NotImplementedError


@register("source")
class PydocTopics(TextSource):
    """English prose of Python's reference documentation, shipped in the standard library.

    About 465 kB of text that is on every Python installation: the default data set, so the
    default experiment runs offline with nothing to download.
    """

    def __init__(self, val_fraction: float = 0.05, test_fraction: float = 0.05) -> None:
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def load(self, splits: Collection[str] | None = None) -> dict[str, str]:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[name].strip() for name in sorted(topics))
        return keep_wanted(carve_splits(text, self.val_fraction, self.test_fraction), splits)

    def fingerprint(self, splits: Collection[str] | None = None) -> dict[str, Any]:
        import sys

        return {
            "source": "pydoc_topics",
            "python": sys.version_info[:2],
            "val": self.val_fraction,
            "test": self.test_fraction,
        }


@register("source")
class HubText(TextSource):
    """A Hugging Face hub data set with a text column (``datasets.load_dataset(path, name)``), or local
    copies of it through a builder (``path=parquet``, ``data_files=...``)."""

    def __init__(
        self,
        path: str,
        name: str | None = None,
        text_column: str = "text",
        splits: dict[str, str] | None = None,
        join_with: str = "\n",
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        revision: str | None = None,
        data_files: Any = None,
    ) -> None:
        self.path, self.name, self.text_column, self.join_with = path, name, text_column, join_with
        self.data_files = data_files
        self.splits = dict(splits or {s: s for s in SPLITS})
        self.val_fraction, self.test_fraction, self.revision = val_fraction, test_fraction, revision

    def load(self, splits: Collection[str] | None = None) -> dict[str, str]:
        data = load_hub_dataset(
            self.path,
            self.name,
            self.revision,
            data_files=self.data_files,
            offline_hint="Use data=text_files with data.source.train_files=<local files>.",
        )
        out: dict[str, str] = {}
        for split, hub_split in self.splits.items():
            if hub_split not in data:
                continue
            if self.text_column not in data[hub_split].column_names:
                raise DataError(
                    f"Column '{self.text_column}' is not in {self.path}[{hub_split}] "
                    f"(columns: {', '.join(data[hub_split].column_names)}). Set data.source.text_column."
                )
            out[split] = self.join_with.join(data[hub_split][self.text_column])
        return keep_wanted(_fill_missing_splits(out, self.val_fraction, self.test_fraction, self.path), splits)

    def fingerprint(self, splits: Collection[str] | None = None) -> dict[str, Any]:
        return {
            "source": "hub",
            "path": self.path,
            "name": self.name,
            "column": self.text_column,
            "splits": self.splits,
            "join": self.join_with,
            "val": self.val_fraction,
            "test": self.test_fraction,
            "revision": self.revision,
            "data_files": data_files_signature(self.data_files),
        }


@register("source")
class TextFiles(TextSource):
    """Local text/json/jsonl/csv/parquet files, given as paths or globs for each split."""

    def __init__(
        self,
        train_files: str | Sequence[str],
        val_files: str | Sequence[str] | None = None,
        test_files: str | Sequence[str] | None = None,
        text_column: str = "text",
        join_with: str = "\n",
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
    ) -> None:
        self.files = SplitFiles(train_files, val_files, test_files)
        self.text_column, self.join_with = text_column, join_with
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def _files(self, splits: Collection[str] | None) -> dict[str, list[Path]]:
        shares = {"validation": self.val_fraction, "test": self.test_fraction}
        return self.files.resolve(splits_to_read(splits, self.files.given, shares))

    def load(self, splits: Collection[str] | None = None) -> dict[str, str]:
        out = {
            split: self.join_with.join(read_column(files, self.text_column, files_key(split)))
            for split, files in self._files(splits).items()
        }
        if splits is None or "train" in out:
            out = _fill_missing_splits(out, self.val_fraction, self.test_fraction, "data.source.train_files")
        return keep_wanted(out, splits)

    def fingerprint(self, splits: Collection[str] | None = None) -> dict[str, Any]:
        return {
            "source": "files",
            "files": {s: file_signature(f) for s, f in self._files(splits).items()},
            "column": self.text_column,
            "join": self.join_with,
            "val": self.val_fraction,
            "test": self.test_fraction,
        }


def _fill_missing_splits(out: dict[str, str], val_fraction: float, test_fraction: float, where: str) -> dict[str, str]:
    """Cut validation/test text from the end of the training text when a source lacks them."""
    if "train" not in out:
        raise DataError(f"{where} has no training split.")
    carve_val = "validation" not in out and val_fraction > 0
    carve_test = "test" not in out and test_fraction > 0
    if carve_val or carve_test:
        parts = carve_splits(out["train"], val_fraction if carve_val else 0.0, test_fraction if carve_test else 0.0)
        out["train"] = parts["train"]
        if carve_val:
            out["validation"] = parts["validation"]
        if carve_test:
            out["test"] = parts["test"]
    return out
