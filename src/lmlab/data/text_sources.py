"""Where language-modeling text comes from: a stream of text per split, read again each time it is iterated.

Each source gives ``{"train": SplitText, "validation": SplitText, "test": SplitText}`` (or only the splits asked
for) and a ``fingerprint()`` of what it reads, which goes into the data cache key. A split's text is its
documents (files, or rows of a table) joined by ``join_with``, read a piece at a time, so a corpus never has to
fit in memory; with ``end_of_document`` each document is followed by the tokenizer's end-of-text token instead.
When a source has only training text, validation and test text are cut from its end by character fractions
(the nanoGPT convention: first 90% train), after a pass that counts its characters.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from lmlab.data.files import (
    SplitFiles,
    column_pieces,
    data_files_signature,
    file_signature,
    files_key,
    load_hub_dataset,
)
from lmlab.data.splits import SPLITS, hub_split_absent, keep_wanted, not_drawn, share_key, splits_to_read
from lmlab.errors import DataError
from lmlab.registry import register

#: the item of a split's stream that marks the end of a document (``end_of_document``)
DOC_END = None
Documents = Callable[[], Iterable[Iterable[str]]]
#: how a text source draws a split it lacks (:func:`~lmlab.data.splits.not_drawn`)
CUT_FROM_TRAIN = "cut from the end of the training text"


class SplitText:
    """One split's text as a stream: :meth:`items` reads its pieces (and document ends) from the source again on
    every call; ``span`` keeps only the characters ``[start, end)`` of the joined text (a carved split)."""

    def __init__(
        self,
        documents: Documents,
        join_with: str = "",
        end_of_document: bool = False,
        span: tuple[int, int] | None = None,
    ) -> None:
        self.documents, self.join_with, self.end_of_document, self.span = documents, join_with, end_of_document, span

    def items(self) -> Iterator[str | None]:
        """Pieces of text in order, with :data:`DOC_END` after each document when ``end_of_document`` is set."""
        joined = self._joined()
        return joined if self.span is None else _within(joined, *self.span)

    def __iter__(self) -> Iterator[str]:
        """The pieces of text alone (what a tokenizer learns from)."""
        return (item for item in self.items() if item is not DOC_END)

    def text(self) -> str:
        """The whole text at once, for text that fits in memory."""
        return "".join(self)

    def count_chars(self) -> int:
        return sum(len(piece) for piece in self)

    def carved(self, start: int, end: int) -> SplitText:
        return SplitText(self.documents, self.join_with, self.end_of_document, (start, end))

    def _joined(self) -> Iterator[str | None]:
        for index, document in enumerate(self.documents()):
            if index and self.join_with and not self.end_of_document:
                yield self.join_with
            yield from (piece for piece in document if piece)
            if self.end_of_document:
                yield DOC_END


def _within(items: Iterable[str | None], start: int, end: int) -> Iterator[str | None]:
    """The characters ``[start, end)`` of a stream; a document end belongs to the span its last character is in."""
    position = 0
    for item in items:
        if item is DOC_END:
            if start < position <= end or position == start == 0:
                yield item
            continue
        if position >= end:
            return
        after = position + len(item)
        if after > start:
            yield item[max(start - position, 0) : end - position]
        position = after


def carve_splits(text: str, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Contiguous split of one text: train first, then validation, then test; a split of share 0 is none."""
    train_end, val_end = _carve_points(len(text), val_fraction, test_fraction)
    carved = {"train": text[:train_end], "validation": text[train_end:val_end], "test": text[val_end:]}
    shares = {"validation": val_fraction, "test": test_fraction}
    return {name: part for name, part in carved.items() if shares.get(name, 1) > 0}


def _carve_points(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Where training text ends and where validation text ends, of ``n`` characters."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum below 1."
        )
    return int(n * (1 - val_fraction - test_fraction)), int(n * (1 - test_fraction))


class TextSource:
    """Base class: subclasses implement :meth:`streams` (text of any size) or :meth:`load` (text that fits in
    memory), and :meth:`fingerprint`, each of the ``splits`` asked for (``None``: every split)."""

    def streams(self, splits: Collection[str] | None = None) -> dict[str, SplitText]:
        texts = self.load() if splits is None else self.load(splits)
        return {name: SplitText(lambda text=text: [[text]]) for name, text in texts.items()}

    def load(self, splits: Collection[str] | None = None) -> dict[str, str]:
        return {name: split.text() for name, split in self.streams(splits).items()}

    def fingerprint(self, splits: Collection[str] | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def absent_reason(self, split: str) -> str:
        """Why this source gives no ``split`` (asked of a split it did not give), and the fix."""
        return f"the data source ({type(self).__name__}) gives no {split} split"


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

    def absent_reason(self, split: str) -> str:
        key = share_key(split)
        return f"{key} is 0 (set it above 0 to have a {split} split {CUT_FROM_TRAIN})"


@register("source")
class HubText(TextSource):
    """A Hugging Face hub data set with a text column (``datasets.load_dataset(path, name)``), or local
    copies of it through a builder (``path=parquet``, ``data_files=...``). With ``streaming`` the rows are
    read as they download (``datasets``' streaming mode), for data sets larger than the disk cache."""

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
        streaming: bool = False,
        end_of_document: bool = False,
    ) -> None:
        self.path, self.name, self.text_column, self.join_with = path, name, text_column, join_with
        self.data_files, self.streaming, self.end_of_document = data_files, streaming, end_of_document
        self.splits = dict(splits or {s: s for s in SPLITS})
        self.val_fraction, self.test_fraction, self.revision = val_fraction, test_fraction, revision

    def streams(self, splits: Collection[str] | None = None) -> dict[str, SplitText]:
        data = load_hub_dataset(
            self.path,
            self.name,
            self.revision,
            data_files=self.data_files,
            offline_hint="Use data=text_files with data.source.train_files=<local files>.",
            streaming=self.streaming,
        )
        out = {
            split: SplitText(self._rows(data[hub_split], hub_split), self.join_with, self.end_of_document)
            for split, hub_split in self.splits.items()
            if hub_split in data
        }
        return keep_wanted(_fill_missing_splits(out, self.val_fraction, self.test_fraction, self.path), splits)

    def _rows(self, table: Any, hub_split: str) -> Documents:
        """The split's rows, each a document of one piece, a batch of rows at a time."""
        where = f"{self.path}[{hub_split}]"

        def documents() -> Iterator[list[str]]:
            for batch in table.iter(batch_size=1000):
                if self.text_column not in batch:
                    raise DataError(
                        f"Column '{self.text_column}' is not in {where} (columns: {', '.join(batch)}). "
                        "Set data.source.text_column."
                    )
                yield from ([text or ""] for text in batch[self.text_column])

        return documents

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
            **({"end_of_document": True} if self.end_of_document else {}),
        }

    def absent_reason(self, split: str) -> str:
        return hub_split_absent(self.path, self.data_files, self.splits, split, CUT_FROM_TRAIN)


@register("source")
class TextFiles(TextSource):
    """Local text/json/jsonl/csv/parquet files, given as paths or globs for each split, read a block at a time."""

    def __init__(
        self,
        train_files: str | Sequence[str],
        val_files: str | Sequence[str] | None = None,
        test_files: str | Sequence[str] | None = None,
        text_column: str = "text",
        join_with: str = "\n",
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        end_of_document: bool = False,
    ) -> None:
        self.files = SplitFiles(train_files, val_files, test_files)
        self.text_column, self.join_with, self.end_of_document = text_column, join_with, end_of_document
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def _files(self, splits: Collection[str] | None) -> dict[str, list[Path]]:
        shares = {"validation": self.val_fraction, "test": self.test_fraction}
        return self.files.resolve(splits_to_read(splits, self.files.given, shares))

    def streams(self, splits: Collection[str] | None = None) -> dict[str, SplitText]:
        out = {
            split: SplitText(
                partial(column_pieces, files, self.text_column, files_key(split)),
                self.join_with,
                self.end_of_document,
            )
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
            **({"end_of_document": True} if self.end_of_document else {}),
        }

    def absent_reason(self, split: str) -> str:
        key = files_key(split)
        return not_drawn(split, f"no {key} are given", f"give {key}", CUT_FROM_TRAIN)


def _fill_missing_splits(
    out: dict[str, SplitText], val_fraction: float, test_fraction: float, where: str
) -> dict[str, SplitText]:
    """Cut validation/test text from the end of the training text when a source lacks them."""
    if "train" not in out:
        raise DataError(f"{where} has no training split.")
    carve_val = "validation" not in out and val_fraction > 0
    carve_test = "test" not in out and test_fraction > 0
    if carve_val or carve_test:
        train = out["train"]
        n = train.count_chars()
        train_end, val_end = _carve_points(n, val_fraction if carve_val else 0.0, test_fraction if carve_test else 0.0)
        out["train"] = train.carved(0, train_end)
        if carve_val:
            out["validation"] = train.carved(train_end, val_end)
        if carve_test:
            out["test"] = train.carved(val_end, n)
    return out
