"""LoRA adapters (Hu et al. 2021) on a pretrained network, through ``peft``: the pretrained weights stay
frozen and each target layer learns a low-rank update ``B A`` (rank ``r``, scaled by ``alpha / r``).

``model.lora`` of a pretrained model's config holds the settings; ``r: 0`` (the default) fine-tunes the whole
model instead. ``target_modules: null`` takes ``peft``'s default layers for the architecture (the query and
value projections of Llama, Qwen2, BERT and T5; GPT-2's fused ``c_attn``).

A LoRA run's checkpoints hold what training changed (the adapters, a new head) and leave the frozen pretrained
weights out, with a checksum of them: loading one reads those weights from ``model.name_or_path`` again and
checks they are the ones the adapters were trained on. ``save_base_weights: true`` keeps the whole model in
every checkpoint instead, so it loads without the pretrained model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lmlab.errors import CheckpointMismatchError, ConfigError

#: ``model.lora`` keys and their meaning, for the messages
SETTINGS = ("r", "alpha", "dropout", "target_modules", "save_base_weights")
#: how far a checksum of the pretrained weights may drift (float64 sums in another order, on another device)
CHECKSUM_RTOL = 1e-6


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


def leaves_base_out(lora: Mapping[str, Any] | None) -> bool:
    """Whether checkpoints of a network adapted with these settings leave its frozen pretrained weights out."""
    return bool(lora) and bool(int(lora.get("r") or 0)) and not lora.get("save_base_weights", False)


# -- checkpoints that leave the pretrained weights out ---------------------------------------------------
def frozen_keys(module: nn.Module) -> list[str]:
    """The state keys of ``module``'s frozen parameters (every name of a tensor the state lists twice)."""
    return [key for key, value in module.state_dict(keep_vars=True).items() if _frozen(value)]


def _frozen(value: torch.Tensor) -> bool:
    return isinstance(value, nn.Parameter) and not value.requires_grad


def _checksum(module: nn.Module) -> float:
    frozen = {id(p): p for p in module.parameters() if not p.requires_grad}
    with torch.no_grad():
        return float(sum(p.detach().double().sum().item() for p in frozen.values()))


def leave_out_frozen(state_dict: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """Remove ``module``'s frozen weights from its ``state_dict`` (as a checkpoint stores it); returns the record
    a checkpoint keeps to check the weights it is loaded onto."""
    keys = frozen_keys(module)
    for key in keys:
        state_dict.pop(key, None)
    return {"tensors": len(keys), "checksum": _checksum(module)}


def check_left_out(module: nn.Module, missing: list[str], record: dict[str, Any], source: str) -> None:
    """A checkpoint that left the pretrained weights out (``record``) fits ``module``, whose frozen weights were
    read from ``source`` (:func:`weights_source`): what it lacks is exactly those weights, and they are the ones
    it was trained on."""
    expected = set(frozen_keys(module))
    others = sorted(set(missing) - expected)
    if others:
        raise CheckpointMismatchError(
            f"The checkpoint lacks weights the network trains: {', '.join(others[:5])}. It was written for "
            "another network."
        )
    stored, found = float(record["checksum"]), _checksum(module)
    if abs(found - stored) > CHECKSUM_RTOL * max(abs(stored), 1.0):
        raise CheckpointMismatchError(
            f"The checkpoint holds LoRA adapters trained on other pretrained weights than those of {source} "
            f"(checksum {found:.6g}, trained on {stored:.6g}). Point it at the model they were trained from (the "
            "same revision)."
        )


def weights_source(model: Mapping[str, Any]) -> str:
    """Where a model config's pretrained weights come from, as a user sets it: ``model.name_or_path='gpt2'``."""
    key = next((key for key in ("name_or_path", "ckpt_path") if model.get(key)), "name_or_path")
    return f"model.{key}='{model.get(key)}'"


def load_adapted(module: nn.Module, state_dict: dict[str, Any], record: dict[str, Any] | None, source: str) -> None:
    """Load a checkpoint's weights into ``module``: strictly, or, for a checkpoint that left the pretrained weights
    out (``record``), all but those, which ``module`` read from ``source``."""
    if record is None:
        module.load_state_dict(state_dict)
        return
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if unexpected:
        raise CheckpointMismatchError(f"The checkpoint has weights the network lacks: {', '.join(unexpected[:5])}.")
    check_left_out(module, missing, record, source)
