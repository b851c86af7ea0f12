"""A GPT-style decoder: pre-LayerNorm blocks, fused SDPA attention, tied embeddings, KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused SDPA: causal with a KV cache (decoders), or bidirectional with
    a key padding mask (encoders)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, causal: bool = True) -> None:
        super().__init__()
        self.n_head, self.causal = n_head, causal
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``key_mask`` (B, T), True at real tokens, keeps a bidirectional layer from attending to padding."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        past_len = k.size(2) - T
        mask = None
        if not self.causal:
            mask = key_mask[:, None, None, :] if key_mask is not None else None
        elif past_len > 0 and T > 1:  # new queries see all cached keys and the causal part of their own
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=past_len)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and past_len == 0 and T > 1,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block, shared by the GPT decoder and the classification encoder."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, causal: bool = True) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = SelfAttention(n_embd, n_head, dropout, bias, causal)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor, past=None, key_mask: torch.Tensor | None = None):
        a, present = self.attn(self.ln_1(x), past, key_mask)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


class GPT(nn.Module):
    """Decoder-only Transformer language model (the nanoGPT architecture)."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 256,
        n_layer: int = 6,
        n_head: int = 6,
        n_embd: int = 384,
        dropout: float = 0.0,
        bias: bool = True,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ConfigError(f"model.n_embd ({n_embd}) must be divisible by model.n_head ({n_head}).")
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of residual projections (GPT-2)
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, state: KVCache | None = None, return_state: bool = False
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Logits for ``idx``; with ``state`` (a KV cache), ``idx`` continues the cached prefix."""
        past_len = state[0][0].size(2) if state else 0
        T = idx.size(1)
        if past_len + T > self.block_size:
            raise ValueError(f"Sequence of {past_len + T} tokens exceeds block_size {self.block_size}.")
        pos = torch.arange(past_len, past_len + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        new_state: KVCache = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, state[i] if state else None)
            new_state.append(present)
        logits = self.lm_head(self.ln_f(x))
        return logits, (new_state if return_state else None)
