"""Language-modeling data: reading files, splits, errors that name the file, the token cache,
packed blocks, and the epoch sampler that makes resumed runs see the same batches."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmlab.data.lm import EpochBlockSampler, LMDataModule
from lmlab.data.storage import TokenShards
from lmlab.data.text_sources import TextFiles, TextSource, carve_splits
from lmlab.errors import DataError
from lmlab.tokenizers import CharTokenizer, train_bpe, train_char


def stored_tokens(cache: Path, split: str) -> np.ndarray:
    """Every id of a cached split, its shards joined."""
    shards = TokenShards(cache / split)
    return shards.read(0, len(shards))


def _text(n_lines: int, tag: str = "line") -> str:
    return "".join(f"{tag} {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(n_lines))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- TextFiles: formats ----------------------------------------------------------------------------
def test_txt_file_split_by_character_fractions(tmp_path: Path) -> None:
    text = _text(50)
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    splits = TextFiles(str(tmp_path / "a.txt"), val_fraction=0.1).load()
    cut = int(len(text) * 0.9)
    assert splits["train"] == text[:cut]
    assert splits["validation"] == text[cut:]
    assert "test" not in splits
    assert splits["train"] + splits["validation"] == text


def test_val_and_test_fractions_cut_from_the_end_in_order(tmp_path: Path) -> None:
    text = _text(100)
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    splits = TextFiles(str(tmp_path / "a.txt"), val_fraction=0.1, test_fraction=0.2).load()
    n = len(text)
    assert splits["train"] == text[: int(n * 0.7)]
    assert splits["validation"] == text[int(n * 0.7) : int(n * 0.8)]
    assert splits["test"] == text[int(n * 0.8) :]


def test_no_fractions_keeps_all_text_for_training(tmp_path: Path) -> None:
    text = _text(10)
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    splits = TextFiles(str(tmp_path / "a.txt"), val_fraction=0.0).load()
    assert splits == {"train": text}


@pytest.mark.parametrize(("val", "test"), [(1.0, 0.0), (-0.1, 0.0), (0.5, 0.5), (0.0, 1.2)])
def test_bad_fractions_raise(val: float, test: float) -> None:
    with pytest.raises(DataError, match="val_fraction"):
        carve_splits("abcdefghij", val, test)


def test_jsonl_csv_parquet_json_text_columns(tmp_path: Path) -> None:
    import datasets

    _write_jsonl(tmp_path / "a.jsonl", [{"body": "alpha one", "n": 1}, {"body": "beta two", "n": 2}])
    (tmp_path / "b.csv").write_text('n,body\n3,"gamma, three"\n4,delta four\n', encoding="utf-8")
    datasets.Dataset.from_dict({"body": ["epsilon five", "zeta six"], "n": [5, 6]}).to_parquet(
        str(tmp_path / "c.parquet")
    )
    (tmp_path / "d.json").write_text(json.dumps([{"body": "eta seven", "n": 7}]), encoding="utf-8")
    files = [str(tmp_path / n) for n in ("a.jsonl", "b.csv", "c.parquet", "d.json")]
    splits = TextFiles(files, text_column="body", join_with=" | ", val_fraction=0.0).load()
    assert splits["train"] == ("alpha one | beta two | gamma, three | delta four | epsilon five | zeta six | eta seven")


def test_glob_matches_files_in_sorted_order(tmp_path: Path) -> None:
    for name, body in [("b.txt", "second"), ("a.txt", "first"), ("c.md", "ignored")]:
        (tmp_path / name).write_text(body, encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.txt").write_text("nested", encoding="utf-8")
    source = TextFiles(str(tmp_path / "*.txt"), val_fraction=0.0)
    assert source.load()["train"] == "first\nsecond"
    recursive = TextFiles(str(tmp_path / "**" / "*.txt"), val_fraction=0.0)
    assert recursive.load()["train"] == "first\nsecond\nnested"


def test_explicit_val_and_test_files(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("training text", encoding="utf-8")
    _write_jsonl(tmp_path / "val.jsonl", [{"text": "val a"}, {"text": "val b"}])
    (tmp_path / "test.txt").write_text("test text", encoding="utf-8")
    source = TextFiles(
        str(tmp_path / "train.txt"),
        val_files=str(tmp_path / "val.jsonl"),
        test_files=[str(tmp_path / "test.txt")],
        val_fraction=0.1,
        test_fraction=0.1,
    )
    # explicit files win: nothing is carved from the training text
    assert source.load() == {"train": "training text", "validation": "val a\nval b", "test": "test text"}


def test_explicit_val_file_and_carved_test(tmp_path: Path) -> None:
    text = _text(20)
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    (tmp_path / "val.txt").write_text("validation", encoding="utf-8")
    splits = TextFiles(
        str(tmp_path / "train.txt"), val_files=str(tmp_path / "val.txt"), val_fraction=0.1, test_fraction=0.25
    ).load()
    assert splits["validation"] == "validation"
    assert splits["train"] == text[: int(len(text) * 0.75)]
    assert splits["test"] == text[int(len(text) * 0.75) :]


def test_fingerprint_changes_with_file_content_and_settings(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("some text", encoding="utf-8")
    before = TextFiles(str(path)).fingerprint()
    assert TextFiles(str(path)).fingerprint() == before
    assert TextFiles(str(path), val_fraction=0.2).fingerprint() != before
    path.write_text("some other text", encoding="utf-8")
    assert TextFiles(str(path)).fingerprint() != before


# -- TextFiles: bad input ----------------------------------------------------------------------------
def test_missing_file_names_file_and_key(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError) as info:
        TextFiles(str(missing)).load()
    assert str(missing) in str(info.value)
    assert "data.source.train_files" in str(info.value)


def test_missing_val_file_names_val_key(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text", encoding="utf-8")
    with pytest.raises(DataError) as info:
        TextFiles(str(tmp_path / "a.txt"), val_files=str(tmp_path / "val.txt")).load()
    assert "data.source.val_files" in str(info.value) and "val.txt" in str(info.value)


def test_glob_matching_nothing_names_pattern(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text", encoding="utf-8")
    pattern = str(tmp_path / "*.jsonl")
    with pytest.raises(DataError) as info:
        TextFiles(pattern).load()
    assert pattern in str(info.value)


def test_empty_train_files_list_raises() -> None:
    with pytest.raises(DataError, match="train_files"):
        TextFiles([])


@pytest.mark.parametrize("content", ["", "  \n\n\t"])
def test_empty_text_file_names_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    source = TextFiles(str(path))
    with pytest.raises(DataError) as info:
        source.load()
    assert str(path) in str(info.value) and "empty" in str(info.value)


def test_empty_jsonl_file_names_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(DataError) as info:
        TextFiles(str(path)).load()
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl"])
def test_non_utf8_file_names_file_and_byte(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b'{"text": "caf\xe9"}\n' if name.endswith(".jsonl") else b"caf\xe9")
    with pytest.raises(DataError) as info:
        TextFiles(str(path)).load()
    message = str(info.value)
    assert str(path) in message
    assert "UTF-8" in message and "0xe9" in message


def test_missing_text_column_lists_available_columns(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"body": "hello", "label": 1}])
    with pytest.raises(DataError) as info:
        TextFiles(str(path)).load()
    message = str(info.value)
    assert "'text'" in message and str(path) in message
    assert "body" in message and "label" in message


def test_missing_column_in_parquet_lists_columns(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict({"sentence": ["a b c"], "idx": [0]}).to_parquet(str(path))
    with pytest.raises(DataError) as info:
        TextFiles(str(path)).load()
    assert "sentence" in str(info.value) and "idx" in str(info.value) and str(path) in str(info.value)


# -- Tiny Shakespeare ------------------------------------------------------------------------------
def test_tiny_shakespeare_published_split_sizes(shared_data: Path) -> None:
    path = shared_data / "tiny_shakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip("tiny_shakespeare/input.txt is not in the shared data")
    splits = TextFiles(str(path), val_fraction=0.1).load()
    assert len(splits["train"]) == 1_003_854
    assert len(splits["validation"]) == 111_540
    assert splits["train"].endswith("But who comes here")
    assert splits["validation"].startswith("?\n\nGREMIO:\nGood morrow, neighb")


# -- LMDataModule: cache ------------------------------------------------------------------------
class CountingSource(TextSource):
    """A source that counts how often its text is loaded."""

    def __init__(self, text: str, name: str = "counting") -> None:
        self.text, self.name, self.loads = text, name, 0

    def load(self) -> dict[str, str]:
        self.loads += 1
        return carve_splits(self.text, 0.1, 0.0)

    def fingerprint(self) -> dict[str, Any]:
        return {"source": self.name, "text_len": len(self.text)}


def _datamodule(source: TextSource, cache: Path, tokenizer: Any = None, **kwargs: Any) -> LMDataModule:
    kwargs = {"block_size": 16, "batch_size": 4, "seed": 7, **kwargs}
    dm = LMDataModule(source, tokenizer or partial(train_char, unk=True), cache_dir=str(cache), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_cache_built_once_and_reused(tmp_path: Path) -> None:
    text = _text(40)
    first_source = CountingSource(text)
    first = _datamodule(first_source, tmp_path / "cache")
    assert first_source.loads == 1
    second_source = CountingSource(text)
    second = _datamodule(second_source, tmp_path / "cache")
    assert second_source.loads == 0
    assert second._cache == first._cache
    assert (second._cache / "DONE").is_file()
    assert second.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    assert second.meta == first.meta
    # exactly one entry, no leftover temporary folders
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first._cache.name]


def test_cache_contents_match_tokenized_splits(tmp_path: Path) -> None:
    text = _text(40)
    dm = _datamodule(CountingSource(text), tmp_path / "cache")
    splits = carve_splits(text, 0.1, 0.0)
    for split, part in splits.items():
        ids = stored_tokens(dm._cache, split)
        assert ids.tolist() == dm.tokenizer.encode(part)
        assert dm.meta["splits"][split] == {"tokens": len(part), "chars": len(part), "shards": int(bool(part))}
    assert dm.data_info["vocab_size"] == len(set(splits["train"])) + 1
    assert dm.data_info["chars_per_token"]["validation"] == pytest.approx(1.0)


def test_different_tokenizer_setting_gives_different_cache(tmp_path: Path) -> None:
    text = _text(40)
    char_unk = _datamodule(CountingSource(text), tmp_path / "cache", partial(train_char, unk=True))
    source = CountingSource(text)
    char_plain = _datamodule(source, tmp_path / "cache", partial(train_char, unk=False))
    assert source.loads == 1
    assert char_plain._cache != char_unk._cache
    assert char_plain.tokenizer.vocab_size == char_unk.tokenizer.vocab_size - 1
    bpe = _datamodule(CountingSource(text), tmp_path / "cache", partial(train_bpe, vocab_size=300))
    assert bpe._cache not in (char_unk._cache, char_plain._cache)
    assert bpe.tokenizer.kind == "bpe"
    # a different data source also gives a different entry
    other = _datamodule(CountingSource(text, name="other"), tmp_path / "cache", partial(train_char, unk=True))
    assert other._cache != char_unk._cache


def test_cache_key_of_plain_function_is_stable(tmp_path: Path) -> None:
    # the key must not depend on where the function lives in memory, or no later process finds the cache
    source = CountingSource(_text(5))
    plain = LMDataModule(source, train_char, cache_dir=str(tmp_path))._key()
    assert plain == LMDataModule(source, partial(train_char), cache_dir=str(tmp_path))._key()
    assert plain != LMDataModule(source, train_bpe, cache_dir=str(tmp_path))._key()


def test_ready_tokenizer_is_used_as_given(tmp_path: Path) -> None:
    text = _text(40)
    given = CharTokenizer(sorted(set(text) | {"Z"}))
    dm = _datamodule(CountingSource(text), tmp_path / "cache", given)
    assert dm.tokenizer is given
    assert dm.data_info["vocab_size"] == given.vocab_size


def test_train_batches_are_shifted_blocks(tmp_path: Path) -> None:
    text = _text(40)
    dm = _datamodule(CountingSource(text), tmp_path / "cache", block_size=16, batch_size=4)
    tokens = torch.tensor(stored_tokens(dm._cache, "train").astype(np.int64))
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataloader())
    assert len(batches) > 3
    for x, y in batches:
        assert x.shape == (4, 16) and y.shape == (4, 16)
        assert x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y, strict=True):
            # every row is a contiguous window of the training tokens
            starts = [s for s in range(len(tokens) - 16) if torch.equal(tokens[s : s + 16], row_x)]
            assert any(torch.equal(tokens[s + 1 : s + 17], row_y) for s in starts)


def test_validation_batches_cover_non_overlapping_blocks_from_zero(tmp_path: Path) -> None:
    text = _text(60)
    dm = _datamodule(CountingSource(text), tmp_path / "cache", block_size=16, batch_size=4, eval_batch_size=3)
    tokens = stored_tokens(dm._cache, "validation").astype(np.int64)
    rows = torch.cat([x for x, _ in dm.val_dataloader()])
    ys = torch.cat([y for _, y in dm.val_dataloader()])
    n_blocks = (len(tokens) - 1) // 16
    assert rows.shape == (n_blocks, 16)
    assert torch.equal(rows.reshape(-1), torch.from_numpy(tokens[: n_blocks * 16]))
    assert torch.equal(ys.reshape(-1), torch.from_numpy(tokens[1 : n_blocks * 16 + 1]))


def test_train_split_shorter_than_block_raises(tmp_path: Path) -> None:
    source = CountingSource("short text, only a few dozen characters long.\n")
    with pytest.raises(DataError) as info:
        _datamodule(source, tmp_path / "cache", block_size=64)
    assert "block_size" in str(info.value) and "train" in str(info.value)


def test_setup_needs_two_blocks_of_train_tokens(tmp_path: Path) -> None:
    text = "abcdefghijklmnopq"  # 17 chars: 15 train after a 10% cut
    dm = _datamodule(CountingSource(text), tmp_path / "cache", block_size=7, batch_size=1)
    assert dm.meta["splits"]["train"]["tokens"] == 15
    assert len(list(dm.train_dataloader())) == 1  # one block at every epoch offset
    with pytest.raises(DataError, match="2\\*data.block_size"):
        _datamodule(CountingSource(text), tmp_path / "cache2", block_size=8, batch_size=1)


def test_too_few_blocks_for_batch_raises(tmp_path: Path) -> None:
    dm = _datamodule(CountingSource(_text(3)), tmp_path / "cache", block_size=16, batch_size=64)
    with pytest.raises(DataError, match="batch_size"):
        dm.train_dataloader()


# -- EpochBlockSampler ------------------------------------------------------------------------------
N_TOKENS, BLOCK = 1000, 16


def _epoch(sampler: EpochBlockSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_epoch_is_permutation_of_distinct_in_range_starts() -> None:
    sampler = EpochBlockSampler(N_TOKENS, BLOCK, seed=3)
    for epoch in range(5):
        starts = _epoch(sampler, epoch)
        assert len(starts) == len(sampler) == (N_TOKENS - BLOCK) // BLOCK
        assert len(set(starts)) == len(starts)
        assert all(0 <= s and s + BLOCK + 1 <= N_TOKENS for s in starts)
        # one offset per epoch: all starts are congruent modulo block_size, so blocks do not overlap
        assert len({s % BLOCK for s in starts}) == 1
        assert sorted(starts) != starts  # shuffled


def test_sampler_worst_case_offset_stays_in_range() -> None:
    # whatever offset an epoch draws, the last block ends inside the token stream
    for n_tokens in range(BLOCK + 1, 5 * BLOCK + 3):
        sampler = EpochBlockSampler(n_tokens, BLOCK, seed=0)
        for epoch in range(20):
            assert all(s + BLOCK + 1 <= n_tokens for s in _epoch(sampler, epoch))


def test_sampler_epochs_differ_and_are_reproducible() -> None:
    sampler = EpochBlockSampler(N_TOKENS, BLOCK, seed=3)
    orders = [_epoch(sampler, e) for e in range(4)]
    assert len({tuple(o) for o in orders}) == 4
    again = EpochBlockSampler(N_TOKENS, BLOCK, seed=3)
    assert [_epoch(again, e) for e in (2, 0, 3, 1)] == [orders[2], orders[0], orders[3], orders[1]]
    assert _epoch(EpochBlockSampler(N_TOKENS, BLOCK, seed=4), 0) != orders[0]


def test_sampler_ranks_get_disjoint_starts() -> None:
    full = EpochBlockSampler(N_TOKENS, BLOCK, seed=5)
    ranks = [EpochBlockSampler(N_TOKENS, BLOCK, seed=5, rank=r, world_size=2) for r in range(2)]
    for epoch in range(3):
        a, b = (_epoch(s, epoch) for s in ranks)
        assert len(a) == len(b) == len(ranks[0]) == full.n_blocks // 2
        assert not set(a) & set(b)
        assert set(a) | set(b) <= set(_epoch(full, epoch))


def test_sampler_resume_yields_tail_of_uninterrupted_order() -> None:
    uninterrupted = _epoch(EpochBlockSampler(N_TOKENS, BLOCK, seed=9), 2)
    for done in (0, 1, 17, len(uninterrupted) - 1, len(uninterrupted)):
        resumed = EpochBlockSampler(N_TOKENS, BLOCK, seed=9)
        resumed.resume_at(2, done)
        assert _epoch(resumed, 2) == uninterrupted[done:]
        # the skip applies once: the next pass over the same epoch is complete again
        assert _epoch(resumed, 2) == uninterrupted
        assert _epoch(resumed, 3) == _epoch(EpochBlockSampler(N_TOKENS, BLOCK, seed=9), 3)


def test_sampler_resume_with_ranks() -> None:
    for rank in range(2):
        full = _epoch(EpochBlockSampler(N_TOKENS, BLOCK, seed=1, rank=rank, world_size=2), 1)
        resumed = EpochBlockSampler(N_TOKENS, BLOCK, seed=1, rank=rank, world_size=2)
        resumed.resume_at(1, 5)
        assert _epoch(resumed, 1) == full[5:]


def test_datamodule_resume_state_skips_done_batches(tmp_path: Path) -> None:
    text = _text(40)
    dm = _datamodule(CountingSource(text), tmp_path / "cache", block_size=16, batch_size=4)
    full = [x for x, _ in dm.train_dataloader()]
    dm.load_state_dict({"epoch": 0, "batches_done": 2})
    resumed = [x for x, _ in dm.train_dataloader()]
    assert len(resumed) == len(full) - 2
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[2:], strict=True))
    assert dm.state_dict() == {}  # no trainer attached: nothing to save
