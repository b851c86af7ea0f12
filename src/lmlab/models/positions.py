"""Position codes without parameters: the sinusoidal table added to token vectors, and rotary embeddings
(RoPE) that rotate queries and keys inside attention."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import nn

#: how a Transformer knows where each token is: learned vectors or the sinusoidal table added to the token
#: vectors, or rotary (``rope``: queries and keys rotated inside self-attention)
Position = Literal["learned", "sinusoidal", "rope"]
POSITIONS: tuple[str, ...] = get_args(Position)


def sinusoidal_positions(n: int, dim: int) -> torch.Tensor:
    """The fixed sine/cosine position table of Vaswani et al. (2017), ``(n, dim)``: no parameters to learn,
    and any position up to ``n`` gets a distinct code."""
    position = torch.arange(n, dtype=torch.float)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021): feature ``i`` of a head and feature ``i + head_size / 2``
    form a pair rotated by the angle ``position * theta ** (-2i / head_size)`` (the GPT-NeoX / Llama layout).

    Rotating both queries and keys makes each score ``q . k`` depend on the distance between their positions
    only, so nothing is added to the token vectors and no table limits the length. The angles are computed
    per call in float32 (cheap next to attention) from the absolute position of the first token, which is the
    length of the cached prefix when decoding continues one.
    """

    def __init__(self, head_size: int, theta: float) -> None:
        super().__init__()
        self.head_size, self.theta = head_size, theta

    def extra_repr(self) -> str:
        return f"head_size={self.head_size}, theta={self.theta}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` and ``k`` ``(B, heads, T, head_size)`` at positions ``start .. start + T - 1``, rotated."""
        half = self.head_size // 2
        exponents = torch.arange(half, device=q.device, dtype=torch.float32) / half
        positions = torch.arange(start, start + q.size(2), device=q.device, dtype=torch.float32)
        angles = positions[:, None] * self.theta ** -exponents[None, :]  # (T, half)
        cos, sin = angles.cos(), angles.sin()
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)
