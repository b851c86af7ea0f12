"""A run shows its progress: with stdout redirected, plain lines (step of the run, loss, lr, tokens/s, elapsed,
ETA; one per validation) on stdout and in ``train.log``, and ``csv/metrics.csv`` rows while it runs; on a
terminal, a bar that counts the run's steps, also after a resume."""

from __future__ import annotations

import csv
import logging
import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from conftest import Command, script
from lmlab.training.progress import ProgressBar, TextProgress

LINE = re.compile(
    r"step (\d+)/12 \(\d+\.\d%\) \| loss \d+\.\d+ \| lr \d\.\de-\d\d \| [\d,]+ tok/s \| elapsed \d+:\d\d:\d\d"
    r" \| ETA \d+:\d\d:\d\d$"
)

# one worker runs this module's tests, which share its trained fixtures
pytestmark = pytest.mark.xdist_group("progress")
VALIDATION = re.compile(r"validation at step (\d+): val/bpc \S+ val/loss \S+ val/ppl \S+$")


def _messages(text: str) -> list[str]:
    """The messages of the lmlab logger's progress records (after Hydra's ``[time][lmlab][INFO] - ``)."""
    return [line.split("] - ", 1)[1] for line in text.splitlines() if "][lmlab][INFO] - " in line]


def test_redirected_run_logs_progress_lines_and_writes_csv_rows_while_it_runs(
    learnable_text: Path, tmp_path: Path
) -> None:
    # the bar stays on (stdout is a file: it draws nothing); a line every 3 steps, none on a clock
    command = Command(
        [
            script("lmlab-train"),
            "data=text_files",
            f"data.source.train_files={learnable_text}",
            "data.block_size=32",
            "data.batch_size=8",
            "model.n_layer=1",
            "model.n_embd=32",
            "model.n_head=2",
            "trainer.max_steps=12",
            "trainer.val_check_interval=6",
            "trainer.limit_val_batches=2",
            "trainer.num_sanity_val_steps=0",
            "trainer.log_every_n_steps=3",
            "callbacks.text_progress.every_n_steps=3",
            "callbacks.text_progress.every_seconds=null",
            "callbacks.throughput.window=1",
            "callbacks.throughput.skip_first=0",
            "callbacks.rich_model_summary=null",
            "callbacks.samples=null",
            "trainer.enable_model_summary=false",
            "print_config=false",
            "test=false",
        ],
        tmp_path,
        "train",
    )
    # At the line of step 6 the loggers have written (and flushed) the logging step 2 (Lightning counts from 0)
    # but the run is not over: stop the process there, read csv/metrics.csv as a user would during the run,
    # and let it go on.
    deadline = time.monotonic() + 240
    while not any(m.startswith("step 6/") for m in _messages(command.out_path.read_text())):
        assert command.proc.poll() is None, command.err_path.read_text()[-2000:]
        assert time.monotonic() < deadline, "no progress line for step 6"
        time.sleep(0.05)
    command.proc.send_signal(signal.SIGSTOP)
    try:
        assert command.proc.poll() is None, "the run ended before its CSV could be read during it"
        metrics_csv = next(tmp_path.glob("logs/train/runs/*/csv/metrics.csv"), None)
        assert metrics_csv is not None, "csv/metrics.csv not written during the run"
        with metrics_csv.open(newline="") as f:
            steps = {row["step"] for row in csv.DictReader(f) if row.get("train/loss")}
        assert "2" in steps
    finally:
        command.proc.send_signal(signal.SIGCONT)
    command.wait()
    assert command.returncode == 0, command.stderr[-2000:]

    progress = [m for m in _messages(command.stdout) if m.startswith(("step ", "validation"))]
    lines = [m for m in progress if m.startswith("step ")]
    assert [int(LINE.match(m).group(1)) for m in lines if LINE.match(m)] == [3, 6, 9, 12], lines
    assert lines[-1].startswith("step 12/12 (100.0%)") and lines[-1].endswith("ETA 0:00:00")
    validations = [m for m in progress if m.startswith("validation")]
    assert [int(VALIDATION.match(m).group(1)) for m in validations if VALIDATION.match(m)] == [6, 12], validations
    # the same lines in the run's train.log
    train_log = next(tmp_path.glob("logs/train/runs/*/train.log")).read_text()
    assert progress == [m for m in _messages(train_log) if m.startswith(("step ", "validation"))]
    # the bar's last state, printed once at the end into the file: the run's steps, without v_num
    assert re.search(r"Training\s+\S+ 12/12 ", command.stdout) and "v_num" not in command.stdout


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _BarProbe(L.Callback):
    """Records the training bar's (position, total, description) after each batch, and the bar's metrics."""

    def __init__(self, bar: ProgressBar) -> None:
        self.bar, self.seen, self.metrics = bar, [], {}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        task = self.bar.train_progress_bar
        self.seen.append((int(task.completed), task.total, task.description.strip()))
        self.metrics = self.bar.get_metrics(trainer, trainer.lightning_module)


def _fit(root: Path, callbacks: list[L.Callback], ckpt_path: Path | None = None, **limits: Any) -> L.Trainer:
    """A tiny model over 4 batches an epoch."""
    trainer = L.Trainer(
        logger=CSVLogger(root),  # a logger with a version: Lightning's bar would show it as v_num
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        default_root_dir=root,
        callbacks=callbacks,
        **limits,
    )
    data = torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2)
    trainer.fit(_Tiny(), data, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def step4_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after 4 steps (its first epoch)."""
    root = tmp_path_factory.mktemp("step4")
    _fit(root, [], max_steps=4).save_checkpoint(root / "step4.ckpt")
    return root / "step4.ckpt"


def test_bar_counts_the_run_fresh_resumed_and_by_epochs(step4_checkpoint: Path, tmp_path: Path) -> None:
    # 6 steps over epochs of 4 batches: one bar to 6/6 (Lightning's: 1/4 .. 4/4, then 1/4, 2/4)
    bar = ProgressBar()
    probe = _BarProbe(bar)
    _fit(tmp_path, [bar, probe], max_steps=6)
    assert probe.seen == [(step, 6, "Training") for step in range(1, 7)]
    assert "train/loss" in probe.metrics and "v_num" not in probe.metrics

    # resumed at step 4 of 6: 5/6 and 6/6
    bar = ProgressBar()
    probe = _BarProbe(bar)
    _fit(tmp_path, [bar, probe], ckpt_path=step4_checkpoint, max_steps=6)
    assert probe.seen == [(5, 6, "Training"), (6, 6, "Training")]

    # bounded by epochs: 2 epochs of 4 batches are 8 steps, on one bar
    bar = ProgressBar()
    probe = _BarProbe(bar)
    _fit(tmp_path, [bar, probe], max_epochs=2)
    assert [(step, total) for step, total, _ in probe.seen] == [(step, 8) for step in range(1, 9)]
    assert [d for _, _, d in probe.seen] == ["Epoch 1/2"] * 4 + ["Epoch 2/2"] * 4


def test_eta_counts_only_the_steps_this_process_made(
    step4_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = iter(range(0, 1000, 10))  # each reading of the clock is 10 s after the last
    monkeypatch.setattr("lmlab.training.progress.time", SimpleNamespace(monotonic=lambda: float(next(clock))))
    with caplog.at_level(logging.INFO, logger="lmlab"):
        _fit(tmp_path, [TextProgress(every_n_steps=1, every_seconds=None)], step4_checkpoint, max_steps=8)
    lines = [r.getMessage() for r in caplog.records if r.name == "lmlab" and r.getMessage().startswith("step ")]
    # started at step 4 (t=0); step 5 at t=10: 1 step in 10 s, 3 to go: 30 s (not 6 s, as if 5 steps were made)
    assert lines[0].startswith("step 5/8 (62.5%) | loss ") and lines[0].endswith("| elapsed 0:00:10 | ETA 0:00:30")
    assert [line.split(" ", 2)[1] for line in lines] == ["5/8", "6/8", "7/8", "8/8"]
    assert lines[-1].endswith("| elapsed 0:00:40 | ETA 0:00:00")
