"""Pre-norm Transformer blocks assembled from the parts a config chooses, and the one weight init every
Transformer in lmlab starts from.

:class:`BlockSpec` holds the choices (width, heads, key/value heads, norm, MLP, rotary positions) and checks
them once; :class:`Block` (decoder or encoder layer) and :class:`DecoderBlock` (encoder-decoder layer) build
their parts from it; :meth:`BlockSpec.positioned` is how every network makes its spec, so GPT, the encoder
classifier and the encoder-decoder offer the same choices with the same checks. Defaults are the original
Transformer's parts: LayerNorm, 4x GELU MLP, multi-head attention, no rotation; a Llama-style model is
``norm="rmsnorm", mlp="swiglu", n_kv_head < n_head`` with ``rope_theta`` set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.attention import KV, CrossAttention, SelfAttention
from lmlab.models.choices import choice
from lmlab.models.mlp import MLPS, MLPKind, mlp_hidden_size
from lmlab.models.norms import NORMS, Norm, make_norm
from lmlab.models.positions import POSITIONS, RotaryEmbedding

INIT_STD = 0.02  # GPT-2's


class PartChoices(TypedDict, total=False):
    """The part settings every lmlab Transformer takes as keywords (``model.norm=rmsnorm``), typed for the
    config check; one left out keeps :class:`BlockSpec`'s default."""

    norm: Norm
    norm_eps: float
    mlp: MLPKind
    mlp_hidden: int | None
    mlp_multiple_of: int
    n_kv_head: int | None


@dataclass(frozen=True)
class BlockSpec:
    """What every block of one network is made of. ``rope_theta``: the rotary base, ``None`` for no rotary
    positions (the network then adds positions to its token vectors); ``position_key``: the config key that
    chose rotary positions, for its errors. Invalid values raise :class:`ConfigError` naming the ``model.*``
    key."""

    n_embd: int
    n_head: int
    dropout: float
    bias: bool
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    mlp: MLPKind = "gelu"
    mlp_hidden: int | None = None
    mlp_multiple_of: int = 256
    n_kv_head: int | None = None
    rope_theta: float | None = None
    position_key: str = "model.position"

    @classmethod
    def positioned(
        cls,
        position: str,
        rope_theta: float,
        position_key: str,
        /,
        *,
        n_embd: int,
        n_head: int,
        dropout: float,
        bias: bool,
        **parts: Any,
    ) -> BlockSpec:
        """The spec of a network whose ``position_key`` setting is ``position``, one of :data:`POSITIONS`:
        ``rope`` rotates queries and keys by ``rope_theta``; learned and sinusoidal positions leave attention
        unrotated, for the network to add to its token vectors. ``parts``: the network's :class:`PartChoices`."""
        choice(position_key, position, POSITIONS)
        rotary = rope_theta if position == "rope" else None
        return cls(n_embd, n_head, dropout, bias, **parts, rope_theta=rotary, position_key=position_key)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}).")
        choice("model.norm", self.norm, NORMS)
        choice("model.mlp", self.mlp, MLPS)
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            divisors = [d for d in range(1, self.n_head + 1) if self.n_head % d == 0]
            raise ConfigError(
                f"model.n_kv_head ({self.n_kv_head}) must divide model.n_head ({self.n_head}): null or "
                f"{self.n_head} (multi-head), 1 (multi-query) or a divisor of n_head (grouped-query); "
                f"valid: null, {', '.join(map(str, divisors))}."
            )
        if self.rope_theta is not None:
            if self.head_size % 2:
                raise ConfigError(
                    f"{self.position_key}=rope rotates pairs of features, so the head size model.n_embd / model.n_head "
                    f"({self.n_embd} / {self.n_head} = {self.head_size}) must be even."
                )
            if self.rope_theta <= 0:
                raise ConfigError(f"model.rope_theta must be positive, got {self.rope_theta}.")
        for key in ("mlp_hidden", "mlp_multiple_of"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"model.{key} must be a positive integer, got {value}.")
        if self.norm_eps <= 0:
            raise ConfigError(f"model.norm_eps must be positive, got {self.norm_eps}.")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def make_norm(self) -> nn.Module:
        return make_norm(self.norm, self.n_embd, self.bias, self.norm_eps)

    def make_mlp(self) -> nn.Module:
        hidden = mlp_hidden_size(self.mlp, self.n_embd, self.mlp_hidden, self.mlp_multiple_of)
        return MLPS[self.mlp](self.n_embd, hidden, self.dropout, self.bias)

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_head``, or one per query head."""
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    def make_self_attention(self, causal: bool) -> SelfAttention:
        rotary = RotaryEmbedding(self.head_size, self.rope_theta) if self.rope_theta is not None else None
        return SelfAttention(self.n_embd, self.n_head, self.kv_heads, self.dropout, self.bias, causal, rotary)

    def make_cross_attention(self) -> CrossAttention:
        """Never rotated, even with rotary positions: a target query's position and a source key's count along
        different sequences, so their distance means nothing, and the memory already carries the source's
        positions (T5's relative positions likewise stay out of cross-attention)."""
        return CrossAttention(self.n_embd, self.n_head, self.kv_heads, self.dropout, self.bias)


class Block(nn.Module):
    """Pre-norm Transformer layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``; causal (a decoder's, with
    a KV cache) or bidirectional (an encoder's, with a key padding mask)."""

    def __init__(self, spec: BlockSpec, causal: bool) -> None:
        super().__init__()
        self.ln_1 = spec.make_norm()
        self.attn = spec.make_self_attention(causal)
        self.ln_2 = spec.make_norm()
        self.mlp = spec.make_mlp()

    def residual_outputs(self) -> list[nn.Linear]:
        """The projections that write into the residual stream, one per branch."""
        return [self.attn.proj, self.mlp.output]

    def forward(
        self, x: torch.Tensor, past: KV | None = None, key_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.ln_1(x), past, key_mask)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


class DecoderBlock(nn.Module):
    """Pre-norm encoder-decoder layer: causal self-attention with a KV cache, then cross-attention over the
    memory, then the MLP, each added as ``x + f(norm(x))``."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.ln_1 = spec.make_norm()
        self.attn = spec.make_self_attention(causal=True)
        self.ln_2 = spec.make_norm()
        self.cross = spec.make_cross_attention()
        self.ln_3 = spec.make_norm()
        self.mlp = spec.make_mlp()

    def residual_outputs(self) -> list[nn.Linear]:
        """The projections that write into the residual stream, one per branch."""
        return [self.attn.proj, self.cross.proj, self.mlp.output]

    def forward(
        self, x: torch.Tensor, memory_kv: KV, memory_mask: torch.Tensor, past: KV | None = None
    ) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.ln_1(x), past)
        x = x + a
        x = x + self.cross(self.ln_2(x), memory_kv, memory_mask)
        return x + self.mlp(self.ln_3(x)), present


def init_weights(net: nn.Module) -> None:
    """GPT-2's start: every Linear and Embedding weight Normal(0, 0.02), every Linear bias zero (norms keep
    their ones and zeros). Call :func:`init_residual_outputs` on each stack of blocks after it."""
    for module in net.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def init_residual_outputs(blocks: nn.ModuleList) -> None:
    """GPT-2's scaled init: each projection writing into the residual stream gets std ``0.02 / sqrt(n)``, ``n``
    the number of branches adding into that stream, so the stream's variance at the top does not grow with
    depth."""
    outputs = [linear for block in blocks for linear in block.residual_outputs()]
    for linear in outputs:
        nn.init.normal_(linear.weight, std=INIT_STD / math.sqrt(len(outputs)))
