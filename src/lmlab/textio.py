"""Line-oriented input and output for the command-line tools (``lmlab-predict``, ``lmlab-translate``):
a UTF-8 file or stdin in, a file or stdout out."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from lmlab.data.files import read_text_file
from lmlab.errors import DataError


def read_input_text(source: str | None, key: str = "input") -> str:
    """The whole text of a UTF-8 file, or of stdin for ``None``/``-``; input without any text is an error."""
    if source in (None, "-"):
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError as err:
            raise DataError(f"stdin is not valid UTF-8 ({err.reason} at byte {err.start}).") from None
        if not text.strip():
            raise DataError(f"{key}: stdin has no text.")
        return text
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"{key}: no file at '{path}'. Give a UTF-8 text file, or '-' for stdin.")
    return read_text_file(path)


def read_input_lines(source: str | None) -> list[str]:
    """Every line of a UTF-8 file, or of stdin for ``None``/``-``; input without any text is an error."""
    return read_input_text(source).splitlines()


@contextmanager
def open_output(target: str | None) -> Iterator[TextIO]:
    """stdout for ``None``/``-``, else the file (its folder made if needed)."""
    if target in (None, "-"):
        yield sys.stdout
        return
    path = Path(target).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        yield out
