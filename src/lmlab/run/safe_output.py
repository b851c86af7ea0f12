"""Writing where a user says: an exported folder, an averaged checkpoint, a predictions file, a checkpoint.

What a command writes goes beside its destination first and takes its place only once complete, so a command
that stops (Ctrl-C, a kill, a failed check, a full disk) leaves the earlier output as it was and nothing that
looks finished: a file is a temporary file flushed to disk and renamed over the destination, a folder is filled
beside it and swapped in. Temporaries are hidden and named after the process that writes them, so a later run
removes those of processes that no longer run.

A command also replaces only what lmlab wrote. A folder it writes holds a marker file (:data:`MARKER`) naming the
command and the files it wrote; a folder without one, or holding other files too, is never replaced, and neither
are the working folder and the folders above it, the home and root folders, or a symbolic link (which the user
can name by its real path instead). A destination is checked before the work starts, so a mistake costs nothing.

Hand-written because the one library for atomic files (``atomicwrites``) is no longer maintained and none swaps
folders; this module imports nothing heavy, so it can check destinations before torch is imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TextIO, cast

from lmlab.errors import RUN_AGAIN, ConfigError, is_disk_full, no_space_left

#: the file in a folder lmlab wrote that names the command and the files it wrote
MARKER = ".lmlab-output"
#: a temporary being written; a folder's earlier version moved aside while the new one is swapped in
TMP_SUFFIX, ASIDE_SUFFIX = ".tmp", ".old"


# -- temporaries ---------------------------------------------------------------------------------------------
def temporary_name(path: Path, suffix: str = TMP_SUFFIX) -> Path:
    """``.<name>~<host>~<pid><suffix>`` beside ``path``: hidden, and naming the process that writes it."""
    return path.with_name(f".{path.name}~{socket.gethostname()}~{os.getpid()}{suffix}")


def left_by_a_dead_process(tmp: Path, of: Path | None = None) -> bool:
    """Whether ``tmp`` is a :func:`temporary_name` (of ``of``, when given) of a process of this host that no
    longer runs."""
    parts = tmp.name.rsplit("~", 2)
    if len(parts) != 3 or (of is not None and parts[0] != f".{of.name}"):
        return False
    pid = parts[2].split(".", 1)[0]
    return parts[1] == socket.gethostname() and pid.isdigit() and not _alive(int(pid))


def remove_stale_temporaries_of(path: Path) -> None:
    """Remove the temporaries of ``path`` (files or folders) that killed processes left beside it."""
    if not path.parent.is_dir():
        return
    for tmp in path.parent.iterdir():
        if not left_by_a_dead_process(tmp, path):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a crash right after it keeps the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- files -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_file(
    path: str | Path, mode: str = "wb", encoding: str | None = None, advice: Callable[[Path], str] | None = None
) -> Iterator[IO[Any]]:
    """A file object for ``path`` that writes a temporary file beside it, flushed to disk and renamed over
    ``path`` once the block ends: a reader sees the old file or the new one, never a part. On an error the
    temporary file is removed and ``path`` left as it was; a full disk is a :class:`DiskFullError` that ends with
    ``advice(path)`` (default: :data:`RUN_AGAIN`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries_of(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_disk_full(err):
            raise no_space_left(path, advice(path) if advice else RUN_AGAIN) from None
        raise
    fsync_dir(path.parent)


def check_file(target: str | Path, key: str, replaceable: Callable[[Path], bool] | None = None, what: str = "") -> Path:
    """The file ``target`` names, where a command may write it: not a folder or a symbolic link, and if it exists,
    one that ``replaceable`` accepts (``what`` it must be; without ``replaceable``, any file); else a
    :class:`ConfigError` saying why."""
    path = Path(target).expanduser()
    _refuse_link(path, key, target)
    if path.is_dir():
        raise ConfigError(f"{key}: '{target}' is a folder; name a file.")
    if path.exists() and replaceable is not None and not replaceable(path):
        raise ConfigError(
            f"{key}: '{target}' exists and is not {what}, so it is not replaced. Name another file, or remove it "
            "yourself."
        )
    return path


def check_output(target: str | None, key: str = "output") -> Path | None:
    """The file a command's text output goes to (:func:`check_file`: any file but a folder or a link is
    replaced, like a shell's ``>``), or ``None`` for stdout (``None`` or ``-``)."""
    return None if target in (None, "-") else check_file(target, key)


@contextlib.contextmanager
def open_output(target: str | None, key: str = "output") -> Iterator[TextIO]:
    """stdout, or the file of :func:`check_output` written whole or not at all (:func:`atomic_file`)."""
    path = check_output(target, key)
    if path is None:
        yield sys.stdout
        return
    with atomic_file(path, "w", encoding="utf-8") as out:
        yield cast(TextIO, out)


# -- folders ---------------------------------------------------------------------------------------------------
def check_folder(target: str | Path, key: str, overwrite: bool) -> Path:
    """The folder ``target`` names, where a command may write one: a new or empty folder, or, with ``overwrite``,
    an earlier output of lmlab that holds nothing else; else a :class:`ConfigError` saying why."""
    path = Path(target).expanduser()
    _refuse_link(path, key, target)
    why = _never_replaced(path.resolve())
    if why:
        raise ConfigError(f"{key}: '{target}' is {why}, which lmlab never replaces. Name a new folder instead.")
    if not path.exists():
        return path
    if not path.is_dir():
        raise ConfigError(f"{key}: '{target}' is a file; name a folder.")
    entries = sorted(entry.name for entry in path.iterdir())
    if not entries:
        return path
    record = _marker(path)
    if record is None:
        raise ConfigError(
            f"{key}: '{target}' holds files lmlab did not write ({_some(entries)}), so it is never replaced. Name "
            "another folder, or empty it yourself."
        )
    extra = sorted(set(entries) - {MARKER, *record["files"]})
    if extra:
        raise ConfigError(
            f"{key}: '{target}' is an earlier output of {record['written_by']} but also holds files it did not "
            f"write ({_some(extra)}), so it is not replaced. Move them out, or name another folder."
        )
    if not overwrite:
        raise ConfigError(
            f"{key}: '{target}' holds an earlier output of {record['written_by']}. Set overwrite=true to replace it, "
            "or name another folder."
        )
    return path


@contextlib.contextmanager
def replacing_folder(target: str | Path, key: str, overwrite: bool, written_by: str, **about: Any) -> Iterator[Path]:
    """A new folder to fill beside the one ``target`` names (:func:`check_folder`). Once the block ends it gets
    the marker (``written_by``, ``about`` and its files) and takes ``target``'s place: an earlier output there is
    moved aside, the new one renamed in, and the earlier one removed last. On an error the new folder is removed
    and ``target`` left as it was; a full disk is a :class:`DiskFullError`."""
    out = check_folder(target, key, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries_of(out)
    staging = temporary_name(out)
    staging.mkdir()
    try:
        yield staging
        files = sorted(entry.name for entry in staging.iterdir())
        record = {"written_by": written_by, **about, "files": files}
        (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(err):
            raise no_space_left(out) from None
        raise
    _swap_in(staging, out)


def _swap_in(staging: Path, out: Path) -> None:
    aside = temporary_name(out, ASIDE_SUFFIX) if out.exists() else None
    if aside is not None:
        os.rename(out, aside)
    try:
        os.rename(staging, out)
    except BaseException:
        if aside is not None:
            os.rename(aside, out)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(out.parent)


def _marker(folder: Path) -> dict[str, Any] | None:
    """The record of the command that wrote ``folder``; ``None`` where it has none (or not one lmlab wrote)."""
    marker = folder / MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    valid = isinstance(record, dict) and isinstance(record.get("written_by"), str)
    return record if valid and isinstance(record.get("files"), list) else None


def _never_replaced(path: Path) -> str | None:
    """Why the folder at the resolved ``path`` is never replaced, or ``None``."""
    if path == Path(path.anchor):
        return "the root folder"
    with contextlib.suppress(RuntimeError):  # no home folder known
        if path == Path.home().resolve():
            return "the home folder"
    cwd = Path.cwd().resolve()
    if path == cwd:
        return "the working folder"
    if path in cwd.parents:
        return "a folder that holds the working folder"
    return None


def _refuse_link(path: Path, key: str, target: str | Path) -> None:
    if path.is_symlink():
        raise ConfigError(
            f"{key}: '{target}' is a symbolic link to '{os.readlink(path)}', which lmlab does not replace. Name the "
            f"real path instead: {key}={path.resolve()}"
        )


def _some(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
