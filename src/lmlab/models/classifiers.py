"""Text classifiers: ``forward(ids (B, T), lengths (B,)) -> logits (B, num_classes)``.

``ids`` are right-padded; every model looks only at each example's first ``lengths`` tokens, so an
example gets the same logits however much padding its batch adds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.embeddings import make_embedding
from lmlab.models.gpt import Block

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


def _choice(key: str, value: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ConfigError(f"{key} must be one of {', '.join(options)}, got '{value}'.")
    return value


def valid_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, width)`` True at real tokens."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def masked_pool(x: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Max or mean of ``x (B, T, D)`` over the positions where ``mask (B, T)`` is True."""
    if how == "max":
        return x.masked_fill(~mask[..., None], float("-inf")).max(dim=1).values
    weights = mask[..., None].to(x.dtype)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1)


class RecurrentEncoder(nn.Module):
    """A (bidirectional) LSTM or GRU over packed sequences: padding is never fed to the cell.

    Returns per-token outputs ``(B, T, hidden * directions)`` (zero at padding) and the final
    hidden state ``(layers * directions, B, hidden)``.
    """

    def __init__(self, input_size: int, hidden_size: int, n_layer: int = 1, cell: str = "lstm",
                 bidirectional: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.rnn = _CELLS[_choice("model.cell", cell, tuple(_CELLS))](
            input_size, hidden_size, num_layers=n_layer, bidirectional=bidirectional, batch_first=True,
            dropout=dropout if n_layer > 1 else 0.0,
        )
        self.output_size = hidden_size * (2 if bidirectional else 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
        return out, state[0] if isinstance(state, tuple) else state


class RNNClassifier(nn.Module):
    """Embedding -> bidirectional LSTM/GRU -> max, mean or last-state pooling -> linear."""

    def __init__(self, vocab_size: int, num_classes: int, pad_id: int, cell: str = "lstm",
                 embedding: dict[str, Any] | None = None, hidden_size: int = 256, n_layer: int = 1,
                 bidirectional: bool = True, pooling: str = "max", dropout: float = 0.5) -> None:
        super().__init__()
        self.pooling = _choice("model.pooling", pooling, ("max", "mean", "last"))
        self.embedding = make_embedding(vocab_size, pad_id, **_embedding(embedding))
        self.drop = nn.Dropout(dropout)
        self.encoder = RecurrentEncoder(self.embedding.embedding_dim, hidden_size, n_layer, cell, bidirectional,
                                        dropout)
        self.directions = 2 if bidirectional else 1
        self.head = nn.Linear(self.encoder.output_size, num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, h_n = self.encoder(self.drop(self.embedding(ids)), lengths)
        if self.pooling == "last":  # the top layer's final state in each direction
            pooled = torch.cat(list(h_n[-self.directions :]), dim=-1)
        else:
            pooled = masked_pool(out, valid_mask(lengths, out.size(1)), self.pooling)
        return self.head(self.drop(pooled))


class TextCNN(nn.Module):
    """Kim (2014): convolutions of several widths over word embeddings, max over time, linear."""

    def __init__(self, vocab_size: int, num_classes: int, pad_id: int, embedding: dict[str, Any] | None = None,
                 kernel_sizes: list[int] | tuple[int, ...] = (3, 4, 5), n_filters: int = 100,
                 dropout: float = 0.5) -> None:
        super().__init__()
        if not kernel_sizes or min(kernel_sizes) < 1:
            raise ConfigError(f"model.kernel_sizes must be positive widths, got {list(kernel_sizes)}.")
        self.embedding = make_embedding(vocab_size, pad_id, **_embedding(embedding))
        self.kernel_sizes = list(kernel_sizes)
        self.convs = nn.ModuleList(nn.Conv1d(self.embedding.embedding_dim, n_filters, k) for k in self.kernel_sizes)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(n_filters * len(self.kernel_sizes), num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = valid_mask(lengths, ids.size(1))
        x = self.embedding(ids) * mask[..., None]  # zero beyond each text, whatever the pad vector is
        widest = max(self.kernel_sizes)
        if x.size(1) < widest:
            x = F.pad(x, (0, 0, 0, widest - x.size(1)))
        x = x.transpose(1, 2)
        pooled = []
        for k, conv in zip(self.kernel_sizes, self.convs, strict=True):
            h = F.relu(conv(x))  # (B, filters, T - k + 1)
            # windows inside the text; a text shorter than k keeps its first (zero-extended) window
            starts = torch.arange(h.size(2), device=ids.device)[None, :]
            valid = starts + k <= lengths.clamp(min=k)[:, None]
            pooled.append(h.masked_fill(~valid[:, None, :], float("-inf")).max(dim=2).values)
        return self.head(self.drop(torch.cat(pooled, dim=1)))


def sinusoidal_positions(n: int, dim: int) -> torch.Tensor:
    """The fixed sine/cosine position table of Vaswani et al. (2017), ``(n, dim)``."""
    position = torch.arange(n, dtype=torch.float)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class TransformerClassifier(nn.Module):
    """A BERT-like pre-LN Transformer encoder with padding masks, pooled at a learned [CLS] vector or by mean."""

    def __init__(self, vocab_size: int, num_classes: int, pad_id: int, max_length: int, n_layer: int = 2,
                 n_head: int = 4, n_embd: int = 128, positions: str = "learned", pooling: str = "cls",
                 dropout: float = 0.1, bias: bool = True) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ConfigError(f"model.n_embd ({n_embd}) must be divisible by model.n_head ({n_head}).")
        self.pooling = _choice("model.pooling", pooling, ("cls", "mean"))
        n_positions = max_length + 1  # room for the [CLS] vector
        self.embedding = nn.Embedding(vocab_size, n_embd, padding_idx=pad_id)
        if _choice("model.positions", positions, ("learned", "sinusoidal")) == "learned":
            self.positions = nn.Parameter(torch.randn(n_positions, n_embd) * 0.02)
        else:
            self.register_buffer("positions", sinusoidal_positions(n_positions, n_embd), persistent=False)
        self.cls = nn.Parameter(torch.randn(n_embd) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias, causal=False) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, num_classes)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        if T + 1 > self.positions.size(0):
            raise ValueError(f"Sequence of {T} tokens exceeds max_length {self.positions.size(0) - 1}.")
        x = torch.cat([self.cls.expand(B, 1, -1), self.embedding(ids)], dim=1) + self.positions[: T + 1]
        mask = valid_mask(lengths + 1, T + 1)
        x = self.drop(x)
        for block in self.blocks:
            x, _ = block(x, key_mask=mask)
        x = self.ln_f(x)
        pooled = x[:, 0] if self.pooling == "cls" else masked_pool(x[:, 1:], mask[:, 1:], "mean")
        return self.head(self.drop(pooled))


class BagOfNGrams(nn.Module):
    """fastText-style: the mean of word and hashed n-gram embeddings, then a linear layer."""

    PRIMES = (1, 1_000_003, 998_244_353)  # n-gram ids: position-weighted sums, so order matters

    def __init__(self, vocab_size: int, num_classes: int, pad_id: int, embedding: dict[str, Any] | None = None,
                 ngrams: int = 2, buckets: int = 200_000, dropout: float = 0.0) -> None:
        super().__init__()
        if not 1 <= ngrams <= len(self.PRIMES):
            raise ConfigError(f"model.ngrams must be between 1 and {len(self.PRIMES)}, got {ngrams}.")
        self.ngrams, self.buckets = ngrams, buckets
        self.embedding = make_embedding(vocab_size, pad_id, **_embedding(embedding))
        self.ngram_embedding = nn.Embedding(buckets, self.embedding.embedding_dim) if ngrams > 1 else None
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(self.embedding.embedding_dim, num_classes)

    def ngram_ids(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """Bucket of each n-gram starting at positions ``0 .. T - n``: ``(B, T - n + 1)``."""
        T = ids.size(1)
        h = sum(ids[:, i : T - n + 1 + i].long() * self.PRIMES[i] for i in range(n))
        return h % self.buckets

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = valid_mask(lengths, ids.size(1))
        total = (self.embedding(ids) * mask[..., None]).sum(1)
        count = lengths.to(total.dtype)
        for n in range(2, self.ngrams + 1):
            if ids.size(1) < n:
                break
            grams = self.ngram_ids(ids, n)
            valid = valid_mask(lengths - n + 1, grams.size(1))
            total = total + (self.ngram_embedding(grams) * valid[..., None]).sum(1)
            count = count + valid.sum(1)
        return self.head(self.drop(total / count.clamp(min=1)[:, None]))


class HFEncoderClassifier(nn.Module):
    """A pretrained Hugging Face encoder (hub name or local folder), pooled, with a new linear head."""

    def __init__(self, num_classes: int, name_or_path: str, pooling: str = "cls", dropout: float = 0.1,
                 freeze_encoder: bool = False) -> None:
        super().__init__()
        self.pooling = _choice("model.pooling", pooling, ("cls", "mean"))
        try:
            from transformers import AutoModel
        except ImportError:
            raise ConfigError("model=hf_encoder needs transformers: pip install 'lmlab[hf]'.") from None
        local = Path(name_or_path).expanduser()
        if name_or_path.startswith((".", "/", "~")) and not local.is_dir():
            raise ConfigError(f"model.name_or_path: no folder at '{local}'. Point it at a folder saved with "
                              "save_pretrained, or give a Hugging Face hub name.")
        try:
            self.encoder = AutoModel.from_pretrained(str(local) if local.is_dir() else name_or_path)
        except OSError as err:
            raise ConfigError(f"model.name_or_path: could not load '{name_or_path}' ({err}). Offline? Point "
                              "model.name_or_path at a local folder with the model's config and weights.") from None
        self.encoder.requires_grad_(not freeze_encoder)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = valid_mask(lengths, ids.size(1))
        hidden = self.encoder(input_ids=ids.masked_fill(~mask, 0), attention_mask=mask.long()).last_hidden_state
        pooled = hidden[:, 0] if self.pooling == "cls" else masked_pool(hidden, mask, "mean")
        return self.head(self.drop(pooled))


def _embedding(config: dict[str, Any] | None) -> dict[str, Any]:
    """The ``model.embedding`` settings: ``dim``, ``pretrained_path``, ``freeze``."""
    config = dict(config or {})
    unknown = set(config) - {"dim", "pretrained_path", "freeze"}
    if unknown:
        raise ConfigError(f"Unknown key(s) model.embedding.{sorted(unknown)[0]}; valid: dim, pretrained_path, freeze.")
    return {"dim": config.get("dim", 128), "pretrained_path": config.get("pretrained_path"),
            "freeze": bool(config.get("freeze", False))}
