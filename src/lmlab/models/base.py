"""The contracts between the tasks and their networks, as base classes: a task trains, evaluates and decodes
any network of its kind through these calls alone, so adding an architecture needs no change to a task."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

#: what an encoder-decoder computes once per source sentence (nested dicts, lists, tuples of tensors)
Memory = dict[str, Any]
#: what a network carries from one call to the next (a KV cache, an RNN hidden state, a pretrained cache)
State = Any


class LanguageModelNetwork(nn.Module, ABC):
    """Next-token language model: ``forward(idx (B, T), state=None, return_state=False) -> (logits (B, T, V),
    state | None)``.

    With ``return_state`` the second value is what the network needs to continue the text (a KV cache, an RNN
    hidden state); passed back as ``state``, the next ``idx`` continues the prefix it holds, with the logits a
    forward pass over the whole text would give. ``block_size`` is the longest context it reads (``None``: no
    limit), so generation knows when to drop the oldest tokens.
    """

    #: what every network of this kind is built from: its constructor takes these names (checked at start-up)
    required_inputs: ClassVar[tuple[str, ...]] = ("vocab_size",)
    block_size: int | None = None

    @abstractmethod
    def forward(
        self, idx: torch.Tensor, state: State | None = None, return_state: bool = False
    ) -> tuple[torch.Tensor, State | None]:
        """Logits for ``idx``, continuing the prefix that ``state`` holds."""


class ClassifierNetwork(nn.Module, ABC):
    """Text classifier: ``forward(ids (B, T), lengths (B,)) -> logits (B, num_classes)``.

    ``ids`` are right-padded and only each text's first ``lengths`` tokens are read, so a text gets the same
    logits however much padding its batch adds.
    """

    required_inputs: ClassVar[tuple[str, ...]] = ("num_classes",)

    @abstractmethod
    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits of each text."""


class Seq2SeqNetwork(nn.Module, ABC):
    """Encoder-decoder: three calls, so training and decoding need not know the architecture.

    - ``forward(src (B, S), src_lengths (B,), tgt_in (B, T)) -> logits (B, T, tgt_vocab_size)``, teacher forcing;
    - ``encode(src, src_lengths) -> memory``;
    - ``decode_step(tokens (B,), memory, state | None) -> (logits (B, tgt_vocab_size), state)``, one target
      token per sentence per call (the first call feeds the begin token with ``state=None``).

    ``src`` and ``tgt_in`` are right-padded; only the first ``src_lengths`` source tokens are read, and the
    decoder is causal, so a sentence's logits do not depend on the padding of its batch. Every tensor in
    ``memory`` and ``state`` has the batch as its first dimension (or reorders itself, as a Hugging Face cache
    does): beam search copies and reorders them with one ``index_select(0, rows)`` over the whole container.
    ``tgt_vocab_size`` lets a too-wide beam fail early and ``max_target_positions`` caps generated lengths.
    """

    #: none: a pretrained encoder-decoder brings its own vocabularies
    required_inputs: ClassVar[tuple[str, ...]] = ()
    max_target_positions: int | None = None  # the longest target the decoder can read; None: no limit
    tgt_vocab_size: int
    src_pad_id: int
    tgt_pad_id: int

    @abstractmethod
    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> Memory:
        """What the decoder needs of the source, computed once per sentence."""

    @abstractmethod
    def decode_step(
        self, tokens: torch.Tensor, memory: Memory, state: State | None = None
    ) -> tuple[torch.Tensor, State]:
        """Logits ``(B, V)`` for the token after ``tokens (B,)``, and the state to continue from."""

    @abstractmethod
    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, V)`` at every target position at once (teacher forcing)."""
