"""Checkpoint files that are never seen half-written.

Lightning's default writer streams a checkpoint through a temporary file in ``$TMPDIR`` and moves it
into place; across filesystems the move is a copy, so a kill during it leaves a truncated
``last.ckpt`` (and the temporary file, hundreds of MB, behind). Here a checkpoint is written to a
temporary file beside its destination, flushed to disk and renamed over it (:func:`lmlab.run.safe_output.atomic_file`):
a reader sees the old file or the new one, never a part. Temporary files of a process that was killed are
removed by the next run (:func:`remove_stale_temporaries`). A disk that fills during a save ends the run with
one line that names the last complete checkpoint to resume from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lmlab.run.safe_output import TMP_SUFFIX, atomic_file, left_by_a_dead_process

log = logging.getLogger("lmlab")


def write_atomically(obj: Any, path: str | Path, advice: Callable[[Path], str] | None = None) -> None:
    """``torch.save(obj, path)`` through a flushed temporary file renamed into place; a full disk is one
    :class:`~lmlab.errors.DiskFullError` line ending with ``advice(path)`` (default: run it again)."""
    with atomic_file(path, advice=advice) as f:
        torch.save(obj, f)


def resume_advice(path: Path) -> str:
    """What to do after a full disk stopped training while ``path`` was written: resume from the newest checkpoint
    beside it (each was renamed into place whole, and ``path`` itself, if it exists, is its previous version)."""
    done = [p for p in path.parent.glob("*.ckpt") if p.is_file()]
    if not done:
        return f"no checkpoint in {path.parent} is complete: free space and run it again."
    last = max(done, key=lambda p: p.stat().st_mtime)
    return (
        f"the last complete checkpoint is {last}; free space and resume with: lmlab-train ckpt_path={last} "
        "(the run continues with its own config)."
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O (``trainer.plugins``) that writes local checkpoints atomically.

    Remote paths (``s3://`` and the like) go through Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_atomically(checkpoint, path, advice=resume_advice)


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Remove checkpoint temporaries under ``root`` left by processes of this host that no longer run."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for tmp in root.glob(f"**/checkpoints/.*{TMP_SUFFIX}"):
        if tmp.is_file() and left_by_a_dead_process(tmp):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        log.info(
            "Removed %d partial checkpoint file(s) left by killed runs: %s",
            len(removed),
            ", ".join(str(p) for p in removed),
        )
    return removed
