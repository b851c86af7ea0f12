"""Exact resume: a run that is stopped and resumed from its checkpoint logs the same training losses and
learning rates, step for step, as one that ran straight through (data position, RNG and schedule)."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import DictConfig

import lmlab.data.corpus as corpus
from conftest import FAST, cls_overrides, mt_overrides
from lmlab.train import train

# "++" sets a key whether or not conf/trainer/default.yaml already has it.
FAST_OVERRIDES = [f"++{o}" for o in FAST]
LR_KEY = "lr-AdamW/pg1"


class SimulatedCrash(RuntimeError):
    """Raised by :class:`CrashAtStep` in place of a killed process."""


class CrashAtStep(L.Callback):
    """Fails at the start of the optimizer step after ``step`` (``InterruptCheckpoint`` saves first)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            raise SimulatedCrash(f"simulated crash at step {self.step}")


def _base(text: Path, *extra: str) -> list[str]:
    return [
        *FAST_OVERRIDES,
        "data=text_files",
        f"data.source.train_files={text}",
        "model.dropout=0.1",  # dropout draws random numbers every step: the RNG state must resume too
        "trainer.log_every_n_steps=1",
        "test=false",
        *extra,
    ]


def _train(make_cfg: Callable[..., DictConfig], overrides: list[str], run_dir: Path) -> DictConfig:
    cfg = make_cfg(overrides, run_dir=run_dir)
    train(cfg)
    return cfg


def _logged(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per logged step: train/loss, the learning rate, the epoch and val/loss, from the CSV logger."""
    steps: dict[int, dict[str, float]] = {}
    with (run_dir / "csv" / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            entry = steps.setdefault(int(row["step"]), {})
            for key in ("train/loss", LR_KEY, "epoch", "val/loss"):
                if row.get(key):
                    entry[key] = float(row[key])
    return steps


def _assert_same_steps(
    resumed: dict[int, dict[str, float]], straight: dict[int, dict[str, float]], steps: range
) -> None:
    for step in steps:
        assert step in resumed, f"the resumed run logged nothing at step {step}"
        got, want = resumed[step], straight[step]
        # bit-for-bit equality is expected on one machine; allow float noise only
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-6, abs=1e-7), f"train/loss at step {step}"
        assert got[LR_KEY] == pytest.approx(want[LR_KEY], rel=1e-9), f"learning rate at step {step}"
        assert got["epoch"] == want["epoch"], f"epoch at step {step}"
        # validation at the same steps (a shifted schedule would also move checkpoints and early stopping)
        assert ("val/loss" in got) == ("val/loss" in want), f"validation after step {step} in one run only"
        if "val/loss" in want:
            assert got["val/loss"] == pytest.approx(want["val/loss"], rel=1e-6), f"val/loss at step {step}"
    assert min(resumed) == steps.start, "the resumed run repeated steps done before the checkpoint"


# -- stop at max_steps, continue with a larger max_steps ------------------------------------------
def test_resume_mid_epoch_from_last_ckpt_matches_uninterrupted(make_cfg, learnable_text: Path, tmp_path: Path) -> None:
    # batch_size 8: ~80 batches per epoch, so step 10 is mid-epoch. The schedule decays over a fixed
    # 20 steps (not over max_steps), so stopping at max_steps=10 does not change it.
    base = _base(
        learnable_text,
        "data.batch_size=8",
        "scheduler.warmup_steps=3",
        "scheduler.decay_steps=20",
        "trainer.val_check_interval=10",
    )
    _train(make_cfg, [*base, "trainer.max_steps=20"], tmp_path / "A")
    _train(make_cfg, [*base, "trainer.max_steps=10"], tmp_path / "B")
    last = tmp_path / "B" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 10
    _train(make_cfg, [*base, "trainer.max_steps=20", f"ckpt_path={last}"], tmp_path / "C")

    a, b, c = (_logged(tmp_path / name) for name in "ABC")
    assert {s["epoch"] for s in a.values() if "epoch" in s} == {0.0}, "expected one epoch: a mid-epoch stop"
    _assert_same_steps(b, a, range(0, 10))
    _assert_same_steps(c, a, range(10, 20))
    lrs = [a[s][LR_KEY] for s in range(20)]
    assert lrs[2] > lrs[10] > lrs[19], "the schedule should warm up, then decay within the run"


def test_resume_matches_uninterrupted_across_shard_boundaries(
    make_cfg, learnable_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # batches of 500 characters and shards of 1000 tokens: the training split is stored in about 20 shards,
    # so most training blocks of one epoch come from different shards and some span two
    monkeypatch.setattr(corpus, "BATCH_CHARS", 500)
    base = _base(
        learnable_text,
        "data.batch_size=8",
        "data.shard_tokens=1000",
        "scheduler.warmup_steps=3",
        "scheduler.decay_steps=20",
        "trainer.val_check_interval=10",
    )
    # B stops at step 8, between two scheduled validations: its last.ckpt is that of the final validation
    # a run ends with, which the straight run A never made at step 8
    straight = _train(make_cfg, [*base, "trainer.max_steps=16"], tmp_path / "A")
    _train(make_cfg, [*base, "trainer.max_steps=8"], tmp_path / "B")
    _train(
        make_cfg, [*base, "trainer.max_steps=16", f"ckpt_path={tmp_path / 'B/checkpoints/last.ckpt'}"], tmp_path / "C"
    )
    (meta,) = Path(straight.data.cache_dir).glob("*/meta.json")
    assert json.loads(meta.read_text())["splits"]["train"]["shards"] > 10
    _assert_same_steps(_logged(tmp_path / "C"), _logged(tmp_path / "A"), range(8, 16))


# -- a crash mid-run, resumed from the checkpoint of the crash or the newest last.ckpt --------------
# batch_size 96 gives 6 batches per epoch: 20 steps cross three epoch boundaries.
EPOCH = 6


@pytest.mark.parametrize(
    ("crash_at", "checkpoint"),
    [
        (EPOCH, "interrupted.ckpt"),  # right at the end of epoch 0
        (10, "interrupted.ckpt"),  # in the middle of epoch 1, after the validation at step 10
        (EPOCH, "last.ckpt"),  # saved by ModelCheckpoint at the last batch of epoch 0
        (10, "last.ckpt"),  # saved at step 10, before that step's validation (which the resumed run skips)
    ],
    ids=["epoch-end-interrupted", "mid-epoch-interrupted", "epoch-end-last", "before-validation-last"],
)
def test_resume_after_crash_matches_uninterrupted(
    make_cfg, learnable_text: Path, tmp_path: Path, crash_at: int, checkpoint: str
) -> None:
    # The cosine schedule decays over max_steps, as in a real run; the crashed run has the same max_steps.
    base = _base(
        learnable_text,
        "data.batch_size=96",
        "scheduler.warmup_steps=2",
        "trainer.max_steps=20",
        "trainer.val_check_interval=5",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.monitor=null",
    )
    _train(make_cfg, base, tmp_path / "A")
    crash = [f"+callbacks.crash._target_={__name__}.CrashAtStep", f"+callbacks.crash.step={crash_at}"]
    with pytest.raises(SimulatedCrash):
        _train(make_cfg, [*base, *crash], tmp_path / "B")
    ckpt = tmp_path / "B" / "checkpoints" / checkpoint
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == crash_at
    _train(make_cfg, [*base, f"ckpt_path={ckpt}"], tmp_path / "C")

    a, c = _logged(tmp_path / "A"), _logged(tmp_path / "C")
    assert {a[s]["epoch"] for s in range(20)} == {0.0, 1.0, 2.0, 3.0}
    _assert_same_steps(c, a, range(crash_at, 20))


# -- the other tasks' samplers (length buckets, token budgets) resume mid-epoch too ------------------------
@pytest.mark.parametrize("task", ["classification", "translation"])
def test_classification_and_translation_resume_mid_epoch_after_crash(
    task: str, make_cfg, labeled_dir: Path, pairs_dir: Path, tmp_path: Path
) -> None:
    # a few batches per epoch, so the crash at step 14 comes mid-epoch after an epoch boundary
    if task == "classification":
        small = ["model=bilstm", "model.hidden_size=32", "model.dropout=0.3", "data.batch_size=64"]
        overrides = cls_overrides(labeled_dir, *small)
    else:
        small = [
            "model.n_embd=32",
            "model.n_head=2",
            "model.encoder_layers=1",
            "model.decoder_layers=1",
            "model.dropout=0.1",
            "data.max_tokens=2048",
        ]
        overrides = mt_overrides(pairs_dir, *small)
    base = [
        *overrides,
        "trainer.max_steps=24",
        "trainer.val_check_interval=6",
        "trainer.log_every_n_steps=1",
        "test=false",
        "logger=csv",
    ]
    _train(make_cfg, base, tmp_path / "A")
    crash = [f"+callbacks.crash._target_={__name__}.CrashAtStep", "+callbacks.crash.step=14"]
    with pytest.raises(SimulatedCrash):
        _train(make_cfg, [*base, *crash], tmp_path / "B")
    _train(make_cfg, [*base, f"ckpt_path={tmp_path / 'B' / 'checkpoints' / 'interrupted.ckpt'}"], tmp_path / "C")

    a, c = _logged(tmp_path / "A"), _logged(tmp_path / "C")
    epochs = [a[s]["epoch"] for s in range(24)]
    assert epochs[13] == epochs[14] == epochs[15] >= 1.0, f"step 14 should lie inside a later epoch: {epochs}"
    _assert_same_steps(c, a, range(14, 24))


def test_ckpt_path_last_resumes_from_newest_last_ckpt(make_cfg, learnable_text: Path, tmp_path: Path) -> None:
    base = _base(
        learnable_text,
        "data.batch_size=8",
        "scheduler.warmup_steps=3",
        "scheduler.decay_steps=20",
        "trainer.val_check_interval=5",
    )
    runs = tmp_path / "logs" / "train" / "runs"  # where ckpt_path=last looks: <log_dir>/<task_name>
    _train(make_cfg, [*base, "trainer.max_steps=20"], tmp_path / "A")
    # an older run that stopped at step 5, then a newer one that stopped at step 10
    _train(make_cfg, [*base, "trainer.max_steps=5"], runs / "older")
    older = runs / "older" / "checkpoints" / "last.ckpt"
    past = time.time() - 3600
    os.utime(older, (past, past))
    _train(make_cfg, [*base, "trainer.max_steps=10"], runs / "newer")
    _train(make_cfg, [*base, "trainer.max_steps=20", "ckpt_path=last"], tmp_path / "C")

    # resumed from the newer run's step 10, not the older run's step 5
    a, c = _logged(tmp_path / "A"), _logged(tmp_path / "C")
    _assert_same_steps(c, a, range(10, 20))
