"""Corpora larger than memory: a language-modeling split is read in pieces, tokenized a batch of lines at a time
(in worker processes too) and written to token shards. The shards hold the ids of a one-shot tokenization, the
memory taken does not grow with the corpus, a stopped preparation resumes from its last finished shard, two
runs build one entry, and training reads blocks across shard boundaries."""

from __future__ import annotations

import errno
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lmlab.data.corpus as corpus
import lmlab.data.files as files
import lmlab.data.storage as storage
import lmlab.tokenizers as tokenizers
from lmlab.data.lm import LMDataModule
from lmlab.data.storage import ShardWriter, TokenShards
from lmlab.data.text_sources import DOC_END, HubText, SplitText, TextFiles
from lmlab.errors import DataError, DiskFullError
from lmlab.registry import registered
from lmlab.tokenizers import train_bpe, train_char, train_word

WORDS = "the quick brown fox jumps over a lazy dog while seven zebras quietly graze near old rivers".split()


def corpus_text(lines: int, seed: int = 0) -> str:
    """Lines of varied length and spacing, with some non-ASCII characters (several bytes in UTF-8)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(lines):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), rng.integers(1, 14))]
        if i % 7 == 0:
            words.append("café naïve — 日本語")
        out.append(("  " if i % 5 == 0 else " ").join(words) + ("\n\n" if i % 11 == 0 else "\n"))
    return "".join(out)


def stored(cache: Path, split: str) -> list[int]:
    shards = TokenShards(cache / split)
    return shards.read(0, len(shards)).tolist()


def datamodule(source: Any, cache: Path, tokenizer: Any = None, **kwargs: Any) -> LMDataModule:
    kwargs = {"block_size": 16, "batch_size": 4, "seed": 7, "num_proc": 1, **kwargs}
    dm = LMDataModule(source, tokenizer or partial(train_char, unk=True), cache_dir=str(cache), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files read 1000 bytes at a time (characters of several bytes get cut) and batches of 2000 characters."""
    monkeypatch.setattr(files, "READ_BYTES", 1000)
    monkeypatch.setattr(corpus, "BATCH_CHARS", 2000)


# -- the stored ids --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "train", [partial(train_char), partial(train_bpe, vocab_size=400), partial(train_word, vocab_size=60)]
)
@pytest.mark.parametrize("num_proc", [1, 2])
def test_shards_hold_the_ids_of_a_one_shot_tokenization(
    train: Any, num_proc: int, tmp_path: Path, small_pieces: None
) -> None:
    text = corpus_text(900)
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "b.txt").write_text(text[:5000], encoding="utf-8")
    source = TextFiles([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], val_fraction=0.1, test_fraction=0.05)
    dm = datamodule(source, tmp_path / "cache", train, num_proc=num_proc, shard_tokens=1500)
    joined = text + "\n" + text[:5000]
    train_end, val_end = int(len(joined) * 0.85), int(len(joined) * 0.95)
    parts = {"train": joined[:train_end], "validation": joined[train_end:val_end], "test": joined[val_end:]}
    for split, part in parts.items():
        assert stored(dm._cache, split) == dm.tokenizer.encode(part), split
        assert dm.meta["splits"][split]["chars"] == len(part)
    assert dm.meta["splits"]["train"]["shards"] > 3, "the split is cut into several shards"
    assert not list(dm._cache.glob("*/*.tmp")) and not list(tmp_path.joinpath("cache").glob(".*"))


def test_a_preparation_shows_its_progress_and_reports_each_split(
    tmp_path: Path, small_pieces: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, caplog
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # stderr as a terminal shows it
    (tmp_path / "a.txt").write_text(corpus_text(400), encoding="utf-8")
    source = TextFiles(str(tmp_path / "a.txt"), val_fraction=0.1)
    with caplog.at_level("INFO", logger="lmlab"):
        dm = datamodule(source, tmp_path / "cache")
    bar = capsys.readouterr().err
    train_tokens = dm.meta["splits"]["train"]["tokens"]
    assert "tokenizing train" in bar and "tokenizing validation" in bar and "tokens/s" in bar
    assert f"{train_tokens:,} tokens" in bar, "the bar counts the tokens made"
    assert "100%" in bar
    assert f"Tokenized the train split: {train_tokens:,} tokens" in caplog.text
    assert str(dm._cache) in caplog.text, "the cache folder is named"


def test_a_line_longer_than_the_limit_is_cut_at_a_word_start(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tokenizers, "_MAX_LINE_CHARS", 500)
    text = corpus_text(300).replace("\n", " ")  # one line of about 15,000 characters
    pieces = list(tokenizers.lines_of([text[i : i + 700] for i in range(0, len(text), 700)]))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 500 and len(pieces) > 20
    assert all(piece[0].isspace() for piece in pieces[1:]), "every cut is just before the space of a word"
    for train in (partial(train_bpe, vocab_size=400), partial(train_word, vocab_size=60)):
        tokenizer = train([text])
        ids = corpus.encode_lines(tokenizer, pieces, np.dtype(np.int32)).tolist()
        assert ids == tokenizer.encode(text)


def test_document_ends_become_the_end_of_text_token(tmp_path: Path) -> None:
    rows = [{"text": f"document {i} " + " ".join(WORDS[: i % 9 + 1])} for i in range(60)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    source = TextFiles(str(path), val_fraction=0.0, end_of_document=True)
    dm = datamodule(source, tmp_path / "cache", partial(train_bpe, vocab_size=300))
    eos = dm.tokenizer.eos_id
    expected = [i for r in rows for i in [*dm.tokenizer.encode(r["text"]), eos]]
    assert stored(dm._cache, "train") == expected
    # refused when the data module is built, by what the builder declares: a character vocabulary has none,
    # nor a pretrained tokenizer given no eos_token ...
    for builder in (partial(train_char), partial(tokenizers.load_pretrained, name_or_path="gpt2", eos_token=None)):
        with pytest.raises(DataError, match="end_of_document needs a tokenizer with an end-of-text token"):
            LMDataModule(source, builder, cache_dir=str(tmp_path / "cache"))
    # ... and, for a given tokenizer without one, before any text is encoded
    with pytest.raises(DataError, match="end_of_document needs a tokenizer with an end-of-text token"):
        datamodule(source, tmp_path / "cache", train_char(["document abc"]))
    assert not list((tmp_path / "cache").glob(".*.partial")), "a refused build leaves nothing to resume"


def test_every_tokenizer_builder_declares_its_end_of_text_token(tmp_path: Path) -> None:
    texts = ["alpha beta gamma\n", "delta alpha beta\n"] * 20
    tokenizer_json = tmp_path / "tokenizer.json"
    train_bpe(texts, vocab_size=300).backend.save(str(tokenizer_json))
    builders = [b for b in registered("tokenizer") if next(iter(inspect.signature(b).parameters)) == "texts"]
    assert {b.__name__ for b in builders} >= {"train_char", "train_word", "train_bpe", "load_pretrained"}
    local = {"name_or_path": str(tokenizer_json)}
    for builder in builders:
        pretrained = "name_or_path" in inspect.signature(builder).parameters
        for keywords in [{**local, "eos_token": e} for e in (None, "<|endoftext|>")] if pretrained else [{}]:
            spec = partial(builder, **keywords)
            kind, declared = tokenizers.declared_end_of_text(spec)
            built = spec(texts)
            # the declaration, read before building, agrees with the tokenizer built
            assert (kind, declared) == (built.kind, built.eos_id is not None), builder.__name__
            assert tokenizers.declared_end_of_text(built) == (kind, declared)


def test_a_carved_split_keeps_a_document_end_with_its_last_character() -> None:
    text = SplitText(lambda: [["abc"], ["def"]], end_of_document=True)
    assert list(text.items()) == ["abc", DOC_END, "def", DOC_END]
    assert list(text.carved(0, 3).items()) == ["abc", DOC_END]
    assert list(text.carved(3, 6).items()) == ["def", DOC_END]
    assert list(text.carved(2, 4).items()) == ["c", DOC_END, "d"]


# -- memory ------------------------------------------------------------------------------------------
def test_preparing_a_corpus_takes_memory_of_a_few_batches_not_of_the_corpus(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(files, "READ_BYTES", 1 << 16)
    monkeypatch.setattr(corpus, "BATCH_CHARS", 1 << 16)
    tokenizer = train_bpe([corpus_text(2000)], vocab_size=400)
    block = corpus_text(4000)

    def peak(copies: int) -> tuple[int, int]:
        path = tmp_path / f"corpus{copies}.txt"
        with path.open("w", encoding="utf-8") as out:
            for _ in range(copies):
                out.write(block)
        source = TextFiles(str(path), val_fraction=0.01)
        tracemalloc.start()
        LMDataModule(source, tokenizer, num_proc=1, cache_dir=str(tmp_path / f"c{copies}")).prepare_data()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top, path.stat().st_size

    (small, _), (large, size) = peak(4), peak(32)  # about 0.7 MB and 5.4 MB of text
    assert large < 1.3 * small, (small, large)
    assert large < 0.5 * size, "well under the corpus's own size"


# -- resume --------------------------------------------------------------------------------------------
class Interrupted(BaseException):
    """Stands in for Ctrl-C or a kill in the middle of a preparation."""


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    """Stop the preparation in the middle of the shard after ``shards`` finished ones."""
    append = ShardWriter.append

    def stopping(self: ShardWriter, *args: Any) -> None:
        if len(self.state["shards"]) == shards and self._tokens:
            raise Interrupted
        append(self, *args)

    monkeypatch.setattr(ShardWriter, "append", stopping)


def _counting_encoder(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    counted: list[int] = []
    encode = corpus.encode_lines

    def counting(tokenizer: Any, items: list, dtype: Any) -> np.ndarray:
        counted.append(len(items))
        return encode(tokenizer, items, dtype)

    monkeypatch.setattr(corpus, "encode_lines", counting)
    return counted


def test_an_interrupted_preparation_resumes_from_its_last_finished_shard(
    tmp_path: Path, small_pieces: None, monkeypatch
) -> None:
    text = corpus_text(1500)
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    source = TextFiles(str(tmp_path / "a.txt"), val_fraction=0.1)
    bpe = partial(train_bpe, vocab_size=400)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, shards=3)
        with pytest.raises(Interrupted):
            datamodule(source, tmp_path / "cache", bpe, shard_tokens=2000)
    (partial_entry,) = (tmp_path / "cache").glob(".*.partial")
    assert not (partial_entry / "DONE").exists() and not list((tmp_path / "cache").glob("[!.]*"))
    assert len(json.loads((partial_entry / "train" / "shards.json").read_text())["shards"]) == 3
    assert len(list((partial_entry / "train").glob("*.bin"))) == 4, "the shard cut off is there, unfinished"

    counted = _counting_encoder(monkeypatch)
    resumed = datamodule(source, tmp_path / "cache", bpe, shard_tokens=2000)
    resumed_lines = sum(counted)
    counted.clear()
    whole = datamodule(source, tmp_path / "fresh", bpe, shard_tokens=2000)
    assert stored(resumed._cache, "train") == stored(whole._cache, "train")
    assert stored(resumed._cache, "validation") == stored(whole._cache, "validation")
    assert resumed.meta == whole.meta
    assert resumed_lines < 0.9 * sum(counted), "the resumed run tokenized only what the stopped one had not stored"
    assert not (tmp_path / "cache" / partial_entry.name).exists()


KILLED_BUILD = """
import sys, time
from functools import partial
import lmlab.data.corpus as corpus
import lmlab.data.files as files
import lmlab.data.storage as storage
from lmlab.data.lm import LMDataModule
from lmlab.data.text_sources import TextFiles
from lmlab.tokenizers import train_bpe

files.READ_BYTES, corpus.BATCH_CHARS = 1000, 2000
encode = corpus.encode_lines
def slow(*args):
    time.sleep(0.05)
    return encode(*args)
corpus.encode_lines = slow
source = TextFiles(sys.argv[1], val_fraction=0.1)
LMDataModule(source, partial(train_bpe, vocab_size=400), num_proc=1, shard_tokens=2000,
             cache_dir=sys.argv[2]).prepare_data()
"""


def test_a_killed_preparation_is_continued_by_the_next_run(tmp_path: Path, small_pieces: None) -> None:
    (tmp_path / "a.txt").write_text(corpus_text(1500), encoding="utf-8")
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(tmp_path / "a.txt"), str(cache)])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = list(cache.glob(".*.partial/train/shards.json"))
        if found and len(json.loads(found[0].read_text())["shards"]) >= 2:
            break
        assert proc.poll() is None, "the build ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    source = TextFiles(str(tmp_path / "a.txt"), val_fraction=0.1)
    bpe = partial(train_bpe, vocab_size=400)
    resumed = datamodule(source, cache, bpe, shard_tokens=2000)
    whole = datamodule(source, tmp_path / "fresh", bpe, shard_tokens=2000)
    assert stored(resumed._cache, "train") == stored(whole._cache, "train")
    assert resumed.meta == whole.meta


def test_a_shard_folder_left_half_written_is_rebuilt_not_trusted(tmp_path: Path) -> None:
    folder = tmp_path / "train"
    writer = ShardWriter(folder, vocab_size=100, shard_tokens=4)
    writer.append(np.arange(5), position=10, chars=10)  # one finished shard
    writer.append(np.arange(3), position=6, chars=6)  # written, never closed
    garbage = folder / "00001.bin"
    assert garbage.is_file()
    again = ShardWriter(folder, vocab_size=100, shard_tokens=4)
    assert not garbage.exists() and again.position == 10 and again.tokens == 5 and not again.done
    again.append(np.arange(7, 9), position=4, chars=4)
    again.finish()
    assert TokenShards(folder).read(0, 7).tolist() == [0, 1, 2, 3, 4, 7, 8]


def test_a_full_disk_stops_with_the_fix_and_the_next_run_continues(tmp_path: Path, small_pieces: None) -> None:
    (tmp_path / "a.txt").write_text(corpus_text(1500), encoding="utf-8")
    source = TextFiles(str(tmp_path / "a.txt"), val_fraction=0.1)
    bpe = partial(train_bpe, vocab_size=400)
    fsync, synced = os.fsync, []

    def full_after_two(fd: int) -> None:
        synced.append(fd)
        if len(synced) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage.os, "fsync", full_after_two)
        with pytest.raises(DiskFullError) as info:
            datamodule(source, tmp_path / "cache", bpe, shard_tokens=2000)
    message = str(info.value)
    assert (
        "no space left on" in message
        and "data.cache_dir" in message
        and "resumes from its last finished shard" in message
    )
    assert not list((tmp_path / "cache").glob("[!.]*")), "nothing looks like a finished entry"
    resumed = datamodule(source, tmp_path / "cache", bpe, shard_tokens=2000)
    whole = datamodule(source, tmp_path / "fresh", bpe, shard_tokens=2000)
    assert stored(resumed._cache, "train") == stored(whole._cache, "train")


def test_a_preparation_that_fails_on_its_input_leaves_nothing(tmp_path: Path, small_pieces: None) -> None:
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text(corpus_text(500), encoding="utf-8")
    data = corpus_text(100).encode()
    bad.write_bytes(data[:2500] + b"\xff" + data[2500:])
    source = TextFiles([str(good), str(bad)], val_fraction=0.0)
    with pytest.raises(DataError) as info:
        datamodule(source, tmp_path / "cache", shard_tokens=2000)
    assert f"'{bad}' is not valid UTF-8 (byte 0xff at offset 2500)" in str(info.value)
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")], "no partial entry"


# -- concurrent runs -------------------------------------------------------------------------------------
SHARED_BUILD = """
import logging, sys, time
from functools import partial
import lmlab.data.corpus as corpus
from lmlab.data.lm import LMDataModule
from lmlab.data.text_sources import TextFiles
from lmlab.tokenizers import train_bpe

corpus.BATCH_CHARS = 2000
encode = corpus.encode_lines
def slow(*args):
    time.sleep(0.02)
    return encode(*args)
corpus.encode_lines = slow
logging.basicConfig(level=logging.INFO, format="%(message)s")
dm = LMDataModule(TextFiles(sys.argv[1], val_fraction=0.1), partial(train_bpe, vocab_size=400), num_proc=1,
                  shard_tokens=20000, cache_dir=sys.argv[2])
dm.prepare_data()
print(dm._cache)
"""


def test_two_concurrent_runs_build_the_entry_once(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(corpus_text(3000), encoding="utf-8")  # about 100 batches of 0.02 s
    args = [sys.executable, "-c", SHARED_BUILD, str(tmp_path / "a.txt"), str(tmp_path / "cache")]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0], "both use the same entry"
    logs = "".join(err for _, err in outs)
    assert logs.count("Tokenized the train split") == 1, logs
    assert "waiting for it to finish" in logs


# -- reading shards --------------------------------------------------------------------------------------
def test_blocks_across_shard_boundaries_equal_those_of_one_shard(tmp_path: Path, small_pieces: None) -> None:
    text = corpus_text(800)
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    source = TextFiles(str(tmp_path / "a.txt"), val_fraction=0.1)
    one = datamodule(source, tmp_path / "one", shard_tokens=10**9, block_size=32, batch_size=8)
    many = datamodule(source, tmp_path / "many", shard_tokens=500, block_size=32, batch_size=8)
    assert many.meta["splits"]["train"]["shards"] > 10 and one.meta["splits"]["train"]["shards"] == 1
    for epoch in (0, 1):
        loaders = [dm.train_dataloader() for dm in (one, many)]
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
        pairs = list(zip(*loaders, strict=True))
        assert len(pairs) > 10
        for (x1, y1), (x2, y2) in pairs:
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    starts = np.arange(0, len(many.datasets["train"]) - 33)
    assert np.array_equal(
        many.datasets["train"].tokens.windows(starts, 33), one.datasets["train"].tokens.windows(starts, 33)
    )


# -- streaming from the hub, tested on local parquet files through datasets ---------------------------------
def test_streaming_hub_rows_equal_the_downloaded_ones(tmp_path: Path) -> None:
    import datasets

    rows = corpus_text(400).splitlines()
    for split, part in (("train", rows[:300]), ("validation", rows[300:])):
        datasets.Dataset.from_dict({"text": part}).to_parquet(str(tmp_path / f"{split}.parquet"))
    data_files = {s: str(tmp_path / f"{s}.parquet") for s in ("train", "validation")}
    streamed = HubText("parquet", data_files=data_files, join_with="\n", val_fraction=0.0, streaming=True)
    loaded = HubText("parquet", data_files=data_files, join_with="\n", val_fraction=0.0)
    assert streamed.load() == loaded.load() == {"train": "\n".join(rows[:300]), "validation": "\n".join(rows[300:])}
    dm = datamodule(streamed, tmp_path / "cache")
    assert stored(dm._cache, "validation") == dm.tokenizer.encode("\n".join(rows[300:]))
    bad = HubText("parquet", data_files=data_files, text_column="body", streaming=True)
    with pytest.raises(DataError, match=r"Column 'body' is not in parquet\[train\] \(columns: text\)"):
        datamodule(bad, tmp_path / "cache")


# -- bad input ---------------------------------------------------------------------------------------------
def test_a_column_missing_from_one_of_the_files_is_named(tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20)), encoding="utf-8")
    second.write_text("".join(json.dumps({"body": f"row {i}"}) + "\n" for i in range(20)), encoding="utf-8")
    with pytest.raises(DataError) as info:
        datamodule(TextFiles([str(first), str(second)], val_fraction=0.0), tmp_path / "cache")
    assert f"Column 'text' is not in '{second}' (columns: body)" in str(info.value)


def test_a_corpus_with_no_text_is_refused(tmp_path: Path) -> None:
    rows = tmp_path / "empty.jsonl"
    rows.write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(5)), encoding="utf-8")
    with pytest.raises(DataError, match="The training text is empty"):
        datamodule(TextFiles(str(rows), val_fraction=0.0, join_with=""), tmp_path / "cache")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n ", encoding="utf-8")
    with pytest.raises(DataError, match=f"'{blank}' is empty"):
        datamodule(TextFiles(str(blank)), tmp_path / "cache")


def test_the_num_proc_default_is_the_cores_available() -> None:
    assert corpus.available_cores() == len(os.sched_getaffinity(0))
