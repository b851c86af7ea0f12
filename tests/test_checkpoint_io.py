"""Torn and stale checkpoints: a kill during a save leaves the previous file whole and no temporary file
after the next start; ``ckpt_path=last`` takes the newest checkpoint that loads; a best checkpoint is chosen on
the score of its own weights."""

from __future__ import annotations

import csv
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import torch

from conftest import FAST
from lmlab.run.checkpoint_io import AtomicCheckpointIO, remove_stale_temporaries, write_atomically
from lmlab.run.safe_output import temporary_name
from lmlab.train import resolve_ckpt_path, train

WRITER = """
import sys, torch
from lmlab.run.checkpoint_io import write_atomically
write_atomically({"version": 1, "w": torch.zeros(4)}, sys.argv[1])
print("first", flush=True)
write_atomically({"version": 2, "w": torch.randn(120_000_000)}, sys.argv[1])  # ~480 MB: seconds to write
"""


def test_kill_during_a_save_keeps_the_previous_checkpoint_whole(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    path, tmpdir = folder / "last.ckpt", tmp_path / "tmpdir"
    tmpdir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "first"
    partial = temporary_name(path).name.replace(str(os.getpid()), str(proc.pid))
    deadline = time.monotonic() + 60
    while not (folder / partial).exists() or (folder / partial).stat().st_size < 1_000_000:
        assert time.monotonic() < deadline and proc.poll() is None, "the second save never started"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert torch.load(path, weights_only=True)["version"] == 1, "the destination was touched before the rename"
    assert (folder / partial).exists(), "a killed writer leaves its temporary file"
    assert not list(tmpdir.iterdir()), "nothing is written to $TMPDIR"
    assert remove_stale_temporaries(tmp_path) == [folder / partial]
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]


def test_temporaries_of_live_processes_are_kept(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    live = temporary_name(folder / "last.ckpt")  # this process: alive
    live.write_bytes(b"being written")
    assert remove_stale_temporaries(tmp_path) == [] and live.exists()


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "a" / "x.ckpt"
    write_atomically({"v": 1}, path)
    write_atomically({"v": 2}, path)
    assert torch.load(path, weights_only=True) == {"v": 2}
    assert [p.name for p in path.parent.iterdir()] == ["x.ckpt"]


def test_trainer_from_config_writes_checkpoints_atomically(make_cfg) -> None:
    cfg = make_cfg([])
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# -- ckpt_path=last -----------------------------------------------------------------------------------------
def _fast(text: Path, *extra: str) -> list[str]:
    return [*(f"++{o}" for o in FAST), "data=text_files", f"data.source.train_files={text}", "test=false", *extra]


def test_ckpt_path_last_skips_a_torn_last_ckpt(
    make_cfg, learnable_text: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "logs" / "train" / "runs" / "r1"
    train(
        make_cfg(
            _fast(
                learnable_text,
                "trainer.max_steps=10",
                "trainer.val_check_interval=5",
                "callbacks.model_checkpoint.save_top_k=2",
            ),
            run_dir=run,
        )
    )
    folder = run / "checkpoints"
    torn = folder / "last.ckpt"
    torn.write_bytes(torn.read_bytes()[:1000])  # what a kill mid-copy left
    (folder / "interrupted.ckpt").write_bytes(b"")  # and an empty one, newer still
    newest_good = max(folder.glob("step_*.ckpt"), key=lambda p: torch.load(p, weights_only=True)["global_step"])
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        assert resolve_ckpt_path(make_cfg(["ckpt_path=last"])) == str(newest_good)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(torn) in warned and str(folder / "interrupted.ckpt") in warned


def test_ckpt_path_last_with_nothing_loadable_is_one_clear_error(make_cfg, tmp_path: Path) -> None:
    folder = tmp_path / "logs" / "train" / "runs" / "r1" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"")
    from lmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="no checkpoint that loads"):
        resolve_ckpt_path(make_cfg(["ckpt_path=last"]))


# -- scores attach to the weights they were computed on --------------------------------------------------
def test_best_checkpoint_is_scored_by_the_validation_of_its_own_weights(
    make_cfg, learnable_text: Path, tmp_path: Path
) -> None:
    # saves due every 3 steps, validations every 5: Lightning would save step 6 with step 5's score
    train(
        make_cfg(
            _fast(
                learnable_text,
                "trainer.max_steps=30",
                "trainer.val_check_interval=5",
                "callbacks.model_checkpoint.every_n_train_steps=3",
                "callbacks.model_checkpoint.save_top_k=3",
                "trainer.log_every_n_steps=1",
                "data.batch_size=4",
            ),
            run_dir=tmp_path / "run",
        )
    )
    with (tmp_path / "run" / "csv" / "metrics.csv").open() as f:
        # the validation after training step s is logged at step s - 1
        val_ppl = {int(r["step"]) + 1: float(r["val/ppl"]) for r in csv.DictReader(f) if r.get("val/ppl")}
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    state = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert len(state["best_k_models"]) == 3
    for path, score in state["best_k_models"].items():
        step = torch.load(path, weights_only=True)["global_step"]
        assert step in val_ppl, f"{path} holds step {step}, which no validation scored"
        assert float(score) == pytest.approx(val_ppl[step], rel=1e-6), f"{path} carries another step's score"
    assert float(state["best_model_score"]) == pytest.approx(min(val_ppl.values()), rel=1e-6)
