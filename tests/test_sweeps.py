"""Hydra multiruns: a grid sweep and an Optuna search from the command line, each job in its own folder
of the sweep folder, and the ranked ``summary.csv`` that :mod:`lmlab.run.sweep` writes after the sweep."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmlab.run.sweep import collect_runs, write_summary

pytestmark = pytest.mark.slow

TIMEOUT_S = 300


def _tiny(text: Path, root: Path) -> list[str]:
    """Command-line overrides for a run of a few seconds; everything it writes goes under ``root``."""
    return [
        "data=text_files",
        f"data.source.train_files={text}",
        "data.block_size=16",
        "data.batch_size=8",
        "model.n_layer=1",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2",
        "trainer.num_sanity_val_steps=0",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        "callbacks.rich_progress_bar=null",
        "callbacks.rich_model_summary=null",
        "callbacks.samples.max_new_tokens=5",
        "print_config=false",
        f"paths.root_dir={root}",
    ]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
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


def _summary(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "summary.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir())


def _assert_ranked(rows: list[dict[str, str]], sweep: Path, metric: str = "val/ppl") -> None:
    """Rows are the sweep's jobs, best (lowest) first, each with the value its metrics.json reports."""
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    values = [float(r[metric]) for r in rows]
    assert values == sorted(values)
    assert {Path(r["run_dir"]) for r in rows} == set(_job_dirs(sweep))
    for row in rows:
        record = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert record["optimized_metric"] == metric and record["mode"] == "min"
        assert float(row[metric]) == pytest.approx(record["value"])
        assert row["overrides"] == " ".join(record["overrides"])


# -- end to end -------------------------------------------------------------------------------------
def test_grid_multirun_writes_one_folder_per_job_and_ranked_summary(learnable_text: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _cli(
        [
            "-m",
            "model=gpt,lstm",
            "optimizer.lr=1e-3,3e-3",
            *_tiny(learnable_text, tmp_path),
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )

    jobs = _job_dirs(sweep)
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    combos = set()
    for job in jobs:
        record = json.loads((job / "metrics.json").read_text())
        assert math.isfinite(record["value"])
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert Path(record["best_checkpoint"]).parent == job / "checkpoints"
        assert Path(record["best_checkpoint"]).is_file()
        swept = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in record["overrides"]}
        combos.add((swept["model"], float(swept["optimizer.lr"])))
    assert combos == {(m, lr) for m in ("gpt", "lstm") for lr in (1e-3, 3e-3)}
    assert not (tmp_path / "logs").exists(), "a job wrote outside the sweep folder"

    rows = _summary(sweep)
    assert len(rows) == 4
    _assert_ranked(rows, sweep)


def test_optuna_search_runs_trials_and_writes_summary(learnable_text: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "optuna"
    _cli(
        [
            "hparams_search=lm_optuna",
            "hydra.sweeper.n_trials=3",
            *_tiny(learnable_text, tmp_path),
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )

    assert [p.name for p in _job_dirs(sweep)] == ["0", "1", "2"]
    rows = _summary(sweep)
    assert len(rows) == 3
    _assert_ranked(rows, sweep)

    # every trial sampled from the search space of conf/hparams_search/lm_optuna.yaml
    lrs = set()
    for job in _job_dirs(sweep):
        swept = dict(o.split("=", 1) for o in json.loads((job / "metrics.json").read_text())["overrides"])
        lr = float(swept["optimizer.lr"])
        assert 1e-4 <= lr <= 1e-2
        assert float(swept["model.dropout"]) in {0.0, 0.1, 0.2}
        assert float(swept["optimizer.weight_decay"]) in {0.0, 0.1}
        lrs.add(lr)
    assert len(lrs) == 3, "each trial should try a different learning rate"

    # Optuna's best trial is the summary's first row
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(float(rows[0]["val/ppl"]))
    assert results["best_params"]["optimizer.lr"] == pytest.approx(
        float(dict(o.split("=", 1) for o in rows[0]["overrides"].split())["optimizer.lr"])
    )


# -- ranking logic on fabricated runs -------------------------------------------------------------------
def _fake_run(
    sweep: Path,
    name: str,
    value: Any,
    mode: str = "min",
    metric: str = "val/ppl",
    extra: dict[str, float] | None = None,
) -> Path:
    job = sweep / name
    job.mkdir(parents=True)
    metrics = {metric: value, "train/loss": 1.0, **(extra or {})}
    (job / "metrics.json").write_text(
        json.dumps(
            {
                "optimized_metric": metric,
                "mode": mode,
                "value": value,
                "metrics": metrics,
                "best_checkpoint": None,
                "overrides": [f"optimizer.lr={name}"],
            }
        )
    )
    return job


def test_write_summary_min_mode_ranks_ascending_and_failed_runs_last(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _fake_run(sweep, "0", None)  # a run whose metric was NaN: metrics.json holds null
    _fake_run(sweep, "1", 7.5, extra={"val/loss": 2.0, "test/ppl": 8.0})
    _fake_run(sweep, "2", 3.25, extra={"val/loss": 1.2})
    _fake_run(sweep, "3", 12.0)
    (sweep / "4").mkdir()  # a job that crashed before writing metrics.json
    runs = write_summary(sweep)

    assert [Path(r["run_dir"]).name for r in runs] == ["2", "1", "3", "0"]
    rows = _summary(sweep)
    assert list(rows[0]) == ["rank", "overrides", "val/ppl", "test/ppl", "val/loss", "run_dir"]
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["val/ppl"] for r in rows] == ["3.25", "7.5", "12.0", ""]
    assert [r["overrides"] for r in rows] == ["optimizer.lr=2", "optimizer.lr=1", "optimizer.lr=3", "optimizer.lr=0"]
    assert rows[1]["test/ppl"] == "8.0" and rows[0]["test/ppl"] == ""  # missing metrics stay empty
    assert rows[0]["val/loss"] == "1.2" and Path(rows[0]["run_dir"]) == sweep / "2"


def test_write_summary_max_mode_ranks_descending_and_failed_runs_last(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _fake_run(sweep, "0", 0.61, mode="max", metric="val/acc")
    _fake_run(sweep, "1", None, mode="max", metric="val/acc")
    _fake_run(sweep, "2", 0.93, mode="max", metric="val/acc")
    _fake_run(sweep, "3", 0.05, mode="max", metric="val/acc")
    runs = write_summary(sweep)

    assert [Path(r["run_dir"]).name for r in runs] == ["2", "0", "3", "1"]
    rows = _summary(sweep)
    assert list(rows[0])[:3] == ["rank", "overrides", "val/acc"]
    assert [r["val/acc"] for r in rows] == ["0.93", "0.61", "0.05", ""]


def test_collect_runs_treats_nan_value_as_failed(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _fake_run(sweep, "0", float("nan"))  # json.dumps writes NaN, json.loads reads it back
    _fake_run(sweep, "1", 4.0)
    assert [Path(r["run_dir"]).name for r in collect_runs(sweep)] == ["1", "0"]


def test_write_summary_without_finished_runs_writes_nothing(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    assert write_summary(sweep) == []
    assert not (sweep / "summary.csv").exists()
