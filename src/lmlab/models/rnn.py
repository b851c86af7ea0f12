"""Recurrent language models: multi-layer LSTM, GRU or Elman RNN with dropout."""

from __future__ import annotations

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.registry import register

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@register("network")
class RecurrentLM(nn.Module):
    """Embedding -> stacked recurrent layers -> linear decoder (optionally tied to the embedding)."""

    block_size: int | None = None  # no context limit: the hidden state carries the history

    def __init__(
        self,
        vocab_size: int,
        cell: str = "lstm",
        n_embd: int = 256,
        hidden_size: int = 512,
        n_layer: int = 2,
        dropout: float = 0.2,
        tie_weights: bool = False,
    ) -> None:
        super().__init__()
        if cell not in _CELLS:
            raise ConfigError(f"model.cell must be one of {', '.join(_CELLS)}, got '{cell}'.")
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

    def forward(self, idx: torch.Tensor, state=None, return_state: bool = False):
        """Logits for ``idx``; ``state`` is the hidden state after the previous call."""
        out, new_state = self.rnn(self.drop(self.embed(idx)), state)
        return self.head(self.drop(out)), (new_state if return_state else None)
