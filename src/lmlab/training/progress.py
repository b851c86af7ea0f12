"""How a training run shows its progress: a rich bar on a terminal, and plain log lines where no bar is drawn
(stdout redirected to a file: ``nohup``, a SLURM job, CI; or the bar turned off), so such a run never looks hung.

Both count the run, not the epoch: steps of ``trainer.max_steps`` (or of ``max_epochs`` epochs), from the
step a resumed run starts at.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger("lmlab")


def planned_steps(trainer: L.Trainer) -> float:
    """The optimizer steps the whole run makes (``max_steps``, or ``max_epochs`` epochs of batches, whichever
    ends it first); infinite when nothing bounds it."""
    steps = trainer.estimated_stepping_batches
    return steps if steps >= 0 else math.inf  # -1: an iterable data set without max_steps


def bar_is_drawn(trainer: L.Trainer) -> bool:
    """Whether the trainer's progress bar draws: it is on, and a rich bar writes to a terminal (rich's own
    test, which also honours ``TTY_INTERACTIVE``); to a file it would print only its last state at the end."""
    bar = trainer.progress_bar_callback
    if bar is None or not bar.is_enabled:
        return False
    if isinstance(bar, RichProgressBar):
        from rich import get_console

        return get_console().is_interactive
    return True


class TrainingMetrics:
    """The ``train/*`` metrics (and the throughput callback's ``perf/*``) as of the last step the loggers wrote
    (every ``trainer.log_every_n_steps`` steps): reading them from a GPU every step would make each step wait
    for the device."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def update(self, trainer: L.Trainer) -> None:
        every = trainer.log_every_n_steps
        if not self.values or (every and trainer.global_step % every == 0):
            self.values = {
                name: float(value)
                for name, value in trainer.callback_metrics.items()
                if name.startswith(("train/", "perf/"))
            }

    def training(self) -> dict[str, float]:
        return {name: value for name, value in self.values.items() if name.startswith("train/")}


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting the run rather than the epoch: its total is the run's steps
    (:func:`planned_steps`), its position the global step (a run resumed at step 100 of 150 shows 100/150), and
    it carries no ``v_num``. A run bounded by steps reads "Training"; one bounded by epochs "Epoch 2/10".

    It shows the training metrics (``train/*``, which the tasks log without ``prog_bar``) as of the last step
    the trainer wrote logs (:class:`TrainingMetrics`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._training = TrainingMetrics()

    @property
    def total_train_batches(self) -> int | float:
        """The training bar's total: the run's steps, not one epoch's batches."""
        return planned_steps(self.trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.progress is None or self.train_progress_bar_id is None:
            super().on_train_epoch_start(trainer, pl_module)
            if self.progress is not None and self.train_progress_bar_id is not None:
                self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)
            return
        # one bar for the whole run: a new epoch changes its description only (Lightning would restart it)
        description = self._get_train_description(trainer.current_epoch)
        styled = f"[{self.theme.description}]{description}" if self.theme.description else description
        self.progress.update(self.train_progress_bar_id, description=styled)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.is_enabled:  # Lightning turns the bar off on all but rank 0
            self._training.update(trainer)
        # Lightning sets the bar to ``batch_idx + 1``: handing it the global step makes that the run's step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = {**super().get_metrics(trainer, pl_module), **self._training.training()}
        metrics.pop("v_num", None)  # the logger's version: a run folder's name says more
        return metrics

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        bounded_by_epochs = self.trainer.max_steps == -1 and max_epochs not in (None, -1)
        description = f"Epoch {current_epoch + 1}/{max_epochs}" if bounded_by_epochs else "Training"
        return f"{description:{len(self.validation_description)}}"


class TextProgress(L.Callback):
    """Where no progress bar is drawn (:func:`bar_is_drawn`), logs one line every ``every_n_steps`` steps or
    ``every_seconds`` seconds, whichever comes first (``null`` turns either off), one per validation, and one
    when training ends, through the ``lmlab`` logger (the console and the run's ``train.log``); on rank 0 only::

        step 250/1500 (16.7%) | loss 2.431 | lr 6.0e-04 | 12,345 tok/s | elapsed 0:01:02 | ETA 0:05:10
        validation at step 250: val/loss 2.31 val/ppl 10.1

    The loss is that of the last logging step (:class:`TrainingMetrics`), tokens/s the throughput callback's
    last value, the learning rate the first optimizer's. Elapsed time and the rate behind the ETA count only
    this process's steps (a resumed run's restored steps were not made in its time).
    """

    def __init__(self, every_n_steps: int | None = 100, every_seconds: float | None = 60.0) -> None:
        self.every_n_steps, self.every_seconds = every_n_steps, every_seconds
        self._metrics = TrainingMetrics()
        self._active = False
        self._total = math.inf
        self._start_step = self._last_step = 0
        self._start_time = self._last_time = 0.0
        self._before_validation: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = trainer.is_global_zero and not bar_is_drawn(trainer)
        self._total = planned_steps(trainer)
        self._start_step = self._last_step = trainer.global_step
        self._start_time = self._last_time = time.monotonic()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        self._metrics.update(trainer)
        step, now = trainer.global_step, time.monotonic()
        if step == self._last_step:  # gradient accumulation: no optimizer step yet
            return
        due_by_steps = bool(self.every_n_steps) and step % self.every_n_steps == 0
        due_by_time = self.every_seconds is not None and now - self._last_time >= self.every_seconds
        if due_by_steps or due_by_time:
            self._log_step(trainer, step, now)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active and trainer.global_step != self._last_step:
            self._log_step(trainer, trainer.global_step, time.monotonic())

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._reports_validation(trainer):
            self._before_validation = dict(trainer.callback_metrics)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._reports_validation(trainer):
            return
        # only what this validation computed: the trainer keeps metrics of earlier ones (val/bleu of a
        # translation run is computed only by validations that decode)
        fresh = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith("val/") and value is not self._before_validation.get(name)
        }
        text = " ".join(f"{name} {value:.4g}" for name, value in sorted(fresh.items()))
        log.info("validation at step %d: %s", trainer.global_step, text or "no metrics")

    def _reports_validation(self, trainer: L.Trainer) -> bool:
        return self._active and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def _log_step(self, trainer: L.Trainer, step: int, now: float) -> None:
        self._last_step, self._last_time = step, now
        total = self._total
        parts = [f"step {step}" if math.isinf(total) else f"step {step}/{total:.0f} ({step / total:.1%})"]
        parts += [f"{name.removeprefix('train/')} {value:.4g}" for name, value in self._metrics.training().items()]
        if trainer.optimizers:
            parts.append(f"lr {float(trainer.optimizers[0].param_groups[0]['lr']):.1e}")
        tokens = self._metrics.values.get("perf/tokens_per_sec")
        if tokens is not None:
            parts.append(f"{tokens:,.0f} tok/s")
        elapsed = now - self._start_time
        parts.append(f"elapsed {_duration(elapsed)}")
        done = step - self._start_step
        if done > 0 and not math.isinf(total):
            parts.append(f"ETA {_duration((total - step) * elapsed / done)}")
        log.info(" | ".join(parts))


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))
