"""Stopping a training run cleanly when asked to: Ctrl-C, the SIGTERM a scheduler sends before it kills
a job, and the signal SLURM sends before a time limit or preemption (SIGUSR1 by default).

Each of these asks the run to stop after the current training or validation batch. Lightning already
does that for SIGTERM (it checks a flag at every batch end and shares it across DDP ranks), so SIGINT
and the requeue signal are turned into SIGTERM while Lightning's loop runs. The interrupt checkpoint
callback then saves the state as of the last finished step; the entry point exits with the signal's
status (128 + its number, so a scheduler or sweep sees a failure) and says how to resume, and a job
stopped by the requeue signal under SLURM is requeued.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger("lmlab")
DEFAULT_REQUEUE_SIGNAL = signal.SIGUSR1
#: written into a run folder under SLURM: a requeued job finds its own run by it
SLURM_JOB_FILE = ".slurm_job_id"


class StopRequested(Exception):
    """Raised by a stop signal that arrives outside Lightning's training loop (nothing to save then)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """While active (a context manager around ``trainer.fit``), records the first stop signal and has the
    run stop at the next batch end. A second Ctrl-C stops at once (nothing more is saved)."""

    def __init__(self, requeue_signal: int | None = DEFAULT_REQUEUE_SIGNAL) -> None:
        self.requeue_signal = requeue_signal
        self.received: int | None = None
        self.forced = False
        self._previous: dict[int, Any] = {}

    @property
    def requeue(self) -> bool:
        return self.received is not None and self.received == self.requeue_signal

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in {signal.SIGINT, signal.SIGTERM, self.requeue_signal} - {None}:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            self.forced = True
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
            again = " (Ctrl-C again stops at once, saving nothing)" if signum == signal.SIGINT else ""
            log.warning(
                "%s: stopping after the current batch and saving interrupted.ckpt%s.", signal_name(signum), again
            )
        if signal.getsignal(signal.SIGTERM) == self._handle:
            raise StopRequested(signum)  # Lightning's loop is not running: no batch to finish
        if signum != signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler, on top of ours, stops its loop


def signal_name(signum: int) -> str:
    name = signal.Signals(signum).name
    return "Ctrl-C (SIGINT)" if name == "SIGINT" else name


def requeue_signal_of(environment: Any) -> int:
    """The cluster environment's requeue signal (Lightning's SLURM environment has one), else SIGUSR1."""
    return getattr(environment, "requeue_signal", None) or DEFAULT_REQUEUE_SIGNAL


def slurm_job_id() -> str | None:
    """This SLURM job's id (``<array job>_<task>`` for an array task), or ``None`` outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def is_requeued_slurm_job() -> bool:
    """SLURM counts restarts of a requeued job in ``SLURM_RESTART_COUNT``."""
    return slurm_job_id() is not None and os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0")


def mark_slurm_run(output_dir: str | Path) -> None:
    """Record this SLURM job's id in its run folder, so the job finds the run again after a requeue."""
    job = slurm_job_id()
    if job is not None:
        path = Path(output_dir) / SLURM_JOB_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(job + "\n")


def slurm_runs(log_root: Path) -> list[Path]:
    """Run folders under ``log_root`` that this SLURM job wrote before it was requeued."""
    job = slurm_job_id()
    return [p.parent for p in log_root.glob(f"**/{SLURM_JOB_FILE}") if p.read_text().strip() == job]


def requeue_slurm_job() -> str:
    """``scontrol requeue <job>``: the job goes back to the queue and later resumes its interrupted run."""
    job = slurm_job_id()
    if job is None:
        return "not requeued: not a SLURM job"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"requeueing SLURM job {job} failed ({err})"
    if done.returncode != 0:
        return f"requeueing SLURM job {job} failed: {done.stderr.strip() or done.returncode}"
    return f"requeued SLURM job {job}; it resumes from the interrupted checkpoint when it starts again"
