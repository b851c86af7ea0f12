"""On-disk cache of tokenized data, keyed by everything that decides its content.

Every run of a sweep with the same data and tokenizer settings reuses one entry. Entries are
written to a temporary folder and renamed into place, so concurrent runs (sweep jobs, DDP
ranks) never see a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_FORMAT = 1


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_dir(root: str | Path, key: str, build: Callable[[Path], None]) -> Path:
    """The cache folder for ``key``, calling ``build(tmp_folder)`` to fill it the first time."""
    root = Path(root).expanduser()
    final = root / key
    if (final / "DONE").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        build(tmp)
        (tmp / "DONE").write_text("ok\n")
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same entry first; its copy is identical.
            if not (final / "DONE").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
