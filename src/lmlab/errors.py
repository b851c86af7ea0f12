"""Errors that tell the user what went wrong and how to fix it.

Every error raised for bad input derives from :class:`LmlabError`, so entry points can print the
message without a traceback and exit with a non-zero status. A full disk is told apart here too
(:func:`is_disk_full`, :func:`no_space_left`), so every writer, from the data cache to an export, says it in
the same line.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

#: the errors of a full disk and of an exhausted quota
_FULL = (errno.ENOSPC, errno.EDQUOT)
#: what to do after a full disk when nothing was written
RUN_AGAIN = "nothing was written: free space and run it again."


class LmlabError(Exception):
    """Base class for user-facing errors."""


class ConfigError(LmlabError):
    """The composed config has an unknown key, a bad value or a missing required value."""


class DataError(LmlabError):
    """A data file, split or column is missing, empty, or not decodable."""


class DiskFullError(LmlabError):
    """The disk (or a quota) filled while lmlab wrote a file (the data cache, a checkpoint, an export); what was
    finished is kept for the next run and nothing partial is left."""


class TokenizerError(LmlabError):
    """Text cannot be encoded by the tokenizer, or a tokenizer does not match a checkpoint."""


class ChatTemplateError(LmlabError):
    """A tokenizer's chat template is unsafe (Jinja's sandbox refuses it, or it runs past its render limits) or
    broken (it does not compile, or fails while rendering). ``problem`` says which; the message adds the fix."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem} {fix}")
        self.problem = problem


class CheckpointError(LmlabError):
    """A checkpoint file cannot be read: truncated, empty, or not a checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asks to build something outside lmlab's allow-list, or holds pickled objects."""


class CheckpointMismatchError(LmlabError):
    """A checkpoint does not match the model or tokenizer the config asks for."""


class ExportError(LmlabError):
    """A checkpoint has no equivalent in the export format, or its export does not reproduce it."""


class NonFiniteLossError(LmlabError):
    """Training produced a NaN or infinite loss."""


class RunInterrupted(LmlabError):
    """Training was stopped by a signal; what was saved and how to resume is in the message."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a full disk or an exhausted quota: itself, or an error it was raised from or while
    handling (torch's writer reports a full disk as a RuntimeError raised while handling the OSError; writers in
    Rust, such as safetensors' and tokenizers', only in their message)."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if (isinstance(cause, OSError) and cause.errno in _FULL) or any(f"(os error {n})" in str(cause) for n in _FULL):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def no_space_left(path: Path, advice: str = RUN_AGAIN) -> DiskFullError:
    """The one line that says a full disk stopped the writing of ``path``, where, and ``advice``."""
    where = Path(os.path.abspath(path))
    return DiskFullError(f"no space left on {mount_point(where)} while writing {where}; {advice}")


def mount_point(path: Path) -> Path:
    """The mount point of the file system the absolute ``path`` is (or would be) on: what a user frees space on."""
    return next(p for p in (path, *path.parents) if p.exists() and os.path.ismount(p))
