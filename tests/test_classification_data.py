"""The classification data module: label sets from strings, integers and declared class names, padded
batches, truncation and empty texts counted, and bad label columns and label sets named with their file."""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import pytest

from conftest import CUES, write_labeled
from lmlab.data.classification import ClassificationDataModule
from lmlab.data.tables import TableFiles
from lmlab.errors import DataError
from lmlab.tokenizers import train_word


def _datamodule(folder: Path, cache: Path, **kwargs) -> ClassificationDataModule:
    files = {"val_files": str(folder / "val.jsonl"), "test_files": str(folder / "test.jsonl")}
    files.update(kwargs.pop("files", {}))
    source = TableFiles(str(folder / "train.jsonl"), {"text": "text", "label": "label"}, **files)
    dm = ClassificationDataModule(source, partial(train_word, vocab_size=500), cache_dir=str(cache), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


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
