"""One training, one run: ``lmlab-train ckpt_path=last`` continues the run in its folder, with its config, its
CSV, TensorBoard and W&B histories continued; an override that would change the network is refused."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import QUIET, Command, script

pytestmark = pytest.mark.slow

#: a tiny run on the default data, every step logged, with all three loggers
RUN = [
    *QUIET,
    "logger=many",
    "model.n_layer=1",
    "data.block_size=32",
    "data.batch_size=8",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "test=false",
]
#: the columns both histories must agree on (timings and throughput differ between processes)
COMPARED = ("step", "epoch", "train/loss", "val/loss")


def _history(folder: Path) -> list[dict[str, str]]:
    with (folder / "csv" / "metrics.csv").open() as f:
        return [{key: row.get(key, "") for key in COMPARED} for row in csv.DictReader(f)]


def test_a_resumed_run_continues_in_its_folder_with_its_config_and_histories(tmp_path: Path) -> None:
    train = script("lmlab-train")
    (tmp_path / "straight").mkdir()
    (tmp_path / "stopped").mkdir()
    straight = Command([train, *RUN, "trainer.max_steps=8"], tmp_path / "straight", "straight")
    first = Command([train, *RUN, "trainer.max_steps=4"], tmp_path / "stopped", "first").wait()
    assert first.returncode == 0, first.stderr
    # continued without repeating its overrides, with a longer schedule
    resumed = Command([train, "ckpt_path=last", "trainer.max_steps=8"], tmp_path / "stopped", "resumed").wait()
    assert resumed.returncode == 0, resumed.stderr
    straight.wait()
    assert straight.returncode == 0, straight.stderr

    (run,) = (tmp_path / "stopped" / "logs" / "train" / "runs").iterdir()
    (reference,) = (tmp_path / "straight" / "logs" / "train" / "runs").iterdir()
    # its config: the first command's overrides, the new one on top
    config = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert config.model.n_layer == 1 and config.trainer.max_steps == 8 and config.logger.wandb is not None
    log = (run / "train.log").read_text()
    assert f"Continuing the run in {run}" in log and "Changed now: trainer.max_steps=8" in log
    for false_warning in ("not resumable", "exists and is not empty"):
        assert false_warning not in resumed.stdout + resumed.stderr
    # one history: the CSV of the two commands is that of the run made at once, with the validation that ended the
    # first command (at its last step, 3) besides
    history = _history(run)
    assert {row["step"] for row in history if row["val/loss"]} == {"2", "3", "5", "7"}
    assert [row for row in history if not (row["step"] == "3" and row["val/loss"])] == _history(reference)
    # the same W&B run, continued (offline: a folder per process, one run id)
    ids = {folder.name.rsplit("-", 1)[1] for folder in (run / "wandb").glob("offline-run-*")}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) >= 2  # in one folder: one history

    refused = Command([train, "ckpt_path=last", "model.n_layer=2"], tmp_path / "stopped", "refused").wait()
    assert refused.returncode == 1
    assert refused.stderr.count("error: ") == 1 and "Traceback" not in refused.stderr
    assert "model.n_layer: the run in" in refused.stderr and "would change its network" in refused.stderr
    assert OmegaConf.load(run / ".hydra" / "config.yaml").model.n_layer == 1, "the refused command changed the run"
