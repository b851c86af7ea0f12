"""A pretrained Hugging Face causal language model (GPT-2, Llama, Qwen2, SmolLM, ...) as an lmlab language
model: fine-tuned on the LM task's packed blocks, scored by its perplexity, sampled through its own cache."""

from __future__ import annotations

from typing import Any

import torch

from lmlab.errors import ConfigError
from lmlab.models.base import LanguageModelNetwork
from lmlab.models.lora import leaves_base_out, with_lora
from lmlab.models.pretrained import load_pretrained_model, saved_config
from lmlab.registry import register


@register("network")
class PretrainedCausalLM(LanguageModelNetwork):
    """``AutoModelForCausalLM`` from a hub name or a local folder, fine-tuned whole.

    It reads the ids of its own tokenizer (``tokenizer=pretrained`` with the same name or folder): every id
    must fit the model's embedding table, the tokenizer's end-of-text token must be the model's, and the
    context (``data.block_size``) must fit the model's positions. ``dropout`` sets every dropout probability
    of the model's config (``None``: the model's own); ``lora`` trains LoRA adapters instead of every weight
    (:mod:`lmlab.models.lora`). Logits are cut to the tokenizer's
    vocabulary where the model pads its table beyond it (Qwen2 keeps a few hundred unused rows), so
    perplexity is over the tokens the data can hold. The state is the model's own key/value cache.
    ``hf_config`` is set by lmlab checkpoints (see :mod:`lmlab.models.pretrained`).
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        name_or_path: str,
        eos_id: int | None = None,
        dropout: float | None = None,
        lora: dict[str, Any] | None = None,
        hf_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        model = load_pretrained_model("AutoModelForCausalLM", name_or_path, "hf_causal_lm", hf_config, dropout)
        self.model = with_lora(model, lora, "hf_causal_lm")
        #: its checkpoints leave the frozen pretrained weights out (:mod:`lmlab.models.lora`)
        self.base_left_out = leaves_base_out(lora)
        config = self.model.config
        fix = (
            f"Use the model's own tokenizer: tokenizer=pretrained tokenizer.name_or_path={name_or_path} with its "
            "end-of-text token (tokenizer.eos_token)."
        )
        rows = self.model.get_input_embeddings().weight.size(0)
        if vocab_size > rows:
            raise ConfigError(f"The tokenizer has {vocab_size} tokens but '{name_or_path}' embeds only {rows}. {fix}")
        model_eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        if eos_id is not None and config.eos_token_id is not None and eos_id not in model_eos:
            raise ConfigError(
                f"The tokenizer's end-of-text token has id {eos_id} but '{name_or_path}' ends text with id "
                f"{model_eos[0]}. {fix}"
            )
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if positions is not None and block_size > positions:
            raise ConfigError(
                f"data.block_size={block_size} is longer than the {positions} positions '{name_or_path}' has: set "
                f"data.block_size={positions} or less."
            )
        self.vocab_size, self.block_size = vocab_size, block_size

    def checkpoint_hf_config(self) -> dict[str, Any] | None:
        return None if self.base_left_out else saved_config(self.model)

    def forward(
        self, idx: torch.Tensor, state: Any = None, return_state: bool = False
    ) -> tuple[torch.Tensor, Any | None]:
        """Logits for ``idx``; with ``state`` (the model's cache), ``idx`` continues the cached prefix."""
        out = self.model(input_ids=idx, past_key_values=state, use_cache=return_state)
        return out.logits[..., : self.vocab_size], (out.past_key_values if return_state else None)
