"""Callbacks that Lightning does not ship: token throughput and text samples during training."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only


class TokenThroughput(L.Callback):
    """Logs training throughput (``perf/tokens_per_sec``, ``perf/samples_per_sec``) over a window of steps.

    Tokens are the input elements of each batch summed over all processes, so the number is the
    whole job's rate. The first ``skip_first`` batches (compilation, warm-up) are not counted.
    """

    def __init__(self, window: int = 20, skip_first: int = 5) -> None:
        self.window, self.skip_first = window, skip_first
        self._start: float | None = None
        self._tokens = self._samples = self._batches = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._batches += 1
        if self._batches <= self.skip_first:
            return
        if self._start is None:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            self._start = time.perf_counter()
            self._tokens = self._samples = 0
            return
        inputs = batch[0] if isinstance(batch, list | tuple) else batch["input_ids"]
        self._tokens += inputs.numel() * trainer.world_size
        self._samples += inputs.size(0) * trainer.world_size
        if (self._batches - self.skip_first) % self.window == 0:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - self._start
            pl_module.log_dict({"perf/tokens_per_sec": self._tokens / elapsed,
                                "perf/samples_per_sec": self._samples / elapsed}, on_step=True, on_epoch=False)
            self._start, self._tokens, self._samples = time.perf_counter(), 0, 0


class GenerateSamples(L.Callback):
    """After each validation, samples text from the model and hands it to every logger.

    W&B gets a table row, TensorBoard a text summary, and the CSV logger a ``samples.txt`` file.
    Sampling uses its own seeded generator, so it never perturbs the training random stream.
    """

    def __init__(self, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = 50, top_p: float | None = None, seed: int = 0) -> None:
        self.kwargs = dict(prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed)
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
    """Saves ``interrupted.ckpt`` when training stops on Ctrl-C or an error, so nothing is lost.

    A non-finite loss is excluded: resuming from that state would only reproduce it.
    """

    def __init__(self, dirpath: str, filename: str = "interrupted.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self._validated_at: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validated_at = trainer.global_step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lmlab.errors import NonFiniteLossError

        if isinstance(exception, NonFiniteLossError) or not trainer.training:
            return
        with _as_saved_between_batches(trainer, validated=self._validated_at == trainer.global_step):
            trainer.save_checkpoint(self.path)


@contextlib.contextmanager
def _as_saved_between_batches(trainer: L.Trainer, validated: bool) -> Iterator[None]:
    """Save the loop state as Lightning's own checkpoints between two batches have it, so the resumed run
    repeats the uninterrupted one step for step.

    A batch that was fetched but not yet trained on is not counted: Lightning would restore it one batch
    late (validation and the logging step shifted by one); resuming simply redoes it. After a validation at
    this step, the logging step is saved one lower, as at validation end: on restart Lightning skips that
    validation and counts the step then.
    """
    loop = trainer.fit_loop.epoch_loop
    progress = loop.batch_progress
    trackers = (progress.total, progress.current)
    saved = [(t.ready, t.started) for t in trackers], loop._batches_that_stepped
    if progress.total.processed == progress.total.completed:
        for t in trackers:
            t.ready = t.started = t.processed
        if validated:
            loop._batches_that_stepped -= 1
    try:
        yield
    finally:
        for t, (ready, started) in zip(trackers, saved[0], strict=True):
            t.ready, t.started = ready, started
        loop._batches_that_stepped = saved[1]
