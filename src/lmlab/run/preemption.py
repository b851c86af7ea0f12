"""Stopping a training run cleanly when asked to: Ctrl-C, the SIGTERM a scheduler sends before it kills
a job, and the signal SLURM sends before a time limit or preemption (SIGUSR1 by default).

Each of these asks the run to stop after the current training or validation batch. The interrupt
checkpoint callback then saves the state as of the last finished step; the entry point exits with the
signal's status (128 + its number, so a scheduler or sweep sees a failure) and says how to resume, and a
job stopped by the requeue signal under SLURM is requeued (by the rank-0 process only).

One process: Lightning already stops at a batch end on SIGTERM (its loops check a flag its SIGTERM handler
sets), so SIGINT and the requeue signal set that flag while Lightning's loop runs (sending SIGTERM instead
would have Lightning log a Ctrl-C as "Received SIGTERM").

Several processes (DDP; under SLURM each task gets the signal, not necessarily at the same step):
Lightning's own SIGTERM handler is not installed, because it broadcasts from inside the handler (a
collective call at whatever point each process happens to be, which can hang) and each process would
leave its loop at its own step. Instead the handler only records the signal, and at each batch boundary
(:class:`StopAgreement`: every training batch end, validation batch ends, validation end, training end)
all processes take one all-reduce (max) of a two-number flag, so they all stop after the same batch, save
``interrupted.ckpt`` together (rank 0 writes) and exit with the same status. Lightning's SLURM
auto-requeue handler is not installed either (lmlab requeues once, from rank 0), on one process as on
several: lmlab's handler already holds the requeue signal when Lightning looks.
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

import lightning as L
import torch

log = logging.getLogger("lmlab")
DEFAULT_REQUEUE_SIGNAL = signal.SIGUSR1
#: written into a run folder under SLURM: a requeued job finds its own run by it
SLURM_JOB_FILE = ".slurm_job_id"
#: above every signal number: the requeue signal is coded above the others, so it wins the agreement
_REQUEUE_RANK = 256


class StopRequested(Exception):
    """Raised by a stop signal that arrives outside Lightning's training loop (nothing to save then)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """While active (a context manager around ``trainer.fit``), records the first stop signal and has the
    run stop at the next batch end. A second Ctrl-C stops at once (nothing more is saved).

    ``received`` is the signal the run stops for: on one process the first one it got; on several, the one
    all processes agreed on (the requeue signal if any process got it, else the highest number), set on
    every process at the same batch end, also on those that got no signal themselves.
    """

    def __init__(self, requeue_signal: int | None = DEFAULT_REQUEUE_SIGNAL) -> None:
        self.requeue_signal = requeue_signal
        self.received: int | None = None
        self.forced = False
        self._previous: dict[int, Any] = {}
        #: the first stop signal this process got itself (on several processes, not yet agreed on)
        self._local: int | None = None
        #: "multi" once Lightning's fit set up several processes, "single" once it set up one
        self._mode: str | None = None
        self.agreement: StopAgreement | None = None
        self._register: Any = None
        #: Lightning's signal connector of a fit on one process: its flag stops Lightning's loop
        self._connector: Any = None

    @property
    def requeue(self) -> bool:
        return self.received is not None and self.received == self.requeue_signal

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in {signal.SIGINT, signal.SIGTERM, self.requeue_signal} - {None}:
                self._previous[signum] = signal.signal(signum, self._handle)
            self._hook_lightning()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self._unhook_lightning()
        stopping_together = self._mode == "multi" and self.received is not None and not self.forced
        for signum, handler in self._previous.items():
            if not stopping_together:
                signal.signal(signum, handler)
            # The processes stop together, and exit right after: a signal that reaches this one late (SLURM
            # signals each task on its own) must not kill it with another status first. Ignored by the
            # operating system, not by a Python handler: the interpreter resets its own handlers to the
            # default when it shuts down, and the late signal may arrive then. A Ctrl-C still stops at once
            # when it is this process's second stop signal.
            elif signum != signal.SIGINT:
                signal.signal(signum, signal.SIG_IGN)
            elif self._local is None:
                signal.signal(signum, _IgnoreFirst(handler))
            else:
                signal.signal(signum, handler)
        self._previous.clear()

    def _hook_lightning(self) -> None:
        """Have Lightning's fit tell this object how many processes it runs, when it would install its own
        signal handlers (after setting up the processes, before the first batch)."""
        from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

        original = _SignalConnector.register_signal_handlers
        stop = self

        def register_signal_handlers(connector: _SignalConnector) -> None:
            stop._on_register(connector, original)

        self._register = original
        _SignalConnector.register_signal_handlers = register_signal_handlers  # type: ignore[method-assign]

    def _unhook_lightning(self) -> None:
        if self._register is not None:
            from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

            _SignalConnector.register_signal_handlers = self._register  # type: ignore[method-assign]
            self._register = None
        if self.agreement is not None:
            self.agreement.open = False
            callbacks = self.agreement.trainer.callbacks
            if self.agreement in callbacks:
                callbacks.remove(self.agreement)

    def _on_register(self, connector: Any, original: Any) -> None:
        trainer = connector.trainer
        if self.agreement is None and _world_size() > 1 and trainer.world_size > 1:
            self._mode = "multi"
            # none of Lightning's handlers: lmlab's stay in place, and Lightning's teardown restores nothing
            connector.received_sigterm = False
            connector._original_handlers = {}
            self.agreement = StopAgreement(self, trainer)
            trainer.callbacks.append(self.agreement)
            return
        self._mode = self._mode or "single"
        self._connector = connector
        original(connector)

    def _deferring(self) -> bool:
        """Several processes, inside their training loop: a signal is only recorded here, and the processes
        agree on it at the next batch boundary."""
        if self._mode == "multi":
            return self.agreement is not None and self.agreement.open
        # Lightning has set up several processes but not yet reached its loop: agreed at the first boundary
        return self._mode is None and _world_size() > 1

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._local is not None:
            self.forced = True
            if self.received is None:
                self.received = self._local
            raise KeyboardInterrupt
        deferring = self._deferring()
        if self._local is None:
            self._local = signum
            again = " (Ctrl-C again stops at once, saving nothing)" if signum == signal.SIGINT else ""
            if deferring:
                log.warning(
                    "[rank %d] %s: all processes stop after the same batch and save interrupted.ckpt%s.",
                    _rank(),
                    signal_name(signum),
                    again,
                )
            else:
                log.warning(
                    "%s: stopping after the current batch and saving interrupted.ckpt%s.", signal_name(signum), again
                )
        if deferring:
            return  # StopAgreement shares it with the other processes at the next batch boundary
        if self._mode == "multi" and self.received is not None:
            return  # the processes have agreed to stop already
        if self.received is None:
            self.received = signum
        if signal.getsignal(signal.SIGTERM) == self._handle:
            raise StopRequested(signum)  # Lightning's loop is not running: no batch to finish
        self._connector.received_sigterm = True  # what Lightning's SIGTERM handler sets: its loop stops

    def _code(self) -> int:
        """This process's stop request as a number for the agreement: 0 for none."""
        signum = self.received if self.received is not None else self._local
        if signum is None:
            return 0
        return signum + (_REQUEUE_RANK if signum == self.requeue_signal else 0)


class StopAgreement(L.Callback):
    """Added by :class:`StopSignals` to a fit of several processes: at each batch boundary, all processes
    take one all-reduce (max) of [stop request, at its last validation batch], and stop together.

    The boundaries are those every process passes equally often: each training batch end (Lightning
    checks its stop flag right after, or after the validation that follows: then that validation stops
    after its first batch, unless one process is at its last), validation batch ends until one process is
    at its last validation batch (the processes may have one validation batch more or less), validation
    end, and training end. Once agreed, Lightning's stop flag is set on every process at the same point, so
    all leave the loop after the same batch. Nothing is sent on one process (no agreement is made there).
    """

    def __init__(self, stop: StopSignals, trainer: L.Trainer) -> None:
        self.stop, self.trainer = stop, trainer
        self.agreed = False
        #: until StopSignals exits or training ends: signals are recorded, not acted on, meanwhile
        self.open = True
        self._validation_open = False

    def _agree(self, trainer: L.Trainer, last: bool = False) -> bool:
        """The all-reduce; returns whether some process is at its last validation batch."""
        flags = torch.tensor([self.stop._code(), int(last)], dtype=torch.int64, device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        code, any_last = (int(v) for v in flags.tolist())
        if code and not self.agreed:
            self.agreed = True
            self.stop.received = code % _REQUEUE_RANK
            _expect_workers_to_exit_with(128 + self.stop.received)
            mine = self.stop._local
            log.warning(
                "[rank %d] Stop agreed by all %d processes after step %d: %s%s.",
                trainer.global_rank,
                trainer.world_size,
                trainer.global_step,
                signal_name(self.stop.received),
                f" (this process got {signal.Signals(mine).name})" if mine else " (this process got no signal)",
            )
        return bool(any_last)

    def _set_lightning_flag(self, trainer: L.Trainer, value: bool) -> None:
        trainer._signal_connector.received_sigterm = value

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._agree(trainer)
        self._set_lightning_flag(trainer, self.agreed)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_open = True
        # Lightning would stop each process after its first validation batch unless it is its last, and
        # the processes may differ there: the batch ends below decide for all of them together
        self._set_lightning_flag(trainer, False)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._validation_open:
            return
        any_last = self._agree(trainer, last=trainer.fit_loop.epoch_loop.val_loop.batch_progress.is_last_batch)
        if any_last:
            # a process has no batch after this one: no more agreements in this validation (they would not
            # match up); Lightning stops after its end
            self._validation_open = False
        self._set_lightning_flag(trainer, self.agreed and not any_last)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_open = False
        self._agree(trainer)
        self._set_lightning_flag(trainer, self.agreed)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the last boundary: a stop asked for before it counts on every process; one asked for later (the
        # end of fit) stops the process that gets it, as outside the loop on one process
        self._agree(trainer)
        self.open = False


def _expect_workers_to_exit_with(status: int) -> None:
    """When this process started the DDP workers itself (one node, no SLURM): Lightning's launcher watches
    them from a thread and SIGKILLs every process, this one included, once a worker exits with a non-zero
    status. After a stop all agreed on, the workers exit with the stop's status, often before this process
    is done saving and reporting; the watcher takes that status as a clean end (any other still kills)."""
    try:
        from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    except ImportError:  # pragma: no cover - another Lightning version
        return
    for thread in threading.enumerate():
        if not isinstance(thread, _ChildProcessObserver) or not hasattr(thread, "_child_processes"):
            continue
        check = thread._run

        def run(thread: Any = thread, check: Any = check) -> bool:
            codes = [proc.poll() for proc in thread._child_processes]
            if all(code in (0, status) for code in codes):
                return True  # all ended as agreed: nothing more to watch
            if all(code in (None, 0, status) for code in codes):
                return False
            return check()

        thread._run = run


class _IgnoreFirst:
    """Ignores one signal, then hands the next ones to ``previous``."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        log.info("%s: ignored, the run is stopping already.", signal_name(signum))
        signal.signal(signum, self.previous)


def _world_size() -> int:
    """The processes of the initialized default process group (1 without one); no communication."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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
