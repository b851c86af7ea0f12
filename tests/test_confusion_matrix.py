"""The confusion-matrix callback: what reaches the CSV, TensorBoard and W&B loggers, and when."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassConfusionMatrix

from lmlab.training.callbacks import ConfusionMatrixLogger, confusion_matrix_figure

wandb = pytest.importorskip("wandb")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

LABELS = ["ant", "bee", "cat"]
TARGETS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
PREDS = torch.tensor([0, 0, 1, 2, 1, 1, 0, 2, 2, 2, 1, 0])


def _expected(num_classes: int) -> np.ndarray:
    """The counts computed independently of torchmetrics: rows true class, columns predicted."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (TARGETS.numpy(), PREDS.numpy()), 1)
    return counts


class FixedPredictions(L.LightningModule):
    """Trains a throwaway linear layer; its evaluation "predictions" are fixed, so the matrix is known."""

    def __init__(self, labels: list[str]) -> None:
        super().__init__()
        self.labels = labels
        self.layer = nn.Linear(2, 1)
        self.confusion = nn.ModuleDict({s: MulticlassConfusionMatrix(len(labels)) for s in ("val", "test")})
        self.confusion_matrices: dict[str, torch.Tensor] = {}

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.confusion["val"].update(*batch)

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.confusion["test"].update(*batch)

    def on_validation_epoch_end(self) -> None:
        self.confusion_matrices["val"] = self.confusion["val"].compute().cpu()
        self.confusion["val"].reset()

    def on_test_epoch_end(self) -> None:
        self.confusion_matrices["test"] = self.confusion["test"].compute().cpu()
        self.confusion["test"].reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _train_loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)


def _eval_loader() -> DataLoader:
    return DataLoader(TensorDataset(PREDS, TARGETS), batch_size=4)


def _read_csv(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with path.open(newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    return header, [row[0] for row in rows], np.array([[int(x) for x in row[1:]] for row in rows])


def _tb_image_tags(folder: Path) -> dict[str, list[int]]:
    """The image summaries in TensorBoard's event files, as tag -> steps."""
    tags: dict[str, list[int]] = {}
    for events in folder.rglob("events.out.tfevents.*"):
        acc = event_accumulator.EventAccumulator(str(events), size_guidance={event_accumulator.IMAGES: 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            tags.setdefault(tag, []).extend(image.step for image in acc.Images(tag))
    return tags


def _fit(
    tmp_path: Path, labels: list[str], callback: ConfusionMatrixLogger, **trainer_kwargs: Any
) -> tuple[L.Trainer, FixedPredictions, list[dict[str, Any]]]:
    """Fits with CSV, TensorBoard and offline W&B loggers; returns what reached W&B's ``log_metrics``."""
    loggers = [
        CSVLogger(tmp_path, name="csv", version=""),
        TensorBoardLogger(tmp_path, name="tb", version=""),
        WandbLogger(save_dir=str(tmp_path), offline=True),
    ]
    logged: list[dict[str, Any]] = []
    log_metrics = loggers[2].log_metrics

    def spy(metrics: dict[str, Any], step: int | None = None) -> None:
        logged.append({**metrics, "step": step})
        log_metrics(metrics, step=step)

    loggers[2].log_metrics = spy
    model = FixedPredictions(labels)
    trainer = L.Trainer(
        max_steps=2,
        logger=loggers,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        log_every_n_steps=1,
        **trainer_kwargs,
    )
    trainer.fit(model, _train_loader(), _eval_loader())
    return trainer, model, logged


@pytest.fixture(autouse=True)
def _wandb_home_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """W&B offline, with its own config, cache and staging folders under ``tmp_path``; the run finished after."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / sub))
    yield
    wandb.finish()


def test_torchmetrics_matrix_matches_numpy() -> None:
    matrix = MulticlassConfusionMatrix(3)(PREDS, TARGETS)
    assert matrix.dtype == torch.int64
    np.testing.assert_array_equal(matrix.numpy(), _expected(3))


def test_each_validation_reaches_csv_tensorboard_and_wandb(tmp_path: Path) -> None:
    trainer, _, logged = _fit(tmp_path, LABELS, ConfusionMatrixLogger(), val_check_interval=1, num_sanity_val_steps=0)
    folder = tmp_path / "csv" / "confusion_matrix"
    assert sorted(p.name for p in folder.iterdir()) == ["val_latest.csv", "val_step000001.csv", "val_step000002.csv"]
    for name in ("val_step000001.csv", "val_step000002.csv", "val_latest.csv"):
        header, rows, counts = _read_csv(folder / name)
        assert header == ["true\\pred", *LABELS] and rows == LABELS
        np.testing.assert_array_equal(counts, _expected(3))

    assert _tb_image_tags(tmp_path / "tb") == {"val/confusion_matrix": [1, 2]}

    records = [r for r in logged if "val/confusion_matrix_table" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(isinstance(r["val/confusion_matrix"], wandb.Image) for r in records)
    table = records[-1]["val/confusion_matrix_table"]
    assert table.columns == ["true", "predicted", "count"]
    assert table.data == [[t, p, int(_expected(3)[i, j])] for i, t in enumerate(LABELS) for j, p in enumerate(LABELS)]
    run_dir = Path(trainer.loggers[2].experiment.dir)
    assert list(run_dir.glob("media/images/val/confusion_matrix_*.png"))
    saved_table = next(run_dir.glob("media/table/val/confusion_matrix_table_*.table.json"))
    assert json.loads(saved_table.read_text())["data"] == table.data


def test_test_stage_is_logged_unless_left_out_of_stages(tmp_path: Path) -> None:
    trainer, model, _ = _fit(tmp_path, LABELS, ConfusionMatrixLogger(), val_check_interval=2, num_sanity_val_steps=0)
    trainer.test(model, _eval_loader(), verbose=False)
    _, _, counts = _read_csv(tmp_path / "csv" / "confusion_matrix" / "test_step000002.csv")
    np.testing.assert_array_equal(counts, _expected(3))
    assert "test/confusion_matrix" in _tb_image_tags(tmp_path / "tb")

    wandb.finish()
    val_only = tmp_path / "val_only"
    trainer, model, _ = _fit(
        val_only, LABELS, ConfusionMatrixLogger(stages=["val"]), val_check_interval=2, num_sanity_val_steps=0
    )
    trainer.test(model, _eval_loader(), verbose=False)
    assert "test" in model.confusion_matrices
    assert sorted(p.name for p in (val_only / "csv" / "confusion_matrix").iterdir()) == [
        "val_latest.csv",
        "val_step000002.csv",
    ]


def test_many_classes_get_csv_and_table_but_no_image(tmp_path: Path) -> None:
    labels = [f"class{i}" for i in range(5)]
    _, _, logged = _fit(
        tmp_path, labels, ConfusionMatrixLogger(max_classes_for_image=4), val_check_interval=2, num_sanity_val_steps=0
    )
    header, rows, counts = _read_csv(tmp_path / "csv" / "confusion_matrix" / "val_latest.csv")
    assert header[1:] == labels and rows == labels
    np.testing.assert_array_equal(counts, _expected(5))
    assert _tb_image_tags(tmp_path / "tb") == {}
    (record,) = [r for r in logged if "val/confusion_matrix_table" in r]
    assert "val/confusion_matrix" not in record


def test_nothing_is_logged_during_the_sanity_check(tmp_path: Path) -> None:
    _, model, logged = _fit(
        tmp_path,
        LABELS,
        ConfusionMatrixLogger(),
        num_sanity_val_steps=2,
        val_check_interval=1000,
        check_val_every_n_epoch=None,
    )
    assert "val" in model.confusion_matrices  # the sanity check did fill it
    assert not (tmp_path / "csv" / "confusion_matrix").exists()
    assert _tb_image_tags(tmp_path / "tb") == {}
    assert not [r for r in logged if any(k.startswith("val/confusion_matrix") for k in r)]


@pytest.mark.parametrize("normalize", [False, True])
def test_figure_carries_labels_title_and_cell_values(normalize: bool) -> None:
    matrix = torch.from_numpy(_expected(3))
    fig = confusion_matrix_figure(matrix, LABELS, "val confusion matrix, step 7", normalize=normalize)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == LABELS
    assert [t.get_text() for t in ax.get_yticklabels()] == LABELS
    assert ax.get_title() == "val confusion matrix, step 7"
    cells = [t.get_text() for t in ax.texts]
    expected = (matrix / matrix.sum(1, keepdim=True)).flatten() if normalize else matrix.flatten()
    assert cells == [f"{v:.2f}" if normalize else str(int(v)) for v in expected.tolist()]
    fig.canvas.draw()


def test_figure_leaves_out_cell_values_for_many_classes() -> None:
    labels = [f"c{i}" for i in range(21)]
    fig = confusion_matrix_figure(torch.eye(21, dtype=torch.int64), labels, "many")
    assert not fig.axes[0].texts
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == labels
