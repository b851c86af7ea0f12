"""Transformer pieces shared by the GPT decoder, the encoders and the encoder-decoder: multi-head
self-attention (causal with a KV cache, or bidirectional with a key padding mask), cross-attention over
an encoder's output, the MLP, the pre-LayerNorm blocks and the fixed sinusoidal position table."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor]


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """``(B, T, C) -> (B, n_head, T, C // n_head)``, the layout SDPA attends over."""
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """``(B, n_head, T, head_size) -> (B, T, n_head * head_size)``."""
    B, H, T, hs = y.shape
    return y.transpose(1, 2).contiguous().view(B, T, H * hs)


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused SDPA.

    Causal (decoders): ``past`` holds the cached keys and values of earlier positions, and new queries
    see all of them plus the causal part of their own chunk. Bidirectional (encoders): ``key_mask``
    ``(B, T)``, True at real tokens, keeps every query from attending to padding.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, causal: bool = True) -> None:
        super().__init__()
        self.n_head, self.causal = n_head, causal
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, past: KV | None = None, key_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KV]:
        T = x.size(1)
        q, k, v = (split_heads(t, self.n_head) for t in self.qkv(x).chunk(3, dim=2))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        past_len = k.size(2) - T
        mask = None
        if not self.causal:
            mask = key_mask[:, None, None, :] if key_mask is not None else None
        elif past_len > 0 and T > 1:
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=past_len)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and past_len == 0 and T > 1,
        )
        return self.resid_dropout(self.proj(merge_heads(y))), (k, v)


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, causal: bool = True) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = SelfAttention(n_embd, n_head, dropout, bias, causal)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(
        self, x: torch.Tensor, past: KV | None = None, key_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.ln_1(x), past, key_mask)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


class CrossAttention(nn.Module):
    """Multi-head attention from decoder queries to the encoder's output (the memory).

    The memory's keys and values depend only on the source, so :meth:`memory_kv` projects them once per
    sentence and every decoding step reuses them. ``key_mask (B, S)``, True at real tokens, hides padding.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(n_embd, n_embd, bias=bias)
        self.kv = nn.Linear(n_embd, 2 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def memory_kv(self, memory: torch.Tensor) -> KV:
        """Keys and values of ``memory (B, S, C)``, each ``(B, n_head, S, head_size)``."""
        k, v = self.kv(memory).chunk(2, dim=2)
        return split_heads(k, self.n_head), split_heads(v, self.n_head)

    def forward(self, x: torch.Tensor, memory_kv: KV, key_mask: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.q(x), self.n_head)
        y = F.scaled_dot_product_attention(
            q, *memory_kv, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_dropout(self.proj(merge_heads(y)))


class DecoderBlock(nn.Module):
    """Pre-LayerNorm encoder-decoder block: causal self-attention with a KV cache, then cross-attention over
    the memory, then the MLP, each added as ``x + f(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = SelfAttention(n_embd, n_head, dropout, bias, causal=True)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.cross = CrossAttention(n_embd, n_head, dropout, bias)
        self.ln_3 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(
        self, x: torch.Tensor, memory_kv: KV, memory_mask: torch.Tensor, past: KV | None = None
    ) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.ln_1(x), past)
        x = x + a
        x = x + self.cross(self.ln_2(x), memory_kv, memory_mask)
        return x + self.mlp(self.ln_3(x)), present


def sinusoidal_positions(n: int, dim: int) -> torch.Tensor:
    """The fixed sine/cosine position table of Vaswani et al. (2017), ``(n, dim)``: no parameters to learn,
    and any position up to ``n`` gets a distinct code."""
    position = torch.arange(n, dtype=torch.float)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table
