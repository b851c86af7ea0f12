"""A language-modeling split is tokenized a batch of lines at a time and written as it comes: the stored ids
equal a one-shot tokenization of the whole text, and the memory it takes does not grow with the text."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from lmlab.data.storage import save_token_stream
from lmlab.tokenizers import train_bpe, train_char

LINE = "the quick brown fox jumps over the lazy dog, again and again.\n"


@pytest.mark.parametrize("train", [train_char, train_bpe])
def test_the_stored_stream_equals_the_ids_of_the_whole_text(train, tmp_path: Path) -> None:
    text = "".join(f"{i} {LINE}" for i in range(5000)) + "no newline at the end"
    tokenizer = train([text])
    n = save_token_stream(tmp_path / "s.npy", tokenizer.encoded_chunks([text, text]), tokenizer.vocab_size)
    stored = np.load(tmp_path / "s.npy")
    whole = tokenizer.encode(text)
    assert n == len(stored) == 2 * len(whole) and stored.tolist() == whole + whole
    assert not list(tmp_path.glob("*.raw")), "the raw file is removed"


def test_an_empty_stream_is_an_empty_array(tmp_path: Path) -> None:
    assert save_token_stream(tmp_path / "e.npy", iter([]), 100) == 0
    assert np.load(tmp_path / "e.npy").shape == (0,)


def test_tokenizing_a_split_takes_memory_of_one_batch_not_of_the_text(tmp_path: Path) -> None:
    tokenizer = train_bpe([LINE * 50], vocab_size=300)

    def peak(lines: int) -> tuple[int, int]:
        text = "".join(f"{i} {LINE}" for i in range(lines))
        tracemalloc.start()
        save_token_stream(tmp_path / "s.npy", tokenizer.encoded_chunks([text]), tokenizer.vocab_size)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top, len(text)

    (small, _), (large, chars) = peak(20_000), peak(160_000)  # about 1.3 MB and 10 MB of text
    assert large < 1.2 * small, (small, large)
    assert large < 0.7 * chars, "under the text's own size (a list of its ids took several times that)"
