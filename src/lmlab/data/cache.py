"""On-disk cache of tokenized data, keyed by everything that decides its content.

Every run of a sweep with the same data and tokenizer settings reuses one entry ``root/<key>``. Concurrent
runs (sweep jobs, DDP ranks) and killed runs are safe:

- **One builder.** A missing entry is built by one process, which holds the lock file ``root/.<key>.lock``.
  The others wait on it, saying so once in the log, then reuse the finished entry. The lock is the kernel's
  (``flock``), so it is released when its holder dies, even by SIGKILL, and a waiter then builds the entry.
  The lock file is removed once the entry is finished.
- **No half-written entry.** An entry is built in a temporary folder ``root/.<key>-<random>``, marked with a
  ``DONE`` file and renamed into place, so a reader sees a whole entry or none. A build that raises leaves
  nothing behind.
- **Resumable builds.** A build that can continue where it stopped (a large corpus, written shard by shard)
  uses the folder ``root/.<key>.partial`` instead, which outlives a killed or interrupted build: the next build
  of the key (the waiter, or a later run) continues in it. A build that fails on its input (a bad file, a
  tokenizer that does not fit) removes it, since it would fail again the same way.
- **Crash leftovers cleaned.** The temporary folders of killed builds are removed by the next build in the
  same root, each under its key's lock, so a live build's folder is never touched.
- **Umask respected.** Entry folders and lock files get the permissions the process's umask allows (e.g. 0775
  and 0664 with umask 002), so a cache shared by a group works.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from lmlab.errors import ConfigError, DataError, TokenizerError

log = logging.getLogger("lmlab")

CACHE_FORMAT = 2


def cache_key(parts: dict[str, Any]) -> str:
    """A short hash of ``parts`` and :data:`CACHE_FORMAT`: a change to either gives a new entry."""
    blob = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_dir(root: str | Path, key: str, build: Callable[[Path], None], resumable: bool = False) -> Path:
    """The cache folder for ``key``, calling ``build(tmp_folder)`` to fill it the first time.

    Of the processes that need a missing entry, one builds it and the others wait for it and reuse it. With
    ``resumable``, ``build`` is given the folder a stopped build of the key left, if any, to continue in.
    """
    root = Path(root).expanduser()
    final = root / key
    if (final / "DONE").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    lock = _lock(root, key)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("Another process is building cache entry %s in %s; waiting for it to finish", key, root)
        lock.acquire()
    try:
        # The process we waited for has finished the entry, unless it failed or was killed.
        if not (final / "DONE").is_file():
            _remove_dead_builds(root, key)
            started = time.perf_counter()
            (_resume if resumable else _build)(root, key, build)
            log.info("Built cache entry %s in %.1f s", final, time.perf_counter() - started)
        # A finished entry needs no lock again, so the root keeps only entries. Removing it is safe: whoever still
        # holds or waits on this file, or locks a new one at its path, finds DONE and builds nothing.
        Path(lock.lock_file).unlink(missing_ok=True)
    finally:
        lock.release()
    return final


def _build(root: Path, key: str, build: Callable[[Path], None]) -> None:
    """Build the entry in a temporary folder and rename it into place, so that no reader sees it half-written."""
    final, tmp = root / key, root / f".{key}-{secrets.token_hex(8)}"
    # Unlike tempfile.mkdtemp (always 0700), mkdir applies the umask, and keeps a setgid bit inherited from root.
    tmp.mkdir(mode=0o777)
    try:
        build(tmp)
        (tmp / "DONE").write_text("ok\n")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _resume(root: str | Path, key: str, build: Callable[[Path], None]) -> None:
    """Build the entry in ``.<key>.partial``, continuing what a stopped build left there, and rename it into place."""
    final, partial = Path(root) / key, Path(root) / f".{key}.partial"
    if partial.is_dir():
        log.info("Continuing the cache entry %s that a stopped build left in %s", key, partial)
    partial.mkdir(mode=0o777, exist_ok=True)
    try:
        build(partial)
    except (DataError, TokenizerError, ConfigError):
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except BaseException:
        log.warning("The unfinished cache entry is kept in %s; the next run continues it", partial)
        raise
    (partial / "DONE").write_text("ok\n")
    os.replace(partial, final)


def _remove_dead_builds(root: Path, key: str) -> None:
    """Remove the temporary folders of killed builds, which nothing else would ever remove.

    Called holding ``key``'s lock, so the folders of ``key`` are dead. Another key's are removed only if its lock
    is free (no live build of that key); the lock file next to them also shows that they are this cache's.
    """
    for entry in list(os.scandir(root)):
        # Temporary folders are ".<key>-<suffix>" with no "-" in the suffix, so the key is unambiguous.
        owner, dash, _ = entry.name[1:].rpartition("-")
        if not (entry.name.startswith(".") and dash and entry.is_dir(follow_symlinks=False)):
            continue
        if owner == key:
            _remove_leftover(entry.path)
        elif (root / f".{owner}.lock").is_file():
            lock = _lock(root, owner)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # that key is being built right now
            try:
                _remove_leftover(entry.path)
            finally:
                lock.release()


def _remove_leftover(path: str) -> None:
    """Remove a dead build's folder, saying so in the log (it may be large)."""
    log.info("Removing %s, left by a cache build that was killed", path)
    shutil.rmtree(path, ignore_errors=True)


def _lock(root: Path, key: str) -> FileLock:
    """The lock that one process holds while building ``key``.

    Its mode is given explicitly because filelock 3 otherwise makes every lock file 0644, which another user of
    a group-shared cache cannot lock.
    """
    return FileLock(root / f".{key}.lock", mode=0o666 & ~_umask())


def _umask() -> int:
    """The process's umask.

    os.umask can only read it by setting it, which briefly changes it for every thread, so Linux's
    /proc/self/status is read instead where it has the value.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    # Meanwhile another thread could create a file; 0o077 makes it private rather than world-writable.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask
