"""Translation data: sources (table files, aligned text files, nested translation columns), tokenizer
pairs, length limits, token-budget batches, and the errors bad input gets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from conftest import toy_translation, write_pairs
from lmlab.data.batching import TokenBudgetBatchSampler
from lmlab.data.tables import AlignedTextFiles, TableFiles
from lmlab.data.translation import TranslationDataModule
from lmlab.errors import DataError, TokenizerError
from lmlab.tokenizers import TokenizerPair, tokenizer_from_state, train_bpe, train_char, train_word


def _module(tmp_path: Path, source, **kwargs) -> TranslationDataModule:
    kwargs = {
        "tokenizer": lambda texts: train_word(texts, vocab_size=100),
        "max_tokens": 64,
        "max_source_length": 16,
        "max_target_length": 16,
        "cache_dir": str(tmp_path / "cache"),
        **kwargs,
    }
    datamodule = TranslationDataModule(source, **kwargs)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def _files(folder: Path, n: int = 200) -> TableFiles:
    return TableFiles(
        str(write_pairs(folder / "train.jsonl", n, 0)),
        {"src": "en", "tgt": "de"},
        val_files=str(write_pairs(folder / "val.jsonl", 20, 1)),
    )


def test_batches_pair_sources_with_their_targets(tmp_path: Path) -> None:
    datamodule = _module(tmp_path, _files(tmp_path))
    pair: TokenizerPair = datamodule.tokenizer
    eos, pad = pair.eos_id, pair.pad_id
    seen = 0
    for batch in datamodule.train_dataloader():
        for row in range(batch.src.size(0)):
            n = int(batch.src_lengths[row])
            src = batch.src[row, :n].tolist()
            assert src[-1] == eos and all(t == pad for t in batch.src[row, n:].tolist())
            target = [t for t in batch.tgt_out[row].tolist() if t != pad]
            assert target[-1] == eos and batch.tgt_in[row, 0] == eos
            assert batch.tgt_in[row, 1 : len(target)].tolist() == target[:-1]  # shifted by one
            assert pair.decode(target[:-1]) == toy_translation(pair.source.decode(src[:-1]))
            seen += 1
        assert batch.num_target_tokens == int((batch.tgt_out != pad).sum())
    assert seen == 200
    val = next(iter(datamodule.val_dataloader()))
    assert all(isinstance(r, str) and r for r in val.references)


def test_token_budget_batches_hold_every_pair_once_within_the_budget() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=500)
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=120, shuffle=True, seed=3)
    counts = set()
    for epoch in range(3):
        sampler.sampler.set_epoch(epoch)
        batches = list(sampler)
        counts.add(len(batches))
        assert sorted(i for b in batches for i in b) == list(range(500))
        assert all(len(b) * lengths[b].max() <= 120 for b in batches)
        assert len(batches) == len(sampler)
    assert len(counts) == 1, "the batch count must not change between epochs"
    sampler.sampler.set_epoch(0)
    first = list(sampler)
    sampler.sampler.set_epoch(1)
    assert list(sampler) != first, "the batches are reshuffled every epoch"
    # padding stays small: far fewer padded tokens than with random batches of the same count
    padded = sum(len(b) * lengths[b].max() for b in first)
    assert padded < 1.25 * lengths.sum()


def test_token_budget_shards_ranks_evenly() -> None:
    lengths = np.random.default_rng(1).integers(1, 30, size=301)
    shards = [list(TokenBudgetBatchSampler(lengths, 90, True, seed=0, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])
    ids = [i for shard in shards for b in shard for i in b]
    assert len(ids) == len(set(ids))


def test_joint_and_separate_vocabularies(tmp_path: Path) -> None:
    source = _files(tmp_path)
    joint = _module(tmp_path, source).data_info
    assert joint["shared_vocabulary"] and joint["src_vocab_size"] == joint["tgt_vocab_size"]
    separate = _module(tmp_path, source, joint_vocabulary=False)
    info = separate.data_info
    assert not info["shared_vocabulary"]
    pair = separate.tokenizer
    assert "katze" not in pair.source.vocabulary() and "katze" in pair.target.vocabulary()
    assert "cat" in pair.source.vocabulary() and "cat" not in pair.target.vocabulary()
    restored = tokenizer_from_state(json.loads(json.dumps(pair.state())))
    assert restored.fingerprint() == pair.fingerprint() and not restored.joint
    assert restored.source.encode("red cat") == pair.source.encode("red cat")


def test_aligned_text_files_read_line_by_line_and_skip_empty_pairs(tmp_path: Path, caplog) -> None:
    (tmp_path / "train.en").write_text("one cat\n\ntwo dogs\nred\n" * 10, encoding="utf-8")
    (tmp_path / "train.de").write_text("eine katze\nleer\nzwei hunde\n\n" * 10, encoding="utf-8")
    source = AlignedTextFiles({"src": str(tmp_path / "train.en"), "tgt": str(tmp_path / "train.de")}, val_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        datamodule = _module(tmp_path, source)
    splits = datamodule.meta["splits"]
    assert splits["train"]["pairs"] + splits["validation"]["pairs"] == 20
    assert splits["train"]["empty"] + splits["validation"]["empty"] == 20
    assert "with an empty side were left out" in caplog.text


def test_unaligned_files_name_both_files_and_their_line_counts(tmp_path: Path) -> None:
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "a.de").write_text("eins\nzwei\n", encoding="utf-8")
    source = AlignedTextFiles({"src": str(tmp_path / "a.en"), "tgt": str(tmp_path / "a.de")})
    with pytest.raises(DataError, match=r"not aligned: '.*a\.en' has 3 lines and '.*a\.de' has 2"):
        _module(tmp_path, source)


def test_a_language_pair_missing_from_the_data_names_the_setting(tmp_path: Path) -> None:
    path = write_pairs(tmp_path / "train.jsonl", 20, 0)
    with pytest.raises(DataError, match=r"Column 'fr' is not in .* \(columns: en, de\).*data\.target_lang"):
        _module(tmp_path, TableFiles(str(path), {"src": "en", "tgt": "fr"}))
    nested = tmp_path / "nested.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    nested.write_text("\n".join(json.dumps({"translation": r}) for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"'fr' is not a key of column 'translation'.*keys: de, en.*data\.target_lang"):
        _module(tmp_path, TableFiles(str(nested), {"src": "translation.en", "tgt": "translation.fr"}))
    ok = _module(
        tmp_path, TableFiles(str(nested), {"src": "translation.de", "tgt": "translation.en"}, val_fraction=0.1)
    )
    assert ok.meta["splits"]["train"]["pairs"] == 18


@pytest.mark.parametrize("overlong", ["truncate", "skip"])
def test_overlong_pairs_are_truncated_or_skipped_and_counted(tmp_path: Path, overlong: str, caplog) -> None:
    path = write_pairs(tmp_path / "train.jsonl", 100, 0, min_words=2, max_words=9)
    lengths = [len(json.loads(line)["en"].split()) for line in path.read_text().splitlines()]
    long = sum(n + 1 > 6 for n in lengths)
    assert 0 < long < 100
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        datamodule = _module(
            tmp_path,
            TableFiles(str(path), {"src": "en", "tgt": "de"}, val_fraction=0),
            max_source_length=6,
            max_target_length=6,
            overlong=overlong,
        )
    info = datamodule.meta["splits"]["train"]
    data = datamodule.datasets["train"]
    assert data.lengths("src").max() <= 6 and data.lengths("tgt").max() + 1 <= 6
    if overlong == "skip":
        assert info["skipped"] == long and info["pairs"] == 100 - long and "data.overlong=skip" in caplog.text
    else:
        assert info["truncated_source"] == long and info["pairs"] == 100 and "were cut" in caplog.text


def test_bad_settings_name_the_key(tmp_path: Path) -> None:
    source = _files(tmp_path, 30)
    with pytest.raises(DataError, match="data.overlong"):
        TranslationDataModule(source, train_bpe, overlong="drop")
    with pytest.raises(DataError, match="data.max_tokens=50 cannot hold"):
        TranslationDataModule(source, train_bpe, max_tokens=50, max_source_length=64)
    with pytest.raises(TokenizerError, match="no end-of-sentence or padding token.*tokenizer=bpe"):
        _module(tmp_path, source, tokenizer=train_char)


def test_a_tokenizer_pair_fingerprint_follows_both_sides() -> None:
    texts = ["one red cat", "zwei blaue hunde"] * 20
    small, large = train_bpe(texts, vocab_size=260), train_bpe(texts, vocab_size=300)
    fingerprints = {TokenizerPair(a, b).fingerprint() for a, b in ((small, large), (large, large), (large, small))}
    assert len(fingerprints) == 3
    assert TokenizerPair(large).fingerprint() != TokenizerPair(large, train_bpe(texts, vocab_size=300)).fingerprint()


def test_table_files_cut_validation_and_test_from_one_file(tmp_path: Path) -> None:
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps({"en": f"s{i}", "de": f"t{i}"}) + "\n" for i in range(200)))
    columns = {"src": "en", "tgt": "de"}
    splits = TableFiles(str(path), columns, val_fraction=0.1, test_fraction=0.15, split_seed=3).load()
    assert {name: len(table) for name, table in splits.items()} == {"train": 150, "validation": 20, "test": 30}
    seen = [set(table.columns["src"]) for table in splits.values()]
    assert set.union(*seen) == {f"s{i}" for i in range(200)} and sum(map(len, seen)) == 200, "disjoint, complete"
    # without a test share, validation is what it always was (the cache key and the split stay the same)
    before = TableFiles(str(path), columns, val_fraction=0.1, split_seed=3).load()
    assert before["validation"].columns == splits["validation"].columns and "test" not in before
    with pytest.raises(DataError, match="val_fraction \\+ test_fraction"):
        TableFiles(str(path), columns, val_fraction=0.6, test_fraction=0.5)


def test_the_former_side_names_source_and_target_still_read_with_a_warning(tmp_path: Path, caplog) -> None:
    """Configs and checkpoints from before the sides were ``src`` and ``tgt`` give the same data."""
    for lang in ("en", "de"):
        (tmp_path / f"train.{lang}").write_text("one cat\ntwo dogs\nred fox\n" * 10, encoding="utf-8")
    files = {"en": str(tmp_path / "train.en"), "de": str(tmp_path / "train.de")}
    new = _module(tmp_path / "new", AlignedTextFiles({"src": files["en"], "tgt": files["de"]}, val_fraction=0.2))
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        old = _module(
            tmp_path / "old", AlignedTextFiles({"source": files["en"], "target": files["de"]}, val_fraction=0.2)
        )
    assert "data.source.train names the translation sides source and target; they are now src and tgt" in caplog.text
    assert old.meta["splits"] == new.meta["splits"]
    assert next(iter(old.train_dataloader())).src.tolist() == next(iter(new.train_dataloader())).src.tolist()

    pairs = write_pairs(tmp_path / "pairs.jsonl", 40, 0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        table = _module(tmp_path / "table", TableFiles(str(pairs), {"source": "de", "target": "en"}, val_fraction=0.1))
    assert "data.source.columns names the translation sides" in caplog.text
    assert table.source.columns == {"src": "de", "tgt": "en"}
    with pytest.raises(DataError, match=r"data.source.train needs a file for \['tgt'\]"):
        AlignedTextFiles({"src": files["en"]})
