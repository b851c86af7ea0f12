"""Pretrained Hugging Face models from a hub name or a local folder, with errors that say what to fix."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lmlab.errors import ConfigError


def load_pretrained_model(auto_class: str, name_or_path: str, option: str) -> nn.Module:
    """``transformers.<auto_class>.from_pretrained(name_or_path)``; ``option`` names the config choice
    (``model=<option>``) in the messages."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            f"model={option} needs transformers: pip install transformers (or pip install 'lmlab[hf]')."
        ) from None
    local = Path(name_or_path).expanduser()
    if not local.exists() and name_or_path.startswith((".", "/", "~")):
        raise ConfigError(
            f"model.name_or_path: no folder at '{local}'. Point it at a folder saved with save_pretrained, "
            "or give a Hugging Face hub name."
        )
    try:
        model = getattr(transformers, auto_class).from_pretrained(str(local) if local.exists() else name_or_path)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())  # on one line
        if local.exists():
            raise ConfigError(
                f"model.name_or_path: '{local}' holds no model that model={option} can load ({reason}). It needs "
                "the config.json and weights that save_pretrained writes."
            ) from None
        raise ConfigError(
            f"model.name_or_path: could not load '{name_or_path}' from the Hugging Face hub ({reason}). Offline? "
            "Point model.name_or_path at a local folder with the model's config and weights."
        ) from None
    # from_pretrained leaves the model in eval mode, and Lightning keeps the modes it finds: fine-tuning
    # would run without the model's dropout
    return model.train()
