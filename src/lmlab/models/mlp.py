"""The position-wise feed-forward branch of a Transformer block: GELU (GPT-2, BERT) or SwiGLU (Llama)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class GeluMLP(nn.Module):
    """``proj(gelu(fc(x)))``, the MLP of GPT-2 and BERT."""

    def __init__(self, n_embd: int, hidden: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    @property
    def output(self) -> nn.Linear:
        """The projection that writes into the residual stream."""
        return self.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer 2020), the MLP of Llama: a gated unit that learns better per
    parameter, with three matrices instead of two (hence its narrower default hidden size)."""

    def __init__(self, n_embd: int, hidden: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(n_embd, hidden, bias=bias)
        self.up = nn.Linear(n_embd, hidden, bias=bias)
        self.down = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    @property
    def output(self) -> nn.Linear:
        """The projection that writes into the residual stream."""
        return self.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


#: ``model.mlp``: GPT-2's GELU MLP or Llama's gated SwiGLU
MLPKind = Literal["gelu", "swiglu"]
MLPS: dict[str, type[GeluMLP | SwiGLU]] = {"gelu": GeluMLP, "swiglu": SwiGLU}


def mlp_hidden_size(kind: str, n_embd: int, hidden: int | None, multiple_of: int) -> int:
    """``hidden`` when given; else ``4 * n_embd`` for GELU, and for SwiGLU two thirds of that (the same
    parameters with three matrices) rounded up to a multiple of ``multiple_of``, as Llama sizes it."""
    if hidden is not None:
        return hidden
    if kind == "gelu":
        return 4 * n_embd
    return multiple_of * math.ceil(int(2 * 4 * n_embd / 3) / multiple_of)
