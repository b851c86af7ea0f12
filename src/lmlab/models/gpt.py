"""A GPT-style decoder: pre-LayerNorm blocks, fused SDPA attention, tied embeddings, KV cache."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.attention import KV, Block
from lmlab.registry import register

KVCache = list[KV]


@register("network")
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
