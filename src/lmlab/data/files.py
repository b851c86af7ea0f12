"""Reading user data files with errors that name the file and the fix.

Shared by all tasks: plain text is read strictly as UTF-8; tables (json, jsonl, csv, parquet) are
read with Hugging Face ``datasets`` after the same checks.
"""

from __future__ import annotations

import glob
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmlab.errors import DataError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".raw", ".tokens"}
TABLE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def resolve_files(patterns: str | Sequence[str] | None, key: str) -> list[Path]:
    """Expand paths and globs; every pattern must match at least one file."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[Path] = []
    for pattern in patterns:
        expanded = str(Path(pattern).expanduser())
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise DataError(
                f"{key}: no file matches '{pattern}'. Check the path (relative paths are resolved "
                f"from the directory you launched from: {Path.cwd()})."
            )
        files.extend(Path(m).resolve() for m in matches)
    return files


def files_key(split: str) -> str:
    """The config key that names a split's files."""
    return f"data.source.{'val' if split == 'validation' else split}_files"


class SplitFiles:
    """Paths or globs for each split, resolved when a split is read: a split that is not read (the training
    files, when a checkpoint is scored on a test file) need not exist."""

    def __init__(self, train: Any, validation: Any, test: Any) -> None:
        if not train:
            raise DataError("data.source.train_files is empty: give at least one training file or glob.")
        self.patterns = {"train": train, "validation": validation, "test": test}

    @property
    def given(self) -> list[str]:
        return [split for split, patterns in self.patterns.items() if patterns]

    def resolve(self, read: Collection[str]) -> dict[str, list[Path]]:
        """The files of each given split in ``read``; a pattern that matches nothing is an error naming its key."""
        return {split: resolve_files(self.patterns[split], files_key(split)) for split in self.given if split in read}


def file_signature(files: Sequence[Path]) -> list[list[Any]]:
    """Path, size and modification time of each file: part of every cache key."""
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def data_files_signature(data_files: Any) -> Any:
    """:func:`file_signature` of the local files handed to a hub builder (``data.source.data_files``), per
    split, so editing them invalidates the cache; remote addresses (``hf://...``) are kept as given."""
    if data_files is None:
        return None
    if isinstance(data_files, Mapping):
        return {split: data_files_signature(files) for split, files in data_files.items()}
    patterns = [data_files] if isinstance(data_files, str) else list(data_files)
    if any("://" in str(pattern) for pattern in patterns):
        return patterns
    return file_signature(resolve_files(patterns, "data.source.data_files"))


#: bytes read from a file at a time
READ_BYTES = 1 << 22


def read_text_file(path: Path) -> str:
    """The whole file as text; an empty or non-UTF-8 file is an error."""
    return "".join(text_pieces(path))


def text_pieces(path: Path) -> Iterator[str]:
    """The text of a UTF-8 file, :data:`READ_BYTES` at a time (a character is never cut); a byte that is not UTF-8
    is an error that names the file and its offset, and so is a file with no text."""
    has_text = False
    with path.open("rb") as file:
        offset, carry = 0, b""  # offset: of carry's first byte in the file
        while True:
            block = file.read(READ_BYTES)
            data = carry + block
            if not data:
                break
            try:
                text, carry = data.decode("utf-8"), b""
            except UnicodeDecodeError as err:
                if not block or err.reason != "unexpected end of data" or err.start < len(data) - 3:
                    raise DataError(
                        f"'{path}' is not valid UTF-8 (byte {data[err.start]:#04x} at offset {offset + err.start}). "
                        "Convert it, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`."
                    ) from None
                text, carry = data[: err.start].decode("utf-8"), data[err.start :]  # a character cut by the block
            offset += len(data) - len(carry)
            has_text = has_text or not text.isspace() and bool(text)
            if text:
                yield text
    if not has_text:
        raise DataError(f"'{path}' is empty. Remove it from the file list or give it some text.")


def column_pieces(files: Sequence[Path], column: str, key: str) -> Iterator[Iterator[str]]:
    """The documents of local files, each as pieces of text: a plain-text file is one document; a
    json/jsonl/csv/parquet file gives one document per row of its ``column``, read a batch of rows at a time."""
    for path in files:
        if path.suffix.lower() in TABLE_BUILDERS:
            yield from ([text] for text in table_column(path, column, key))
        else:
            yield text_pieces(path)


def table_column(path: Path, column: str, key: str) -> Iterator[str]:
    """The values of one text column of a json/jsonl/csv/parquet file, streamed a batch of rows at a time."""
    import datasets

    builder = _table_builder(path, key)
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True)
        rows = iter(table)
        first = next(rows, None)
    except Exception as err:  # the builders raise many kinds of parse errors
        raise DataError(f"Could not parse '{path}' as {builder}: {err}") from None
    if first is None:
        raise DataError(f"'{path}' has no rows.")
    if column not in first:
        raise DataError(
            f"Column '{column}' is not in '{path}' (columns: {', '.join(first)}). "
            f"Set the column name in the data config (see {key})."
        )
    yield _text_value(first[column], path, column)
    try:
        for row in rows:
            yield _text_value(row[column], path, column)
    except KeyError:
        raise DataError(f"Some rows of '{path}' have no column '{column}'. Fix the file or set {key}.") from None


def _text_value(value: Any, path: Path, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"Column '{column}' of '{path}' holds {type(value).__name__} values, not text.")
    return value


def _table_builder(path: Path, key: str) -> str:
    """The ``datasets`` builder of a table file, after the checks that give a clear message."""
    builder = TABLE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{key}: cannot read '{path}': use one of {', '.join(sorted(TABLE_BUILDERS))} or .txt.")
    if path.stat().st_size == 0:
        raise DataError(f"'{path}' is empty. Remove it from {key} or give it some rows.")
    if builder != "parquet":
        for _ in text_pieces(path):  # strict UTF-8 and emptiness checks with a clear message, a block at a time
            pass
    return builder


def load_table(path: Path, columns: Sequence[str], key: str) -> Any:
    """One json/jsonl/csv/parquet file as a ``datasets.Dataset`` (with its features, e.g. class names)
    that has every one of ``columns`` and at least one row."""
    import datasets

    builder = _table_builder(path, key)
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(builder, data_files=[str(path)], split="train")
    except Exception as err:  # the builders raise many kinds of parse errors
        raise DataError(f"Could not parse '{path}' as {builder}: {err}") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(
            f"Column '{missing[0]}' is not in '{path}' (columns: {', '.join(table.column_names)}). "
            f"Set the column name in the data config (see {key})."
        )
    if len(table) == 0:
        raise DataError(f"'{path}' has no rows.")
    return table


def _plain_data_files(data_files: Any) -> Any:
    """``datasets`` tells a mapping of splits from a list of files by ``isinstance(dict)``, which a config
    node fails."""
    if isinstance(data_files, Mapping):
        return {str(split): _plain_data_files(files) for split, files in data_files.items()}
    if data_files is None or isinstance(data_files, str):
        return data_files
    return [str(f) for f in data_files]


def load_hub_dataset(
    path: str,
    name: str | None,
    revision: str | None,
    offline_hint: str,
    data_files: Any = None,
    streaming: bool = False,
) -> Any:
    """``datasets.load_dataset(path, name)``: every split of a hub data set (or of local files through a
    builder such as ``parquet``), streamed as it is read with ``streaming``; a failure names the data set and
    what to use offline."""
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(
            path, name, data_files=_plain_data_files(data_files), revision=revision, streaming=streaming
        )
    except Exception as err:  # the hub client and builders raise many kinds of errors
        raise DataError(
            f"Could not load '{path}' from the Hugging Face hub ({type(err).__name__}: {err}). Offline? {offline_hint}"
        ) from None
