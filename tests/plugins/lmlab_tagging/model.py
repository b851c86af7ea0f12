"""Tagging networks: the contract (:class:`TaggerNetwork`) and one network, a bidirectional GRU tagger."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from lmlab.models.recurrent import RecurrentEncoder
from lmlab.registry import register


class TaggerNetwork(nn.Module, ABC):
    """Sequence tagger: ``forward(ids (B, T), lengths (B,)) -> logits (B, T, num_tags)``, one row of tag
    logits per word; only each sentence's first ``lengths`` words are read."""

    @abstractmethod
    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Tag logits of every word."""


@register("network")
class BiGRUTagger(TaggerNetwork):
    """Embedding -> bidirectional GRU over packed sequences -> a linear layer per word."""

    def __init__(
        self,
        vocab_size: int,
        num_tags: int,
        pad_id: int,
        embedding_dim: int = 64,
        hidden_size: int = 64,
        n_layer: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id)
        self.encoder = RecurrentEncoder(embedding_dim, hidden_size, n_layer, "gru", True, dropout)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.output_size, num_tags)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.encoder(self.drop(self.embedding(ids)), lengths)
        return self.head(self.drop(out))
