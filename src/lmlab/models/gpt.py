"""A GPT-style decoder: pre-norm blocks, fused SDPA attention, tied embeddings, KV cache. By default it is
nanoGPT's architecture; the norm, MLP, positions and key/value heads are config choices, so Llama-style
decoders are the same class."""

from __future__ import annotations

import math
from typing import Unpack

import torch
from torch import nn

from lmlab.models.attention import KV
from lmlab.models.base import LanguageModelNetwork
from lmlab.models.positions import Position, sinusoidal_positions
from lmlab.models.transformer import Block, BlockSpec, PartChoices, init_residual_outputs, init_weights
from lmlab.registry import register

KVCache = list[KV]


@register("network")
class GPT(LanguageModelNetwork):
    """Decoder-only Transformer language model.

    With sinusoidal positions the token vectors are scaled by ``sqrt(n_embd)`` (Vaswani et al.), as loud as
    the sine/cosine codes they are added to; learned positions start at std 0.02 like the token vectors.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
        tie_weights: bool = True,
        position: Position = "learned",
        rope_theta: float = 10000.0,
        **parts: Unpack[PartChoices],
    ) -> None:
        super().__init__()
        spec = BlockSpec.positioned(
            position, rope_theta, "model.position", n_embd=n_embd, n_head=n_head, dropout=dropout, bias=bias, **parts
        )
        self.position = position
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        if position == "learned":
            self.wpe = nn.Embedding(block_size, n_embd)
        elif position == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_positions(block_size, n_embd), persistent=False)
            self.embed_scale = math.sqrt(n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(spec, causal=True) for _ in range(n_layer))
        self.ln_f = spec.make_norm()
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.wte.weight
        init_weights(self)
        init_residual_outputs(self.blocks)

    def forward(
        self, idx: torch.Tensor, state: KVCache | None = None, return_state: bool = False
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Logits for ``idx``; with ``state`` (a KV cache), ``idx`` continues the cached prefix."""
        past_len = state[0][0].size(2) if state else 0
        T = idx.size(1)
        if past_len + T > self.block_size:
            raise ValueError(f"Sequence of {past_len + T} tokens exceeds block_size {self.block_size}.")
        x = self.wte(idx)
        if self.position == "learned":
            x = x + self.wpe(torch.arange(past_len, past_len + T, device=idx.device))
        elif self.position == "sinusoidal":
            x = x * self.embed_scale + self.sinusoid[past_len : past_len + T]
        x = self.drop(x)
        new_state: KVCache = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, state[i] if state else None)
            new_state.append(present)
        logits = self.lm_head(self.ln_f(x))
        return logits, (new_state if return_state else None)
