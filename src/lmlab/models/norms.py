"""The normalization a Transformer applies before each residual branch and at the end."""

from __future__ import annotations

from typing import Literal, get_args

from torch import nn

#: ``model.norm``: LayerNorm (GPT-2, BERT) or RMSNorm (Llama: rescales without centering, no bias)
Norm = Literal["layernorm", "rmsnorm"]
NORMS: tuple[str, ...] = get_args(Norm)


def make_norm(kind: str, dim: int, bias: bool, eps: float) -> nn.Module:
    """A ``kind`` norm over the last ``dim`` features; ``bias`` applies to LayerNorm only (RMSNorm has none)."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)
