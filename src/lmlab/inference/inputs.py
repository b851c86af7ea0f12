"""The text a command reads (``lmlab-predict``, ``lmlab-translate``, ``lmlab-generate``, ``lmlab-chat``): a UTF-8
file or stdin, whole or line by line. Where a command writes is :mod:`lmlab.run.safe_output`'s."""

from __future__ import annotations

import sys
from pathlib import Path

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
    return read_text_file(input_file(source, key))


def input_file(source: str | None, key: str = "input") -> Path | None:
    """The file ``source`` names (``None`` for stdin: ``None`` or ``-``); a :class:`DataError` naming ``key`` when
    there is no such file."""
    if source in (None, "-"):
        return None
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"{key}: no file at '{path}'. Give a UTF-8 text file, or '-' for stdin.")
    return path


def read_input_lines(source: str | None) -> list[str]:
    """Every line of a UTF-8 file, or of stdin for ``None``/``-``; input without any text is an error."""
    return read_input_text(source).splitlines()
