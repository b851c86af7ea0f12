"""Word embeddings that can start from pretrained vectors (word2vec or GloVe text format)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.errors import ConfigError, DataError

KEY = "model.embedding.pretrained_path"
SETTINGS = ("dim", "pretrained_path", "freeze")


def embedding_settings(config: Mapping[str, Any] | None, default_dim: int = 128) -> dict[str, Any]:
    """The ``model.embedding`` config as keyword arguments of :func:`make_embedding`; a typo is an error
    rather than a silently ignored setting."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"Unknown key model.embedding.{unknown[0]}; valid keys: {', '.join(SETTINGS)}.")
    return {
        "dim": int(config.get("dim", default_dim)),
        "pretrained_path": config.get("pretrained_path"),
        "freeze": bool(config.get("freeze", False)),
    }


def make_embedding(
    vocab_size: int, pad_id: int, dim: int, pretrained_path: str | None = None, freeze: bool = False
) -> nn.Embedding:
    """The token embedding. Frozen only when it starts from pretrained vectors: freezing a random table
    would leave the model nothing to learn words with. The task copies the vectors in."""
    embedding = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
    embedding.weight.requires_grad_(not (freeze and pretrained_path))
    return embedding


def load_word_vectors(path: str | Path, vocabulary: Sequence[str], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors for the words of ``vocabulary`` from a word2vec (``count dim`` header) or GloVe text file.

    Returns ``(vectors (V, dim) float32, found (V,) bool)``; rows of words not in the file are zero. A word
    matches exactly, or else by its lowercase form (the first such line in the file, the most frequent
    one in word2vec and GloVe files). The file is streamed and only vocabulary rows are parsed, so a
    multi-gigabyte file costs little memory and time; the widths of the first vector and of the vocabulary's
    vectors are checked.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{KEY}: no file at '{path}'. Give a word2vec or GloVe text file.")
    exact = {word: i for i, word in enumerate(vocabulary)}
    by_lower: dict[str, list[int]] = {}
    for i, word in enumerate(vocabulary):
        by_lower.setdefault(word.lower(), []).append(i)
    # a line whose first field starts no vocabulary word is skipped unparsed: most of a large file
    exact_heads = {word.split(" ", 1)[0] for word in exact}
    lower_heads = {word.split(" ", 1)[0] for word in by_lower}
    vectors = torch.zeros(len(vocabulary), dim)
    match = [0] * len(vocabulary)  # how each row was filled: 0 not yet, 1 by lowercase, 2 exactly
    parsed = 0
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                line = line.rstrip()
                if not line or (number == 1 and _header_dim(line, path, dim)):
                    continue
                if parsed == 0:  # the first vector fixes the file's width
                    _check_width(line.split(" ")[1:], path, number, dim)
                parsed += 1
                head = line.split(" ", 1)[0]
                if head not in exact_heads and head.lower() not in lower_heads:
                    continue
                parts = line.rsplit(" ", dim)  # a GloVe token may itself contain spaces
                if len(parts) != dim + 1:
                    _check_width(line.split(" ")[1:], path, number, dim)
                word = parts[0]
                if word in exact:
                    rows, strength = [exact[word]], 2
                else:
                    rows, strength = by_lower.get(word.lower(), []), 1
                rows = [r for r in rows if match[r] < strength]
                if rows:
                    value = _floats(parts[1:], path, number)
                    for row in rows:
                        vectors[row], match[row] = value, strength
    except UnicodeDecodeError as err:
        raise DataError(f"{KEY}: '{path}' is not UTF-8 text ({err}).") from None
    if parsed == 0:
        raise DataError(f"{KEY}: '{path}' holds no word vectors; expected lines like 'word 0.1 0.2 ...'.")
    return vectors, torch.tensor(match, dtype=torch.bool)


def _header_dim(line: str, path: Path, dim: int) -> bool:
    """Whether ``line`` is a word2vec header ``count dim``; a header that disagrees with ``dim`` is an error."""
    parts = line.split(" ")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return False
    if int(parts[1]) != dim:
        raise DataError(
            f"{KEY}: '{path}' holds {parts[1]}-dimensional vectors, but the model's embedding has "
            f"{dim}. Set model.embedding.dim={parts[1]}."
        )
    return True


def _check_width(values: list[str], path: Path, number: int, dim: int) -> None:
    if len(values) != dim:
        raise DataError(
            f"{KEY}: '{path}' line {number} has a {len(values)}-dimensional vector, but the model's "
            f"embedding has {dim}. Set model.embedding.dim={len(values)}."
        )
    _floats(values, path, number)


def _floats(values: list[str], path: Path, number: int) -> torch.Tensor:
    try:
        return torch.tensor([float(v) for v in values])
    except ValueError:
        raise DataError(f"{KEY}: '{path}' line {number} is not 'word v1 v2 ...' with numbers.") from None
