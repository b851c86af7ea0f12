"""Word embeddings that can start from pretrained vectors (word2vec or GloVe text format)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lmlab.errors import DataError

KEY = "model.embedding.pretrained_path"


def make_embedding(vocab_size: int, pad_id: int, dim: int, pretrained_path: str | None = None,
                   freeze: bool = False) -> nn.Embedding:
    """The token embedding; frozen only when it starts from pretrained vectors (the task loads them)."""
    embedding = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
    embedding.weight.requires_grad_(not (freeze and pretrained_path))
    return embedding


def load_word_vectors(path: str | Path, vocabulary: Sequence[str], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors for the words of ``vocabulary`` from a word2vec/GloVe text file, read line by line.

    Returns ``(vectors (V, dim), found (V,) bool)``; rows of words not in the file are zero. A word
    matches exactly, or else by its lowercase form.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{KEY}: no file at '{path}'. Give a word2vec or GloVe text file.")
    exact = {word: i for i, word in enumerate(vocabulary)}
    lower: dict[str, list[int]] = {}
    for i, word in enumerate(vocabulary):
        lower.setdefault(word.lower(), []).append(i)
    vectors = torch.zeros(len(vocabulary), dim)
    found = torch.zeros(len(vocabulary), dtype=torch.bool)
    by_lowercase = torch.zeros(len(vocabulary), dtype=torch.bool)
    parsed = 0
    with path.open(encoding="utf-8", errors="strict") as lines:
        for number, line in enumerate(lines, start=1):
            parts = line.rstrip().split(" ")
            if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec header: "<count> <dim>"
            if len(parts) < 2:
                continue
            if len(parts) - 1 != dim:
                raise DataError(f"'{path}' line {number} has a {len(parts) - 1}-dimensional vector, but the model's "
                                f"embedding has {dim}. Set model.embedding.dim={len(parts) - 1}.")
            parsed += 1
            word = parts[0]
            if word in exact:
                rows, exact_match = [exact[word]], True
            else:
                rows, exact_match = lower.get(word.lower(), []), False
            rows = [r for r in rows if not found[r] or (exact_match and by_lowercase[r])]
            if rows:
                value = torch.tensor([float(x) for x in parts[1:]])
                for row in rows:
                    vectors[row], found[row], by_lowercase[row] = value, True, not exact_match
    if parsed == 0:
        raise DataError(f"'{path}' holds no word vectors ({KEY}); expected lines like 'word 0.1 0.2 ...'.")
    return vectors, found
