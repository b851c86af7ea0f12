"""A recurrent encoder over right-padded batches, shared by the text classifiers and sequence-to-sequence
models: packing the batch means padding never reaches the cell, so each text's outputs and final state are
the same whatever its batch looks like."""

from __future__ import annotations

import torch
from torch import nn

from lmlab.models.choices import choice

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class RecurrentEncoder(nn.Module):
    """A stacked, optionally bidirectional LSTM or GRU over packed sequences."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        n_layer: int = 1,
        cell: str = "lstm",
        bidirectional: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        choice("model.cell", cell, CELLS)
        self.rnn = CELLS[cell](
            input_size,
            hidden_size,
            num_layers=n_layer,
            bidirectional=bidirectional,
            batch_first=True,
            dropout=dropout if n_layer > 1 else 0.0,
        )
        self.directions = 2 if bidirectional else 1
        self.output_size = hidden_size * self.directions

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, State]:
        """``x (B, T, input_size)`` and true ``lengths (B,)`` to per-token outputs ``(B, T, output_size)``
        (zero at padding) and the final state as the cell gives it: ``h_n`` for a GRU, ``(h_n, c_n)`` for an
        LSTM, each ``(n_layer * directions, B, hidden_size)``, in the batch's own order."""
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
        return out, state
