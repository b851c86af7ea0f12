"""Stop signals: SIGTERM (what schedulers send), Ctrl-C and SLURM's requeue signal stop a run after the
current batch, during training or during a validation inside training; ``interrupted.ckpt`` holds the last
finished step and the resumed run matches an uninterrupted one; the run exits with the signal's status and
says how to resume; a SLURM job is requeued and resumes its own run. A clock-based ``last.ckpt`` bounds
what a hard kill loses."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from conftest import Command, script
from lmlab.errors import RunInterrupted
from test_resume import _assert_same_steps, _base, _logged, _train


class SignalAt(L.Callback):
    """Sends ``signum`` to this process ``times`` times after training step ``step``, or during the validation
    at that step (after its first batch), as a scheduler or a user would."""

    def __init__(self, step: int, signum: str = "SIGTERM", during_validation: bool = False, times: int = 1) -> None:
        self.step, self.signum = step, getattr(signal, signum)
        self.during_validation, self.times = during_validation, times
        self.sent = False

    def _send(self) -> None:
        if not self.sent:
            self.sent = True
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step and not self.during_validation:
            self._send()

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.during_validation and trainer.global_step == self.step and not trainer.sanity_checking:
            self._send()


# batch_size 96: 6 batches per epoch; 20 steps cross epoch boundaries; validation every 5 steps over 3 batches
def _run_base(text: Path, *extra: str) -> list[str]:
    return _base(
        text,
        "data.batch_size=96",
        "scheduler.warmup_steps=2",
        "trainer.max_steps=20",
        "trainer.val_check_interval=5",
        "++trainer.limit_val_batches=3",
        "data.eval_batch_size=16",
        *extra,
    )


def _signal_at(step: int, signum: str = "SIGTERM", during_validation: bool = False, times: int = 1) -> list[str]:
    return [
        f"+callbacks.signal._target_={__name__}.SignalAt",
        f"+callbacks.signal.step={step}",
        f"+callbacks.signal.signum={signum}",
        f"+callbacks.signal.during_validation={during_validation}",
        f"+callbacks.signal.times={times}",
    ]


@pytest.fixture
def straight(make_cfg, learnable_text: Path, tmp_path: Path) -> dict[int, dict[str, float]]:
    """The losses, learning rates and validations of the run that nobody stops."""
    _train(make_cfg, _run_base(learnable_text), tmp_path / "A")
    return _logged(tmp_path / "A")


@pytest.mark.parametrize(
    ("signum", "step", "during_validation"),
    [
        ("SIGTERM", 8, False),  # mid-epoch, between validations
        ("SIGTERM", 10, True),  # during the validation at step 10 (after its first of 3 batches)
        ("SIGINT", 13, False),  # Ctrl-C
        ("SIGINT", 15, True),
    ],
    ids=["sigterm-training", "sigterm-validation", "ctrl-c-training", "ctrl-c-validation"],
)
def test_stop_signal_saves_last_finished_step_and_resume_matches(
    signum: str,
    step: int,
    during_validation: bool,
    straight: dict[int, dict[str, float]],
    make_cfg,
    learnable_text: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO), pytest.raises(RunInterrupted) as stopped:
        _train(make_cfg, [*_run_base(learnable_text), *_signal_at(step, signum, during_validation)], tmp_path / "B")
    assert stopped.value.exit_code == 128 + getattr(signal, signum)
    # a Ctrl-C is reported as one (Lightning logs "Received SIGTERM" for a SIGTERM only)
    assert any("SIGTERM" in message for message in caplog.messages) == (signum == "SIGTERM"), caplog.messages
    saved = tmp_path / "B" / "checkpoints" / "interrupted.ckpt"
    message = str(stopped.value)
    assert str(saved) in message and "ckpt_path=" in message and f"step {step}" in message
    assert torch.load(saved, weights_only=True)["global_step"] == step
    report = json.loads((tmp_path / "B" / "metrics.json").read_text())
    assert report["status"] == "interrupted" and report["signal"] == signum and report["step"] == step
    assert report["interrupted_checkpoint"] == str(saved)

    _train(make_cfg, [*_run_base(learnable_text), f"ckpt_path={saved}"], tmp_path / "C")
    resumed = _logged(tmp_path / "C")
    if during_validation:
        # the validation cut short at step N (logged at step N - 1, the last finished batch) ran again, in full,
        # and no training step was repeated
        redone = resumed.pop(step - 1)
        assert set(redone) == {"val/loss", "epoch"}
        assert redone["val/loss"] == pytest.approx(straight[step - 1]["val/loss"], rel=1e-6)
    _assert_same_steps(resumed, straight, range(step, 20))


def test_second_ctrl_c_stops_at_once_and_saves_nothing(make_cfg, learnable_text: Path, tmp_path: Path) -> None:
    with pytest.raises(RunInterrupted) as stopped:
        _train(make_cfg, [*_run_base(learnable_text), *_signal_at(8, "SIGINT", times=2)], tmp_path / "B")
    assert stopped.value.exit_code == 130 and "second Ctrl-C" in str(stopped.value)
    assert not (tmp_path / "B" / "checkpoints" / "interrupted.ckpt").exists()
    # the message points at what there is: the last.ckpt of the validation at step 5
    assert str(tmp_path / "B" / "checkpoints" / "last.ckpt") in str(stopped.value)


def test_signal_handlers_are_restored_after_training(make_cfg, learnable_text: Path, tmp_path: Path) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    _train(make_cfg, [*_run_base(learnable_text), "trainer.max_steps=3"], tmp_path / "A")
    with pytest.raises(RunInterrupted):
        _train(make_cfg, [*_run_base(learnable_text), *_signal_at(2)], tmp_path / "B")
    assert {s: signal.getsignal(s) for s in before} == before


# -- SLURM: the requeue signal saves, requeues, and the requeued job resumes its own run -----------------
def _fake_scontrol(folder: Path) -> Path:
    """An ``scontrol`` that records its arguments, put first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "scontrol.calls"
    tool = folder / "scontrol"
    tool.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return record


def test_slurm_requeue_signal_requeues_and_the_job_resumes_its_run(
    straight: dict[int, dict[str, float]],
    make_cfg,
    learnable_text: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = _fake_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    runs = tmp_path / "logs" / "train" / "runs"  # where the job's runs live: <log_dir>/<task_name>
    with pytest.raises(RunInterrupted) as stopped:
        _train(make_cfg, [*_run_base(learnable_text), *_signal_at(12, "SIGUSR1")], runs / "first")
    assert "requeued SLURM job 4242" in str(stopped.value)
    assert record.read_text().split() == ["requeue", "4242"]

    # SLURM starts the same command again, with the restart counted: no ckpt_path needed
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _train(make_cfg, _run_base(learnable_text), runs / "second")
    _assert_same_steps(_logged(runs / "second"), straight, range(12, 20))


# -- a hard kill loses at most the clock interval ----------------------------------------------------------
def test_periodic_checkpoint_between_validations_resumes_exactly(
    straight: dict[int, dict[str, float]],
    make_cfg,
    learnable_text: Path,
    tmp_path: Path,
) -> None:
    # every 0.001 minutes (60 ms): last.ckpt is rewritten between batches; keep the step-13 one
    base = [*_run_base(learnable_text), "callbacks.periodic_checkpoint.every_minutes=0.001"]
    keep = [
        f"+callbacks.keep._target_={__name__}.CopyLastAt",
        "+callbacks.keep.step=13",
        f"+callbacks.keep.to={tmp_path / 'kept.ckpt'}",
    ]
    _train(make_cfg, [*base, *keep], tmp_path / "B")
    assert not list((tmp_path / "B" / "checkpoints").glob("last-v*.ckpt")), "one last.ckpt, not versions of it"
    kept = torch.load(tmp_path / "kept.ckpt", weights_only=True)
    assert kept["global_step"] == 13, "written as step 14 starts, between the validations at 10 and 15"
    _train(make_cfg, [*_run_base(learnable_text), f"ckpt_path={tmp_path / 'kept.ckpt'}"], tmp_path / "C")
    _assert_same_steps(_logged(tmp_path / "C"), straight, range(13, 20))


class CopyLastAt(L.Callback):
    """Copies ``last.ckpt`` as it is when the batch after ``step`` starts (after the periodic save there)."""

    def __init__(self, step: int, to: str) -> None:
        self.step, self.to = step, Path(to)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step - 1:
            time.sleep(0.08)  # past the interval: the periodic save of the next batch start is due
        if trainer.global_step == self.step:
            self.to.write_bytes((Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt").read_bytes())


# -- as a user or a scheduler meets it: the console script -------------------------------------------------
@pytest.mark.slow
def test_console_train_stopped_by_sigterm_exits_143_and_says_how_to_resume(tmp_path: Path) -> None:
    text = tmp_path / "input.txt"
    text.write_text("the red cat sat on the blue mat.\n" * 600, encoding="utf-8")
    command = Command(
        [
            script("lmlab-train"),
            "data=text_files",
            f"data.source.train_files={text}",
            "trainer.max_steps=100000",
            "trainer.val_check_interval=20",
            "model.n_layer=1",
            "data.block_size=32",
            "data.batch_size=8",
        ],
        tmp_path,
        "train",
    )
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("logs/train/runs/*/checkpoints/last.ckpt")):
        assert command.proc.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.5)
    command.proc.send_signal(signal.SIGTERM)
    command.wait()
    assert command.returncode == 143, command.stderr[-2000:]
    stopped = [line for line in command.stderr.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and "interrupted.ckpt" in stopped[0] and "ckpt_path=" in stopped[0]
    assert "Traceback" not in command.stderr
    assert list(tmp_path.glob("logs/train/runs/*/checkpoints/interrupted.ckpt"))
