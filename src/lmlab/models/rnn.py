"""Recurrent language models: multi-layer LSTM, GRU or Elman RNN with dropout."""

from __future__ import annotations

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.base import LanguageModelNetwork
from lmlab.models.choices import choice
from lmlab.registry import register

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
#: the hidden state: ``h_n``, or ``(h_n, c_n)`` for an LSTM, each ``(n_layer, B, hidden_size)``
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@register("network")
class RecurrentLM(LanguageModelNetwork):
    """Embedding -> stacked recurrent layers -> linear decoder (optionally tied to the embedding). No context
    limit (``block_size`` None): the hidden state carries the history."""

    def __init__(
        self,
        vocab_size: int,
        cell: str,
        n_embd: int = 256,
        hidden_size: int = 256,
        n_layer: int = 2,
        dropout: float = 0.1,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        choice("model.cell", cell, _CELLS)
        if tie_weights and n_embd != hidden_size:
            raise ConfigError(
                f"model.tie_weights needs model.n_embd == model.hidden_size (got {n_embd} and {hidden_size})."
            )
        self.embed = nn.Embedding(vocab_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.rnn = _CELLS[cell](
            n_embd, hidden_size, num_layers=n_layer, dropout=dropout if n_layer > 1 else 0.0, batch_first=True
        )
        self.head = nn.Linear(hidden_size, vocab_size)
        if tie_weights:
            self.head.weight = self.embed.weight

    def forward(
        self, idx: torch.Tensor, state: State | None = None, return_state: bool = False
    ) -> tuple[torch.Tensor, State | None]:
        """Logits for ``idx``; ``state`` is the hidden state after the previous call."""
        out, new_state = self.rnn(self.drop(self.embed(idx)), state)
        return self.head(self.drop(out)), (new_state if return_state else None)
