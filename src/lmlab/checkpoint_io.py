"""Checkpoint files that are never seen half-written.

Lightning's default writer streams a checkpoint through a temporary file in ``$TMPDIR`` and moves it
into place; across filesystems the move is a copy, so a kill during it leaves a truncated
``last.ckpt`` (and the temporary file, hundreds of MB, behind). Here a checkpoint is written to a
temporary file beside its destination, flushed to disk and renamed over it: a reader sees the old
file or the new one, never a part. Temporary files of a process that was killed are removed by the
next run (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger("lmlab")
TMP_SUFFIX = ".tmp"


def temporary_name(path: Path) -> Path:
    """``.<name>~<host>~<pid>.tmp`` beside ``path``: hidden, and naming the process that writes it."""
    return path.with_name(f".{path.name}~{socket.gethostname()}~{os.getpid()}{TMP_SUFFIX}")


def write_atomically(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a flushed temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with tmp.open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a crash right after it keeps the new file)."""
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O (``trainer.plugins``) that writes local checkpoints atomically.

    Remote paths (``s3://`` and the like) go through Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_atomically(checkpoint, path)


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Remove checkpoint temporaries under ``root`` left by processes of this host that no longer run."""
    root = Path(root)
    if not root.is_dir():
        return []
    host = socket.gethostname()
    removed = []
    for tmp in root.glob(f"**/checkpoints/.*{TMP_SUFFIX}"):
        parts = tmp.name[: -len(TMP_SUFFIX)].rsplit("~", 2)
        if len(parts) != 3 or parts[1] != host or not parts[2].isdigit() or _alive(int(parts[2])):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    if removed:
        log.info(
            "Removed %d partial checkpoint file(s) left by killed runs: %s",
            len(removed),
            ", ".join(str(p) for p in removed),
        )
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
