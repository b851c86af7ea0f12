"""Text classifiers, each a :class:`~lmlab.models.base.ClassifierNetwork`: right-padded ids and their lengths
to class logits, whatever padding the batch adds."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Unpack

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.base import ClassifierNetwork
from lmlab.models.choices import choice
from lmlab.models.embeddings import embedding_settings, make_embedding
from lmlab.models.lora import leaves_base_out, with_lora
from lmlab.models.positions import Position, sinusoidal_positions
from lmlab.models.pretrained import load_pretrained_model, saved_config
from lmlab.models.recurrent import RecurrentEncoder
from lmlab.models.transformer import Block, BlockSpec, PartChoices
from lmlab.registry import register


def valid_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, width)`` True at real tokens."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def masked_pool(x: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Max or mean of ``x (B, T, D)`` over the positions where ``mask (B, T)`` is True."""
    if how == "max":
        return x.masked_fill(~mask[..., None], float("-inf")).max(dim=1).values
    weights = mask[..., None].to(x.dtype)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1)


@register("network")
class RNNClassifier(ClassifierNetwork):
    """Embedding -> (bidirectional) LSTM/GRU over packed sequences -> max, mean or last-state pooling -> linear."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        pad_id: int,
        cell: str,
        embedding: Mapping[str, Any] | None = None,
        hidden_size: int = 128,
        n_layer: int = 1,
        bidirectional: bool = True,
        pooling: str = "max",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.pooling = choice("model.pooling", pooling, ("max", "mean", "last"))
        self.embedding = make_embedding(vocab_size, pad_id, **embedding_settings(embedding))
        self.drop = nn.Dropout(dropout)
        self.encoder = RecurrentEncoder(
            self.embedding.embedding_dim, hidden_size, n_layer, cell, bidirectional, dropout
        )
        self.head = nn.Linear(self.encoder.output_size, num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, state = self.encoder(self.drop(self.embedding(ids)), lengths)
        if self.pooling == "last":  # the top layer's final state in each direction (h_n, not an LSTM's c_n)
            h_n = state[0] if isinstance(state, tuple) else state
            pooled = torch.cat(list(h_n[-self.encoder.directions :]), dim=-1)
        else:
            pooled = masked_pool(out, valid_mask(lengths, out.size(1)), self.pooling)
        return self.head(self.drop(pooled))


@register("network")
class TextCNN(ClassifierNetwork):
    """Kim (2014): convolutions of several widths over word embeddings, max over time, linear."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        pad_id: int,
        embedding: Mapping[str, Any] | None = None,
        kernel_sizes: list[int] | tuple[int, ...] = (3, 4, 5),
        n_filters: int = 100,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if not kernel_sizes or min(kernel_sizes) < 1:
            raise ConfigError(f"model.kernel_sizes must be positive widths, got {list(kernel_sizes)}.")
        self.embedding = make_embedding(vocab_size, pad_id, **embedding_settings(embedding))
        self.kernel_sizes = list(kernel_sizes)
        self.convs = nn.ModuleList(nn.Conv1d(self.embedding.embedding_dim, n_filters, k) for k in self.kernel_sizes)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(n_filters * len(self.kernel_sizes), num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = valid_mask(lengths, ids.size(1))
        x = self.embedding(ids) * mask[..., None]  # zero beyond each text, whatever the pad vector is
        widest = max(self.kernel_sizes)
        if x.size(1) < widest:
            x = F.pad(x, (0, 0, 0, widest - x.size(1)))
        x = x.transpose(1, 2)
        pooled = []
        for k, conv in zip(self.kernel_sizes, self.convs, strict=True):
            h = F.relu(conv(x))  # (B, filters, T - k + 1)
            # windows inside the text; a text shorter than k keeps its first (zero-extended) window
            starts = torch.arange(h.size(2), device=ids.device)[None, :]
            valid = starts + k <= lengths.clamp(min=k)[:, None]
            pooled.append(h.masked_fill(~valid[:, None, :], float("-inf")).max(dim=2).values)
        return self.head(self.drop(torch.cat(pooled, dim=1)))


@register("network")
class TransformerClassifier(ClassifierNetwork):
    """A BERT-like pre-LN Transformer encoder with padding masks, pooled at a learned [CLS] vector or by mean.

    The [CLS] vector is a parameter put in front of every text rather than a tokenizer token, so any
    tokenizer works; it takes one position, so learned positions have ``max_length + 1`` slots. The norm,
    MLP, key/value heads and positions (rotary too) are the choices GPT offers, LayerNorm, GELU, multi-head
    and learned by default. The blocks and head keep PyTorch's default init rather than
    :func:`~lmlab.models.transformer.init_weights`, so that training runs from before the shared init reproduce.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        pad_id: int,
        max_length: int,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 128,
        positions: Position = "learned",
        pooling: str = "cls",
        dropout: float = 0.1,
        bias: bool = True,
        rope_theta: float = 10000.0,
        **parts: Unpack[PartChoices],
    ) -> None:
        super().__init__()
        spec = BlockSpec.positioned(
            positions, rope_theta, "model.positions", n_embd=n_embd, n_head=n_head, dropout=dropout, bias=bias, **parts
        )
        self.pooling = choice("model.pooling", pooling, ("cls", "mean"))
        self.max_length = max_length
        n_positions = max_length + (self.pooling == "cls")
        self.embedding = make_embedding(vocab_size, pad_id, n_embd)
        if positions == "sinusoidal":  # Vaswani et al.: token vectors scaled up to the unit size of the codes
            self.register_buffer("positions", sinusoidal_positions(n_positions, n_embd), persistent=False)
            self.embed_scale = math.sqrt(n_embd)
            nn.init.normal_(self.embedding.weight, std=n_embd**-0.5)
        else:  # learned vectors added to the token vectors, or none to add (rope rotates inside attention)
            self.positions = nn.Parameter(torch.randn(n_positions, n_embd) * 0.02) if positions == "learned" else None
            self.embed_scale = 1.0
            nn.init.normal_(self.embedding.weight, std=0.02)
        if self.pooling == "cls":
            self.cls = nn.Parameter(torch.randn(n_embd) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(spec, causal=False) for _ in range(n_layer))
        self.ln_f = spec.make_norm()
        self.head = nn.Linear(n_embd, num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if ids.size(1) > self.max_length:
            raise ValueError(f"Sequence of {ids.size(1)} tokens exceeds max_length {self.max_length}.")
        x = self.embedding(ids) * self.embed_scale
        if self.pooling == "cls":
            x = torch.cat([self.cls.expand(x.size(0), 1, -1), x], dim=1)
            lengths = lengths + 1
        T = x.size(1)
        mask = valid_mask(lengths, T)
        x = self.drop(x if self.positions is None else x + self.positions[:T])
        for block in self.blocks:
            x, _ = block(x, key_mask=mask)
        x = self.ln_f(x)
        pooled = x[:, 0] if self.pooling == "cls" else masked_pool(x, mask, "mean")
        return self.head(self.drop(pooled))


@register("network")
class BagOfNGrams(ClassifierNetwork):
    """fastText-style (Joulin et al. 2017): the mean of word and hashed n-gram embeddings, then a linear layer.

    N-grams of 2 .. ``ngrams`` tokens share one table of ``buckets`` rows, indexed by a hash of their ids,
    so word order counts locally without a vocabulary of n-grams.
    """

    BASE, MODULUS = 1_000_003, 2**31 - 1  # the polynomial hash stays far inside int64

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        pad_id: int,
        embedding: Mapping[str, Any] | None = None,
        ngrams: int = 2,
        buckets: int = 200_000,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if ngrams < 1:
            raise ConfigError(f"model.ngrams must be at least 1 (1 = bag of words), got {ngrams}.")
        if ngrams > 1 and buckets < 1:
            raise ConfigError(f"model.buckets must be positive, got {buckets}.")
        self.ngrams, self.buckets = ngrams, buckets
        self.embedding = make_embedding(vocab_size, pad_id, **embedding_settings(embedding, default_dim=64))
        dim = self.embedding.embedding_dim
        self.ngram_embedding = nn.Embedding(buckets, dim) if ngrams > 1 else None
        for table in (self.embedding, self.ngram_embedding):
            if table is not None:  # small vectors, as fastText: the mean of many stays near zero at first
                nn.init.uniform_(table.weight, -1 / dim, 1 / dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    def ngram_ids(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """Bucket of each n-gram starting at positions ``0 .. T - n``, ``(B, T - n + 1)``: a polynomial hash of
        its ids seeded with ``n``, pure integer arithmetic, so it is the same in every run and on every machine."""
        width = ids.size(1) - n + 1
        h = torch.full((ids.size(0), width), n, dtype=torch.long, device=ids.device)
        for i in range(n):
            h = (h * self.BASE + ids[:, i : i + width]) % self.MODULUS
        return h % self.buckets

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = valid_mask(lengths, ids.size(1))
        total = (self.embedding(ids) * mask[..., None]).sum(1)
        count = lengths.to(total.dtype)
        for n in range(2, min(self.ngrams, ids.size(1)) + 1):
            grams = self.ngram_ids(ids, n)
            valid = valid_mask(lengths - n + 1, grams.size(1))  # n-grams that end inside the text
            total = total + (self.ngram_embedding(grams) * valid[..., None]).sum(1)
            count = count + valid.sum(1)
        return self.head(self.drop(total / count.clamp(min=1)[:, None]))


@register("network")
class HFEncoderClassifier(ClassifierNetwork):
    """A pretrained Hugging Face encoder (hub name or local folder), pooled, with a new linear head; ``lora``
    adapts the encoder with LoRA (:mod:`lmlab.models.lora`), the head trained whole. ``hf_config`` is set by
    lmlab checkpoints (see :mod:`lmlab.models.pretrained`)."""

    def __init__(
        self,
        num_classes: int,
        name_or_path: str,
        pooling: str = "mean",
        dropout: float = 0.1,
        freeze_encoder: bool = False,
        lora: dict[str, Any] | None = None,
        hf_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.pooling = choice("model.pooling", pooling, ("cls", "mean"))
        encoder = load_pretrained_model("AutoModel", name_or_path, "hf_encoder", hf_config)
        self.encoder = with_lora(encoder, lora, "hf_encoder")
        #: its checkpoints leave the frozen pretrained weights out (:mod:`lmlab.models.lora`)
        self.base_left_out = leaves_base_out(lora)
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:  # adapters too: the encoder is a fixed feature extractor
            self.encoder.requires_grad_(False)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)

    def checkpoint_hf_config(self) -> dict[str, Any] | None:
        return None if self.base_left_out else saved_config(self.encoder)

    def train(self, mode: bool = True) -> HFEncoderClassifier:
        """A frozen encoder stays in eval mode: its dropout would only add noise to fixed features."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = valid_mask(lengths, ids.size(1))
        # padding becomes id 0 so a pad id outside the encoder's vocabulary cannot index past its table
        hidden = self.encoder(input_ids=ids.masked_fill(~mask, 0), attention_mask=mask.long()).last_hidden_state
        pooled = hidden[:, 0] if self.pooling == "cls" else masked_pool(hidden, mask, "mean")
        return self.head(self.drop(pooled))
