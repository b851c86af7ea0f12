"""Stop signals with several training processes (DDP over two CPU processes, gloo), as under SLURM where
every task gets the signal, each at its own moment: all processes stop after the same batch, one
``interrupted.ckpt`` is saved and resumes, every process exits with the signal's status, nothing hangs,
and the requeue signal requeues the job once.

Two ways to start the processes: ``lmlab-train trainer=ddp`` starting its worker itself (the test signals
the worker and the launcher on their own, as SLURM would), and a stand-in for ``srun`` (two
``lmlab-train`` processes with SLURM's task variables, so Lightning's SLURM environment, with its
auto-requeue, is the one in use)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import time
from pathlib import Path

import pytest
import torch

from conftest import Command, script
from test_sweeps import _tiny

pytestmark = [
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="torch.distributed with the gloo backend is not available",
    ),
    pytest.mark.slow,
]

START_TIMEOUT_S = 240  # two processes importing torch and Lightning on a busy two-core machine
STOP_TIMEOUT_S = 60  # from the signals to the end of every process: well above a clean stop, below a hang


def _args(text: Path, root: Path, run_dir: Path, *extra: str) -> list[str]:
    """A DDP run of two CPU processes that trains until stopped, validating every 5 steps."""
    return [
        script("lmlab-train"),
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        *_tiny(text, root),
        "trainer.max_steps=1000000",
        "trainer.val_check_interval=5",
        "callbacks.periodic_checkpoint.every_minutes=null",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def _children(pid: int) -> list[int]:
    """The DDP worker processes that process ``pid`` started (``python -m lmlab.train``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid and b"lmlab.train" in command:
            found.append(int(entry.name))
    return found


def _wait_until_training(commands: list[Command], run_dir: Path, after: float = 0.0) -> None:
    """Until the run has validated once (``last.ckpt`` written since ``after``)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (last.is_file() and last.stat().st_mtime > after):
        for command in commands:
            if command.proc.poll() is not None:
                command.wait()
                pytest.fail(f"the run ended before training ({command.returncode}):\n{command.stderr[-4000:]}")
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)


def _signal_one_by_one(pids: list[int], signum: int, delay: float) -> None:
    """``signum`` to each process in turn, ``delay`` seconds apart (a process that is gone is skipped)."""
    for i, pid in enumerate(pids):
        if i:
            time.sleep(delay)
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _wait_stopped(commands: list[Command], pids: list[int]) -> None:
    """Every process ends within STOP_TIMEOUT_S; else all are killed and the test fails (a hang)."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    try:
        for command in commands:
            command.wait(timeout=max(1.0, deadline - time.monotonic()))
    except Exception:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for command in commands:
            command.proc.kill()
            command.wait()
        pytest.fail(f"the processes did not all end within {STOP_TIMEOUT_S} s of the signals (hang):\n{_out(commands)}")
    while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in pids):
        assert time.monotonic() < deadline, f"a worker process did not end:\n{_out(commands)}"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def _out(commands: list[Command]) -> str:
    return "\n".join((c.stdout or "") + (c.stderr or "") for c in commands)[-6000:]


def _check_stopped_together(commands: list[Command], signum: int, run_dir: Path) -> int:
    """Both processes agreed on the stop at one step and said so; returns that step, which
    ``interrupted.ckpt`` holds."""
    out, full = _out(commands), "".join(c.stdout + c.stderr for c in commands)
    name = signal.Signals(signum).name
    agreed = re.findall(rf"\[rank (\d)\] Stop agreed by all 2 processes after step (\d+): .*?{name}", full)
    assert sorted(rank for rank, _ in agreed) == ["0", "1"], f"each process agrees once:\n{out}"
    steps = {int(step) for _, step in agreed}
    assert len(steps) == 1, f"the processes stopped at different steps {steps}:\n{out}"
    step = steps.pop()
    stopped = [line for line in full.splitlines() if line.startswith("stopped:")]
    assert stopped and all(f"at step {step}; saved" in line for line in stopped), out
    assert "Traceback" not in full, out
    saved = run_dir / "checkpoints" / "interrupted.ckpt"
    assert list((run_dir / "checkpoints").glob("interrupted*.ckpt")) == [saved], "one interrupted.ckpt"
    assert torch.load(saved, map_location="cpu", weights_only=True)["global_step"] == step
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["status"] == "interrupted" and report["signal"] == name and report["step"] == step
    return step


def _ddp_trial(text: Path, root: Path, run_dir: Path, signum: int, worker_first: bool, delay: float, *extra: str):
    """``lmlab-train trainer=ddp``: the signal to the worker and to the launcher, one ``delay`` after the
    other; returns (the step all stopped after, the output)."""
    command = Command(_args(text, root, run_dir, *extra), root, run_dir.name)
    _wait_until_training([command], run_dir)
    workers = _children(command.proc.pid)
    assert len(workers) == 1, "one DDP worker process"
    pids = [*workers, command.proc.pid] if worker_first else [command.proc.pid, *workers]
    _signal_one_by_one(pids, signum, delay)
    _wait_stopped([command], workers)
    assert command.returncode == 128 + signum, command.stderr[-4000:]
    return _check_stopped_together([command], signum, run_dir), command.stdout + command.stderr


def test_ddp_sigterm_to_each_process_at_its_own_moment_stops_both_after_one_batch(
    learnable_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_slurm_env(monkeypatch)
    # the worker first: with Lightning's own handler (a broadcast inside it), this hung
    _ddp_trial(learnable_text, tmp_path, tmp_path / "run", signal.SIGTERM, worker_first=True, delay=0.2)


@pytest.mark.slow
def test_ddp_stop_signals_at_different_moments_repeatedly_each_resuming_the_last(
    learnable_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trials in a row, each resuming the previous one's ``interrupted.ckpt``: signals in either order,
    at once or apart (the later one then reaches a process that is already stopping)."""
    _clean_slurm_env(monkeypatch)
    trials = [
        (signal.SIGTERM, False, 0.0),
        (signal.SIGTERM, True, 0.05),
        (signal.SIGUSR1, False, 0.3),  # no SLURM job here: stops, requeues nothing
        (signal.SIGINT, True, 0.0),  # Ctrl-C reaches every process of the terminal at once
        (signal.SIGTERM, True, 1.0),
    ]
    previous, step = None, -1
    for i, (signum, worker_first, delay) in enumerate(trials):
        resume = [f"ckpt_path={previous}"] if previous else []
        run_dir = tmp_path / f"trial{i}"
        stopped_at, out = _ddp_trial(learnable_text, tmp_path, run_dir, signum, worker_first, delay, *resume)
        if previous:
            assert f"Resuming from {previous}" in out
        assert stopped_at > step, "the resumed run went on training"
        previous, step = run_dir / "checkpoints" / "interrupted.ckpt", stopped_at


# -- SLURM: every task gets the requeue signal; the job is requeued once and resumes its run ------------
def _fake_scontrol(folder: Path) -> Path:
    """An ``scontrol`` that records its arguments, put first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "scontrol.calls"
    tool = folder / "scontrol"
    tool.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return record


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _srun(args: list[str], root: Path, name: str, bin_dir: Path, restarts: int) -> list[Command]:
    """What ``srun`` does for a job of 2 tasks on one node: the same command twice, with each task's rank."""
    port = str(_free_port())
    commands = []
    for task in range(2):
        env = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "lmlab",
            "SLURM_RESTART_COUNT": str(restarts),
            "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_NNODES": "1",
            "SLURM_NODEID": "0",
            "SLURM_PROCID": str(task),
            "SLURM_LOCALID": str(task),
            "SLURM_NODELIST": "127.0.0.1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        commands.append(Command(args, root, f"{name}_task{task}", env))
    return commands


def _clean_slurm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)


def test_slurm_requeue_signal_on_every_task_requeues_once_and_the_job_resumes(
    learnable_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_slurm_env(monkeypatch)
    bin_dir = tmp_path / "bin"
    record = _fake_scontrol(bin_dir)
    run_dir = tmp_path / "logs" / "train" / "runs" / "job"  # under <log_dir>/<task_name>: found after requeue
    tasks = _srun(_args(learnable_text, tmp_path, run_dir), tmp_path, "first", bin_dir, restarts=0)
    _wait_until_training(tasks, run_dir)
    _signal_one_by_one([tasks[1].proc.pid, tasks[0].proc.pid], signal.SIGUSR1, 0.1)
    _wait_stopped(tasks, [])
    assert [t.returncode for t in tasks] == [138, 138], _out(tasks)
    step = _check_stopped_together(tasks, signal.SIGUSR1, run_dir)
    assert "requeued SLURM job 4242" in tasks[0].stderr
    assert record.read_text().splitlines() == ["requeue 4242"], "requeued once, by lmlab on rank 0 only"

    # SLURM starts the job again, in the same folder, the restart counted: it resumes without ckpt_path and
    # trains on to the next validation
    end = (step // 5 + 2) * 5
    again = _srun(
        _args(learnable_text, tmp_path, run_dir, f"trainer.max_steps={end}"), tmp_path, "again", bin_dir, restarts=1
    )
    for task in again:
        task.wait(START_TIMEOUT_S)
    assert [t.returncode for t in again] == [0, 0], _out(again)
    saved = run_dir / "checkpoints" / "interrupted.ckpt"
    assert f"Requeued SLURM job 4242: resuming from {saved}" in again[0].stderr + again[0].stdout
    assert (
        torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == end
    )
    assert "status" not in json.loads((run_dir / "metrics.json").read_text()), "the resumed run finished"
    assert record.read_text().splitlines() == ["requeue 4242"]
