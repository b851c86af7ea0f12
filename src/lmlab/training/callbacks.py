"""Callbacks that Lightning does not ship (throughput, text samples, confusion matrices, checkpoints that are
saved on interrupts and on a clock) and fixes to its ``ModelCheckpoint``."""

from __future__ import annotations

import contextlib
import csv
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class TokenThroughput(L.Callback):
    """Logs training throughput (``perf/tokens_per_sec``, ``perf/samples_per_sec``) over a window of steps, and on
    a GPU the peak memory allocated so far (``perf/max_memory_gib``).

    Examples and tokens of a batch are what the task's ``batch_counts`` says (the input tensor's rows and
    elements; a translation task's target tokens), summed over all processes, so the number is the
    whole job's rate. The first ``skip_first`` batches (compilation, warm-up) are not counted.
    """

    def __init__(self, window: int = 20, skip_first: int = 5) -> None:
        self.window, self.skip_first = window, skip_first
        self._start: float | None = None
        self._tokens = self._samples = self._batches = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1
        if self._batches <= self.skip_first:
            return
        if self._start is None:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            self._start = time.perf_counter()
            self._tokens = self._samples = 0
            return
        samples, tokens = pl_module.batch_counts(batch)
        self._tokens += tokens * trainer.world_size
        self._samples += samples * trainer.world_size
        if (self._batches - self.skip_first) % self.window == 0:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - self._start
            rates = {"perf/tokens_per_sec": self._tokens / elapsed, "perf/samples_per_sec": self._samples / elapsed}
            if trainer.strategy.root_device.type == "cuda":
                # the most this process has held on its GPU so far (weights, gradients, optimizer state, activations)
                rates["perf/max_memory_gib"] = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**30
            pl_module.log_dict(rates, on_step=True, on_epoch=False)
            self._start, self._tokens, self._samples = time.perf_counter(), 0, 0


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, with two fixes.

    * ``last.ckpt`` is written after every validation. Lightning writes it only when the same validation
      also saved a top-k checkpoint, so a run whose metric stopped improving would resume from an old
      state and lose the steps since.
    * A score is attached only to the weights it was computed on. With ``every_n_train_steps`` (or
      ``train_time_interval``) and a monitored metric, Lightning saves at the step with the score of the
      previous validation, so the best checkpoint could be chosen on another checkpoint's score; here a
      save that falls due is made at the next validation, which scores the weights it saves.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if self._should_skip_saving_checkpoint(trainer):
            return
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if self._train_time_interval is not None:
            now = time.monotonic()
            elapsed = self._last_time_checked is not None and (
                now - self._last_time_checked >= self._train_time_interval.total_seconds()
            )
            if trainer.strategy.broadcast(elapsed):  # rank 0 decides, so every rank saves at the same step
                self._last_time_checked = now
                due = True
        if due:
            self._defer_save_until_validation = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with _as_counted_after_unscheduled_validation(trainer):
            super().on_validation_end(trainer, pl_module)
            if (
                self.save_last
                and self._last_global_step_saved != trainer.global_step
                and not self._should_skip_saving_checkpoint(trainer)
                and not self._should_save_on_train_epoch_end(trainer)
            ):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class PeriodicCheckpoint(L.Callback):
    """Rewrites ``last.ckpt`` every ``every_minutes`` of training, between two batches, so a hard kill
    (``kill -9``, a node failure) loses minutes of training, not everything since the last validation.

    The save goes through the run's :class:`ModelCheckpoint` (its ``last.ckpt``, which it needs
    ``save_last`` for), and resumes exactly, like one written at validation. In multi-process runs rank 0's
    clock decides, checked every ``check_every_n_steps`` steps, so all ranks save at the same step.
    """

    def __init__(self, every_minutes: float | None = 5.0, check_every_n_steps: int = 10) -> None:
        self.every_seconds = None if every_minutes is None else 60.0 * every_minutes
        self.check_every_n_steps = check_every_n_steps
        self._last_save: float | None = None
        self._validated_at: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_save = time.monotonic()
        if self.every_seconds is not None and not self._writer(trainer):
            rank_zero_warn(
                "callbacks.periodic_checkpoint has nothing to write with: it needs "
                "callbacks.model_checkpoint with save_last=true."
            )

    @staticmethod
    def _writer(trainer: L.Trainer) -> ModelCheckpoint | None:
        callback = trainer.checkpoint_callback
        # save_last="link" would link an older top-k file, not these weights
        return callback if isinstance(callback, ModelCheckpoint) and callback.save_last is True else None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validated_at = trainer.global_step
            self._last_save = time.monotonic()  # validation has just written last.ckpt

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        writer = self._writer(trainer)
        if writer is None or self.every_seconds is None or self._last_save is None or trainer.global_step == 0:
            return
        if trainer.world_size > 1 and trainer.global_step % self.check_every_n_steps:
            return
        due = time.monotonic() - self._last_save >= self.every_seconds
        if trainer.world_size > 1:
            due = trainer.strategy.broadcast(due)
        if due:
            with _as_saved_between_batches(trainer, validated=self._validated_at == trainer.global_step):
                writer._save_last_checkpoint(trainer, writer._monitor_candidates(trainer))
            self._last_save = time.monotonic()


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary without its FLOPs column, which reads 0 for every model that was not
    measured with a sample input."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
        from rich.console import Console
        from rich.table import Table

        kept = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in kept:
            table.add_column(name or " ", justify="right" if "Params" in name else "left")
        for row in zip(*(values for _, values in kept), strict=True):
            table.add_row(*row)
        console = Console()
        console.print(table)
        console.print(
            f"[bold]Trainable params[/]: {get_human_readable_count(int(trainable_parameters))}   "
            f"[bold]Total params[/]: {get_human_readable_count(int(total_parameters))}   "
            f"[bold]Size[/]: {get_formatted_model_size(model_size)} MB"
        )


class GenerateSamples(L.Callback):
    """After each validation, samples text from the model and hands it to every logger.

    W&B gets a table row, TensorBoard a text summary, and the CSV logger a ``samples.txt`` file.
    Sampling uses its own seeded generator, so it never perturbs the training random stream.
    """

    def __init__(
        self,
        prompt: str = "",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = None,
        seed: int = 0,
    ) -> None:
        self.kwargs = dict(
            prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        )
        self._rows: list[list[Any]] = []

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not hasattr(pl_module, "generate_text") or pl_module.tokenizer is None:
            return
        text = pl_module.generate_text(**self.kwargs)[0]
        step = trainer.global_step
        self._rows.append([step, self.kwargs["prompt"], text])
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text(key="samples", columns=["step", "prompt", "text"], data=self._rows)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", f"```\n{self.kwargs['prompt']}{text}\n```", step)
            elif isinstance(logger, CSVLogger) and logger.log_dir:
                path = Path(logger.log_dir) / "samples.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a", encoding="utf-8") as f:
                    f.write(f"=== step {step}\n{self.kwargs['prompt']}{text}\n")


class InterruptCheckpoint(L.Callback):
    """Saves ``interrupted.ckpt`` when training stops early: on a stop signal (Ctrl-C, SIGTERM, SLURM's
    requeue signal; see :mod:`lmlab.run.preemption`) or an error, during training or during a validation
    inside training, so nothing is lost.

    The state saved is that of the last finished step; a validation that was cut short runs again after
    the resume. Not saved: after a non-finite loss (resuming would only reproduce it), after a full disk
    (the save would fail too), after a second Ctrl-C (stop at once), and when no training batch ran in this
    process (the checkpoint it resumed from is still the newest).
    """

    def __init__(self, dirpath: str, filename: str = "interrupted.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self.saved: Path | None = None
        self._validated_at: int | None = None
        self._trained = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._trained = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validated_at = trainer.global_step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lmlab.errors import DiskFullError, NonFiniteLossError
        from lmlab.run.preemption import StopRequested

        if (
            isinstance(exception, NonFiniteLossError | DiskFullError | KeyboardInterrupt | StopRequested)
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or not self._trained
        ):
            return
        if trainer.validating:
            with _as_saved_before_validation(trainer):
                trainer.save_checkpoint(self.path, weights_only=False)
        else:
            with _as_saved_between_batches(trainer, validated=self._validated_at == trainer.global_step):
                trainer.save_checkpoint(self.path, weights_only=False)
        self.saved = self.path


@contextlib.contextmanager
def _as_saved_before_validation(trainer: L.Trainer) -> Iterator[None]:
    """Save a validation inside training that was cut short as one that is about to start its first batch.

    Lightning resumes such a checkpoint by running that validation (from its first batch, with fresh
    metrics) before the next training step, as the uninterrupted run did.
    """
    progress = trainer.fit_loop.epoch_loop.val_loop.batch_progress
    trackers = (progress.total, progress.current)
    saved = [(t.ready, t.started, t.processed, t.completed) for t in trackers]
    before = progress.total.completed - progress.current.completed  # batches of earlier validations
    for tracker, done in ((progress.total, before), (progress.current, 0)):
        tracker.ready = tracker.started = done + 1
        tracker.processed = tracker.completed = done
    try:
        yield
    finally:
        for t, (ready, started, processed, completed) in zip(trackers, saved, strict=True):
            t.ready, t.started, t.processed, t.completed = ready, started, processed, completed


@contextlib.contextmanager
def _as_counted_after_unscheduled_validation(trainer: L.Trainer) -> Iterator[None]:
    """Save a validation that ran only because training was asked to stop (the final validation at
    ``max_steps``, see :meth:`lmlab.tasks.base.TaskModule.on_train_batch_end`) with its step counted.

    A checkpoint written at validation end holds the logging step before the increment that follows the
    validation; Lightning makes it up on restart only where the step is a scheduled validation step. A run
    continued from its final checkpoint with a larger ``max_steps`` would otherwise log every step one low.
    """
    loop = trainer.fit_loop.epoch_loop
    if not trainer.should_stop or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
        yield
        return
    trainer.should_stop = False
    try:
        scheduled = loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
    finally:
        trainer.should_stop = True
    counted = loop._batches_that_stepped
    if not scheduled:
        loop._batches_that_stepped += 1
    try:
        yield
    finally:
        loop._batches_that_stepped = counted


@contextlib.contextmanager
def _as_saved_between_batches(trainer: L.Trainer, validated: bool) -> Iterator[None]:
    """Save the loop state as Lightning's own checkpoints between two batches have it, so the resumed run
    repeats the uninterrupted one step for step.

    A batch that was fetched but not yet trained on is not counted: Lightning would restore it one batch
    late (validation and the logging step shifted by one); resuming simply redoes it. After a validation at
    this step, the logging step is saved one lower, as at validation end: on restart Lightning skips that
    validation and counts the step then. Between two epochs (the last one finished, the next not begun) the
    epoch's batch counter is saved as the next epoch will start it, at zero; otherwise the resumed run would
    take the finished epoch's batches for the next one's.
    """
    loop = trainer.fit_loop.epoch_loop
    progress = loop.batch_progress
    trackers = (progress.total, progress.current)
    saved = [(t.ready, t.started, t.processed, t.completed) for t in trackers], loop._batches_that_stepped
    saved_last = progress.is_last_batch
    if progress.total.processed == progress.total.completed:
        for t in trackers:
            t.ready = t.started = t.processed
        if validated:
            loop._batches_that_stepped -= 1
    epochs = trainer.fit_loop.epoch_progress.current
    if epochs.ready == epochs.completed:
        progress.current.reset()
        progress.is_last_batch = False
    try:
        yield
    finally:
        for t, (ready, started, processed, completed) in zip(trackers, saved[0], strict=True):
            t.ready, t.started, t.processed, t.completed = ready, started, processed, completed
        loop._batches_that_stepped = saved[1]
        progress.is_last_batch = saved_last


class ConfusionMatrixLogger(L.Callback):
    """After each validation and test, hands the task's confusion matrix to every logger.

    W&B gets an image and a long-format table (true, predicted, count), TensorBoard a figure, and the CSV
    logger ``confusion_matrix/{stage}_step{step:06d}.csv`` plus ``{stage}_latest.csv``. Reads
    ``pl_module.confusion_matrices[stage]`` (rows: true class, columns: predicted) and ``pl_module.labels``.
    Above ``max_classes_for_image`` classes an image is unreadable, so only the table and CSV are written.
    """

    def __init__(
        self, normalize: bool = False, max_classes_for_image: int = 50, stages: Sequence[str] = ("val", "test")
    ) -> None:
        self.normalize, self.max_classes_for_image = normalize, max_classes_for_image
        self.stages = tuple(stages)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    @rank_zero_only
    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        matrix = getattr(pl_module, "confusion_matrices", {}).get(stage) if stage in self.stages else None
        if matrix is None:
            return
        matrix = matrix.detach().cpu()
        labels = [str(label) for label in getattr(pl_module, "labels", None) or range(len(matrix))]
        step = trainer.global_step
        key = f"{stage}/confusion_matrix"
        fig: Figure | None = None
        if len(labels) <= self.max_classes_for_image and any(
            isinstance(logger, WandbLogger | TensorBoardLogger) for logger in trainer.loggers
        ):
            fig = confusion_matrix_figure(matrix, labels, f"{stage} confusion matrix, step {step}", self.normalize)
        try:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    _log_wandb(logger, key, matrix, labels, fig, step)
                elif isinstance(logger, TensorBoardLogger):
                    if fig is not None:
                        logger.experiment.add_figure(key, fig, step)
                elif isinstance(logger, CSVLogger) and logger.log_dir:
                    _write_csv(Path(logger.log_dir) / "confusion_matrix", stage, step, matrix, labels)
        finally:
            if fig is not None:
                fig.clear()


def _log_wandb(
    logger: WandbLogger, key: str, matrix: torch.Tensor, labels: list[str], fig: Figure | None, step: int
) -> None:
    """Through ``log_metrics``, so the logger's prefix and step axis apply as to the task's metrics."""
    import wandb

    rows = [[t, p, int(matrix[i, j])] for i, t in enumerate(labels) for j, p in enumerate(labels)]
    record: dict[str, Any] = {f"{key}_table": wandb.Table(columns=["true", "predicted", "count"], data=rows)}
    if fig is not None:
        record[key] = wandb.Image(fig)
    logger.log_metrics(record, step=step)


def _write_csv(folder: Path, stage: str, step: int, matrix: torch.Tensor, labels: list[str]) -> None:
    """One file per evaluation for the history, and ``{stage}_latest.csv`` for scripts that want the last one."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [["true\\pred", *labels], *([label, *matrix[i].tolist()] for i, label in enumerate(labels))]
    for name in (f"{stage}_step{step:06d}.csv", f"{stage}_latest.csv"):
        with (folder / name).open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)


def confusion_matrix_figure(matrix: torch.Tensor, labels: Sequence[str], title: str, normalize: bool = False) -> Figure:
    """A heatmap of counts (or row fractions) with class names on the axes, drawn without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = matrix.detach().cpu().double()
    if normalize:
        values = values / values.sum(1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.5 * len(labels) + 2)
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values.numpy(), cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)
    if len(labels) <= 20:
        high = float(values.max()) if values.numel() else 0.0
        for i in range(len(labels)):
            for j in range(len(labels)):
                v = float(values[i, j])
                ax.text(
                    j,
                    i,
                    f"{v:.2f}" if normalize else f"{int(v)}",
                    ha="center",
                    va="center",
                    color="white" if v > high / 2 else "black",
                )
    fig.tight_layout()
    return fig
