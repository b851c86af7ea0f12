"""LoRA adapters (Hu et al. 2021) on a pretrained network, through ``peft``: the pretrained weights stay
frozen and each target layer learns a low-rank update ``B A`` (rank ``r``, scaled by ``alpha / r``).

``model.lora`` of a pretrained model's config holds the settings; ``r: 0`` (the default) fine-tunes the whole
model instead. ``target_modules: null`` takes ``peft``'s default layers for the architecture (the query and
value projections of Llama, Qwen2, BERT and T5; GPT-2's fused ``c_attn``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lmlab.errors import ConfigError

#: ``model.lora`` keys and their meaning, for the messages
SETTINGS = ("r", "alpha", "dropout", "target_modules")


def with_lora(model: nn.Module, lora: Mapping[str, Any] | None, option: str) -> nn.Module:
    """``model`` with LoRA adapters on its target layers (its other weights frozen), or ``model`` itself when
    ``lora`` is ``None`` or its rank is 0; ``option`` names the config choice (``model=<option>``) in messages."""
    if not lora or not int(lora.get("r") or 0):
        return model
    unknown = sorted(set(lora) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"model.lora has no setting {', '.join(unknown)}; its settings: {', '.join(SETTINGS)}.")
    try:
        import peft
    except ImportError:
        raise ConfigError(
            f"model={option} with model.lora.r > 0 needs peft: pip install peft (or pip install 'lmlab[hf]')."
        ) from None
    targets = lora.get("target_modules")
    config = peft.LoraConfig(
        r=int(lora["r"]),
        lora_alpha=float(lora.get("alpha", 16)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=list(targets) if targets is not None else None,
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:
        names = ", ".join(linear_layer_names(model))
        given = f"model.lora.target_modules={list(targets)}" if targets is not None else "model.lora.target_modules"
        raise ConfigError(
            f"{given} matches no layer of model={option} ({' '.join(str(err).split())}). Its linear layers are "
            f"named: {names}."
        ) from None


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last names of the layers LoRA can adapt (linear layers, and GPT-2's ``Conv1D``)."""
    names = {name.rpartition(".")[2] for name, module in model.named_modules() if _adaptable(module)}
    return sorted(names)


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """Trainable and total parameters of ``model`` (a tied matrix counted once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merged(model: nn.Module) -> nn.Module:
    """``model`` with its adapters folded into the weights they adapt (``W + B A * alpha / r``), as a plain
    model again; ``model`` itself when it has none."""
    merge = getattr(model, "merge_and_unload", None)
    return merge() if callable(merge) else model
