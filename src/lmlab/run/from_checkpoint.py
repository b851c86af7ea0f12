"""A language model lmlab trained, as the start of another run: pretrain on one corpus, then fine-tune on
another, whole or with LoRA adapters (``model=from_checkpoint model.ckpt_path=... model.lora.r=8``).

The new run reads the checkpoint's tokenizer (``tokenizer=from_checkpoint``, checked by its fingerprint) and a
context no longer than the network's. With LoRA the checkpoint's weights stay frozen and the new run's
checkpoints hold the adapters only (:mod:`lmlab.models.lora`): loading one reads ``ckpt_path`` again.

The network (:class:`CheckpointLM`) and the tokenizer (:func:`checkpoint_tokenizer`) read a checkpoint
(:mod:`lmlab.run.checkpoint`), so they live here rather than in :mod:`lmlab.models` and :mod:`lmlab.tokenizers`,
which import nothing above them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.inference.language_model import LanguageModel
from lmlab.models.base import LanguageModelNetwork, State
from lmlab.models.lora import leaves_base_out, merged, with_lora
from lmlab.registry import register
from lmlab.run.checkpoint import load_language_model, read_checkpoint
from lmlab.tokenizers import Tokenizer, tokenizer_from_state


@register("network")
class CheckpointLM(LanguageModelNetwork):
    """The network of an lmlab language-model checkpoint (any architecture), adapted with ``lora`` or trained whole;
    its KV cache or hidden state is the state, as the network's own. ``dropout`` replaces every dropout
    probability of the network (``None``: the checkpoint's own)."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        ckpt_path: str,
        tokenizer_fingerprint: str | None = None,
        dropout: float | None = None,
        lora: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        model, _ = load_language_model(ckpt_path)
        if not isinstance(model, LanguageModel):
            raise ConfigError(f"model.ckpt_path: '{ckpt_path}' is not a language model checkpoint.")
        fix = f"Read the checkpoint's ids: tokenizer=from_checkpoint (it takes model.ckpt_path={ckpt_path})."
        theirs = model.tokenizer.fingerprint() if model.tokenizer is not None else None
        if tokenizer_fingerprint is not None and theirs is not None and tokenizer_fingerprint != theirs:
            raise ConfigError(f"The data's tokenizer is not the one '{ckpt_path}' was trained with. {fix}")
        if model.tokenizer is not None and vocab_size != model.tokenizer.vocab_size:
            raise ConfigError(f"The data has {vocab_size} token ids, not those of '{ckpt_path}'. {fix}")
        context = getattr(model.net, "block_size", None)
        if context is not None and block_size > context:
            raise ConfigError(
                f"data.block_size={block_size} is longer than the {context} tokens '{ckpt_path}' reads: set "
                f"data.block_size={context} or less."
            )
        if dropout is not None:
            set_dropout(model.net, dropout)
        self.net = with_lora(model.net, lora, "from_checkpoint")
        #: its checkpoints leave the frozen weights out, which ``ckpt_path`` holds
        self.base_left_out = leaves_base_out(lora)
        self.block_size = context

    def forward(
        self, idx: torch.Tensor, state: State | None = None, return_state: bool = False
    ) -> tuple[torch.Tensor, State | None]:
        return self.net(idx, state, return_state)

    def unwrapped(self) -> torch.nn.Module:
        """The checkpoint's network with the adapters folded into its weights (what export writes)."""
        return merged(self.net)


def set_dropout(net: nn.Module, p: float) -> None:
    """Every dropout probability of ``net``: its ``nn.Dropout`` layers, and the ``dropout`` a module reads itself
    (attention's, between an LSTM's layers)."""
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = p


@register("tokenizer")
def checkpoint_tokenizer(ckpt_path: str) -> Tokenizer:
    """The tokenizer of an lmlab checkpoint (``tokenizer=from_checkpoint``), to train on with the ids it gives."""
    state = read_checkpoint(ckpt_path).get("lmlab", {}).get("tokenizer")
    if not state:
        raise ConfigError(f"tokenizer.ckpt_path: '{ckpt_path}' holds no tokenizer.")
    return tokenizer_from_state(state)
