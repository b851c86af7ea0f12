"""Multi-head attention on fused SDPA: self-attention (causal with a KV cache, or bidirectional with a key
padding mask; optionally rotary) and cross-attention over an encoder's output, both multi-, grouped- or
multi-query."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.positions import RotaryEmbedding

KV = tuple[torch.Tensor, torch.Tensor]


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """``(B, T, C) -> (B, n_head, T, C // n_head)``, the layout SDPA attends over."""
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """``(B, n_head, T, head_size) -> (B, T, n_head * head_size)``."""
    B, H, T, hs = y.shape
    return y.transpose(1, 2).contiguous().view(B, T, H * hs)


def per_query_head(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Keys or values repeated so each of ``n_head`` query heads has its group's: ``(B, n_kv_head, S, hs) ->
    (B, n_head, S, hs)``. SDPA's ``enable_gqa`` would avoid the copy, but not on every backend, mask and torch
    version."""
    group = n_head // t.size(1)
    return t if group == 1 else t.repeat_interleave(group, dim=1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused SDPA.

    ``n_kv_head`` heads of keys and values serve the ``n_head`` query heads, each shared by ``n_head //
    n_kv_head`` consecutive query heads (grouped-query attention; 1: multi-query; ``n_head``: multi-head): the
    KV cache shrinks by that factor. ``rotary`` rotates queries and keys by their absolute positions.

    Causal (decoders): ``past`` holds the cached keys and values of earlier positions, and new queries see all
    of them plus the causal part of their own chunk. Bidirectional (encoders): ``key_mask`` ``(B, T)``, True at
    real tokens, keeps every query from attending to padding.
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        n_kv_head: int,
        dropout: float,
        bias: bool,
        causal: bool,
        rotary: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.causal = n_head, n_kv_head, causal
        kv_size = n_kv_head * (n_embd // n_head)
        self.sizes = (n_embd, kv_size, kv_size)
        self.qkv = nn.Linear(n_embd, sum(self.sizes), bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.rotary = rotary
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, past: KV | None = None, key_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KV]:
        """The branch's output ``(B, T, C)`` and the keys and values of all positions so far, each ``(B,
        n_kv_head, past + T, head_size)``."""
        T = x.size(1)
        q, k, v = self.qkv(x).split(self.sizes, dim=2)
        q, k, v = split_heads(q, self.n_head), split_heads(k, self.n_kv_head), split_heads(v, self.n_kv_head)
        past_len = past[0].size(2) if past is not None else 0
        if self.rotary is not None:
            q, k = self.rotary(q, k, past_len)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        mask = None
        if not self.causal:
            mask = key_mask[:, None, None, :] if key_mask is not None else None
        elif past_len > 0 and T > 1:
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=past_len)
        y = F.scaled_dot_product_attention(
            q,
            per_query_head(k, self.n_head),
            per_query_head(v, self.n_head),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and past_len == 0 and T > 1,
        )
        return self.resid_dropout(self.proj(merge_heads(y))), (k, v)


class CrossAttention(nn.Module):
    """Multi-head attention from decoder queries to the encoder's output (the memory), with ``n_kv_head``
    key/value heads as in :class:`SelfAttention`.

    The memory's keys and values depend only on the source, so :meth:`memory_kv` projects them once per
    sentence and every decoding step reuses them. ``key_mask (B, S)``, True at real tokens, hides padding.
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.q = nn.Linear(n_embd, n_embd, bias=bias)
        self.kv = nn.Linear(n_embd, 2 * n_kv_head * (n_embd // n_head), bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def memory_kv(self, memory: torch.Tensor) -> KV:
        """Keys and values of ``memory (B, S, C)``, each ``(B, n_kv_head, S, head_size)``."""
        k, v = self.kv(memory).chunk(2, dim=2)
        return split_heads(k, self.n_kv_head), split_heads(v, self.n_kv_head)

    def forward(self, x: torch.Tensor, memory_kv: KV, key_mask: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.q(x), self.n_head)
        k, v = (per_query_head(t, self.n_head) for t in memory_kv)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_dropout(self.proj(merge_heads(y)))
