"""The token cache under concurrency and crashes: one builder while the others wait, killed builds taken over
and their leftovers removed, the umask respected, failed builds leaving nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest
from filelock import FileLock, Timeout

from lmlab.data.cache import cached_dir

KEY = "0123456789abcdef0123"
WAITING = "Another process is building cache entry"

# A process that calls cached_dir once and prints the folder and its data. Arguments: cache root, key, the file
# that each build appends a line to, a file to wait for before starting ("" for none), and "hang" for a build that
# never finishes.
WORKER = """
import logging, os, sys, time
from pathlib import Path
from lmlab.data.cache import cached_dir

root, key, counter, go, mode = sys.argv[1:]
logging.basicConfig(level=logging.INFO, format="%(message)s")
if go:
    Path(go + ".ready." + str(os.getpid())).touch()
    while not os.path.exists(go):
        time.sleep(0.005)

def build(folder):
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\\n")
    if mode == "hang":
        (folder / "started").touch()
        time.sleep(60)
    time.sleep(0.5)
    (folder / "sub").mkdir()
    (folder / "sub" / "data.txt").write_text(f"built by {os.getpid()}\\n")

path = cached_dir(root, key, build)
print(path)
print((path / "sub" / "data.txt").read_text(), end="")
"""


def _worker(tmp_path: Path, *, go: Path | None = None, mode: str = "", stderr: Any = subprocess.PIPE) -> Popen[str]:
    args = [str(tmp_path / "cache"), KEY, str(tmp_path / "builds.txt"), str(go or ""), mode]
    return Popen([sys.executable, "-c", WORKER, *args], stdout=subprocess.PIPE, stderr=stderr, text=True)


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _builds(tmp_path: Path) -> int:
    counter = tmp_path / "builds.txt"
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def _leftovers(root: Path, key: str = KEY) -> list[Path]:
    return sorted(root.glob(f".{key}-*"))


def _write(text: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        (folder / "data.txt").write_text(text)

    return build


def test_concurrent_processes_build_once_and_share_the_entry(tmp_path: Path) -> None:
    n, go = 6, tmp_path / "go"
    workers = [_worker(tmp_path, go=go) for _ in range(n)]
    # Released together once all have started, so that they all miss the entry while it is being built.
    _wait_for(lambda: len(list(tmp_path.glob("go.ready.*"))) == n, "the workers to start")
    go.touch()
    results = [(*w.communicate(timeout=30), w.returncode) for w in workers]

    assert [rc for _, _, rc in results] == [0] * n, [err for _, err, _ in results]
    assert _builds(tmp_path) == 1
    outputs = {out for out, _, _ in results}
    assert len(outputs) == 1, outputs
    assert outputs.pop().splitlines()[0] == str(tmp_path / "cache" / KEY)
    # Each waiter says once why it waits; the builder does not.
    assert sorted(err.count(WAITING) for _, err, _ in results) == [0] + [1] * (n - 1)
    # No temporary folder and no lock file is left, only the entry.
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [KEY]


def test_killed_builder_is_taken_over_by_a_waiter(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    builder = _worker(tmp_path, mode="hang")
    _wait_for(lambda: any((p / "started").exists() for p in _leftovers(root)), "the build to start")
    waiter_log = tmp_path / "waiter.log"
    with waiter_log.open("w") as stderr:
        waiter = _worker(tmp_path, stderr=stderr)
    _wait_for(lambda: WAITING in waiter_log.read_text(), "the waiter to wait")
    time.sleep(0.2)
    assert waiter.poll() is None  # still blocked behind the live builder

    builder.send_signal(signal.SIGKILL)
    builder.communicate(timeout=10)
    out, _ = waiter.communicate(timeout=30)

    assert waiter.returncode == 0, waiter_log.read_text()
    assert _builds(tmp_path) == 2
    assert out.splitlines() == [str(root / KEY), f"built by {waiter.pid}"]
    assert (root / KEY / "DONE").is_file()
    assert not (root / KEY / "started").exists()
    assert [p.name for p in root.iterdir()] == [KEY]


def test_killed_build_leaves_a_folder_that_the_next_build_removes(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    builder = _worker(tmp_path, mode="hang")
    _wait_for(lambda: any((p / "started").exists() for p in _leftovers(root)), "the build to start")
    builder.kill()  # SIGKILL
    builder.communicate(timeout=10)
    assert len(_leftovers(root)) == 1
    assert not (root / KEY).exists()

    final = cached_dir(root, KEY, _write("ok"))

    assert (final / "data.txt").read_text() == "ok"
    assert sorted(p.name for p in final.iterdir()) == ["DONE", "data.txt"]
    assert [p.name for p in root.iterdir()] == [KEY]


def test_other_keys_leftovers_are_removed_only_when_their_lock_is_free(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    dead, live, foreign = root / ".dead-a1b2c3d4", root / ".live-a1b2c3d4", root / ".config-a1b2c3d4"
    for folder in (dead, live, foreign):
        folder.mkdir()
    (root / ".dead.lock").touch()
    # A lock file taken through another descriptor conflicts even within this process.
    with FileLock(root / ".live.lock"):
        cached_dir(root, KEY, _write("ok"))

    assert not dead.exists()
    assert live.is_dir()  # a live build of that key owns it
    assert foreign.is_dir()  # no lock file: not this cache's


def test_a_prefix_key_does_not_remove_a_longer_keys_build(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    longer = root / f".{KEY}-x-a1b2c3d4"  # a live build of key "<KEY>-x"
    longer.mkdir()
    with FileLock(root / f".{KEY}-x.lock"):
        cached_dir(root, KEY, _write("ok"))
    assert longer.is_dir()


@pytest.mark.parametrize(("umask", "folder_mode", "file_mode"), [(0o002, 0o775, 0o664), (0o022, 0o755, 0o644)])
def test_entry_and_lock_follow_the_umask(tmp_path: Path, umask: int, folder_mode: int, file_mode: int) -> None:
    lock_modes = []

    def build(folder: Path) -> None:
        lock_modes.append((tmp_path / "cache" / f".{KEY}.lock").stat().st_mode & 0o777)  # removed once done
        (folder / "data.txt").write_text("ok")

    old = os.umask(umask)
    try:
        final = cached_dir(tmp_path / "cache", KEY, build)
    finally:
        os.umask(old)
    assert final.stat().st_mode & 0o777 == folder_mode
    assert (final / "data.txt").stat().st_mode & 0o777 == file_mode
    assert lock_modes == [file_mode]


def test_failed_build_leaves_nothing_and_releases_the_lock(tmp_path: Path) -> None:
    root = tmp_path / "cache"

    def failing(folder: Path) -> None:
        (folder / "partial.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom") as raised:
        cached_dir(root, KEY, failing)
    # The traceback keeps cached_dir's lock object alive, so an unreleased lock would still be held here.
    assert raised.traceback
    lock = FileLock(root / f".{KEY}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pytest.fail("the failed build kept the lock")
    lock.release()
    assert _leftovers(root) == []
    assert not (root / KEY).exists()

    final = cached_dir(root, KEY, _write("ok"))
    assert (final / "data.txt").read_text() == "ok"
    assert (final / "DONE").is_file()


def test_finished_entry_is_reused_without_building(tmp_path: Path) -> None:
    first = cached_dir(tmp_path, KEY, _write("first"))

    def must_not_build(folder: Path) -> None:
        raise AssertionError("built again")

    assert cached_dir(tmp_path, KEY, must_not_build) == first
    assert (first / "data.txt").read_text() == "first"
