"""Data-parallel training with two CPU processes (gloo), alone and inside a Hydra multirun, where the
worker processes must run the job they belong to and write into its folder only."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="torch.distributed with the gloo backend is not available",
    ),
    pytest.mark.slow,
]

from test_sweeps import _tiny  # noqa: E402

TIMEOUT_S = 300


def _ddp_args(text: Path, root: Path) -> list[str]:
    return ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *_tiny(text, root)]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lmlab.train", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"lmlab.train failed ({proc.returncode}):\n{proc.stdout[-6000:]}"
    return proc


def _outputs(root: Path) -> set[Path]:
    """Top-level entries under ``root`` other than the token cache and the test's own input text."""
    return {p for p in root.iterdir() if p.name not in {".cache", "learnable.txt"}}


def _assert_one_finished_job(job: Path) -> None:
    """One job of two processes: rank 0's report and checkpoints, the worker's log beside it."""
    record = json.loads((job / "metrics.json").read_text())
    assert math.isfinite(record["value"]) and record["optimized_metric"] == "val/ppl"
    assert (job / "checkpoints" / "last.ckpt").is_file()
    assert Path(record["best_checkpoint"]).parent == job / "checkpoints"
    assert not (job / "checkpoints" / "interrupted.ckpt").exists()
    ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert (job / "train_rank1.log").is_file(), "the rank-1 worker did not run this job in this folder"


def test_ddp_two_cpu_processes(learnable_text: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = _cli([*_ddp_args(learnable_text, tmp_path), f"hydra.run.dir={run_dir}"], cwd=tmp_path).stdout
    assert "distributed_backend=gloo" in out
    assert "Starting with 2 processes" in out

    _assert_one_finished_job(run_dir)
    assert _outputs(tmp_path) == {run_dir}, "a process wrote outside its run folder"
    assert len(list(tmp_path.rglob("metrics.json"))) == 1  # written by rank 0 only


def test_ddp_inside_multirun_keeps_each_job_in_its_sweep_folder(learnable_text: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _cli(
        ["-m", "optimizer.lr=1e-3,2e-3", *_ddp_args(learnable_text, tmp_path), f"hydra.sweep.dir={sweep}"], cwd=tmp_path
    )

    assert _outputs(tmp_path) == {sweep}, "a worker process wrote a run folder of its own"
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml", "summary.csv"]
    for job, lr in (("0", 1e-3), ("1", 2e-3)):
        _assert_one_finished_job(sweep / job)
        assert f"optimizer.lr={lr:g}" in json.loads((sweep / job / "metrics.json").read_text())["overrides"]
    assert len(list(tmp_path.rglob("metrics.json"))) == 2
