"""Weights & Biases logging, offline: each run writes its own offline run under its output folder with the
run's config and metrics, and the runs of one multirun share a group named after the sweep folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from conftest import FAST
from lmlab.config import config_dir
from lmlab.train import train

pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

FAST_OVERRIDES = [f"++{o}" for o in FAST]
TIMEOUT_S = 300


@pytest.fixture(autouse=True)
def _wandb_offline_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, and W&B's own config, cache and artifact staging folders under ``tmp_path``."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / sub))


# -- reading an offline run ---------------------------------------------------------------------------
def _records(path: Path) -> list[Any]:
    """The records of a ``run-<id>.wandb`` file: a LevelDB-style log (32 KiB blocks, 7-byte record headers:
    checksum, length, type) after a 7-byte ``:W&B`` header, each record a ``wandb_internal.Record``."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


class OfflineRun:
    """What an offline run holds: its group, config, history rows, summary, and whether it finished."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.group = ""
        self.config: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self.finished = False
        for record in _records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.group = record.run.run_group
                self.config.update(_items(record.run.config.update))
            elif kind == "config":
                self.config.update(_items(record.config.update))
            elif kind == "history":
                self.history.append(_items(record.history.item))
            elif kind == "summary":
                self.summary.update(_items(record.summary.update))
            elif kind == "exit":
                self.finished = True


def _items(items: Any) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _offline_run(output_dir: Path, settle_s: float = 10.0) -> OfflineRun:
    """The run's records; the W&B service process may flush the last ones (the exit record) shortly after
    ``wandb.finish()`` returns, so an unfinished run is read again for up to ``settle_s`` seconds."""
    runs = list((output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {output_dir / 'wandb'}, found {runs}"
    deadline = time.monotonic() + settle_s
    run = OfflineRun(runs[0])
    while not run.finished and time.monotonic() < deadline:
        time.sleep(0.2)
        run = OfflineRun(runs[0])
    return run


# -- tests -------------------------------------------------------------------------------------------
def test_offline_run_holds_config_and_metrics(make_cfg, learnable_text: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = make_cfg(
        [
            *FAST_OVERRIDES,
            "logger=wandb",
            "data=text_files",
            f"data.source.train_files={learnable_text}",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "trainer.log_every_n_steps=1",
            "model.n_head=2",
            "optimizer.lr=0.0025",
            "test=false",
        ],
        run_dir=run_dir,
    )
    train(cfg)

    run = _offline_run(run_dir)
    assert run.finished, "the W&B run was not finished when train() returned"
    assert run.group == ""  # a single run has no sweep group
    # the whole composed config, and the task's hyperparameters
    assert run.config["config"]["model"]["n_layer"] == 1
    assert run.config["config"]["model"]["n_head"] == 2
    assert run.config["config"]["optimizer"]["lr"] == 0.0025
    assert run.config["config"]["paths"]["output_dir"] == str(run_dir)
    assert run.config["model"]["n_layer"] == 1
    assert run.config["data_info"]["vocab_size"] > 0
    # metrics: every training step, and validation at steps 3 and 6
    assert sum("train/loss" in row for row in run.history) == 6
    val_ppl = [row["val/ppl"] for row in run.history if "val/ppl" in row]
    assert len(val_ppl) == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert run.summary["val/ppl"] == pytest.approx(metrics["val/ppl"]) == pytest.approx(val_ppl[-1])
    assert run.summary["samples/_type"] == "table-file"  # text samples went to W&B as a table


def test_multirun_jobs_get_own_runs_grouped_by_sweep_folder(learnable_text: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "my_sweep"
    args = [
        "-m",
        "optimizer.lr=1e-3,2e-3",
        "logger=wandb",
        "data=text_files",
        f"data.source.train_files={learnable_text}",
        "data.block_size=16",
        "data.batch_size=8",
        "model.n_layer=1",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        "callbacks.rich_progress_bar=null",
        "callbacks.rich_model_summary=null",
        "callbacks.samples.max_new_tokens=5",
        "print_config=false",
        "test=false",
        f"paths.root_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "lmlab.train", *args],
        cwd=tmp_path,
        env=dict(os.environ),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]

    runs = [_offline_run(sweep / job) for job in ("0", "1")]  # each job its own run, in its own folder
    assert runs[0].folder.name != runs[1].folder.name
    for run, lr in zip(runs, (1e-3, 2e-3), strict=True):
        assert run.finished
        assert run.group == "my_sweep"
        assert run.config["config"]["optimizer"]["lr"] == lr
        assert run.config["config"]["logger"]["wandb"]["group"] == "my_sweep"
        assert "val/ppl" in run.summary


@pytest.fixture
def hydra_mode(tmp_path: Path):
    """Compose the train config with W&B in a given Hydra mode, as the job would see it."""

    def _compose(mode: str) -> Any:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(
                config_name="train",
                return_hydra_config=True,
                overrides=[
                    "logger=wandb",
                    f"paths.root_dir={tmp_path}",
                    f"hydra.mode={mode}",
                    f"hydra.sweep.dir={tmp_path}/multiruns/2024-01-02_03-04-05",
                ],
            )
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None


def test_sweep_group_resolver_names_the_sweep_folder_in_a_multirun(hydra_mode) -> None:
    assert hydra_mode("MULTIRUN").logger.wandb.group == "2024-01-02_03-04-05"


def test_sweep_group_resolver_is_empty_for_a_single_run(hydra_mode) -> None:
    assert hydra_mode("RUN").logger.wandb.group is None


def test_sweep_group_resolver_without_hydra() -> None:
    from omegaconf import OmegaConf

    HydraConfig.instance().cfg = None
    assert OmegaConf.create({"group": "${sweep_group:}"}).group is None
