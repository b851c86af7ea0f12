"""Pretrained Hugging Face models from a hub name or a local folder, with errors that say what to fix.

A network that wraps one saves the model's Hugging Face config in lmlab checkpoints (``hf_config``), so a
checkpoint loads without the hub or the original folder: the architecture is rebuilt from that config and
the weights come from the checkpoint. A LoRA run's checkpoints, which leave the pretrained weights out, save no
``hf_config``: loading one reads the model from its name or folder again (:mod:`lmlab.models.lora`).

Weights are read from safetensors files only. A ``pytorch_model.bin`` is a pickle, and unpickling a stranger's
file can run code: even torch's restricted ``weights_only`` unpickler has let code through before. So a folder
that holds only pickled weights is refused (:class:`UnsafeCheckpointError`) before any byte of them is read, as
lmlab checkpoints holding pickled objects are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lmlab.errors import ConfigError, UnsafeCheckpointError


def load_pretrained_model(
    auto_class: str,
    name_or_path: str,
    option: str,
    hf_config: dict[str, Any] | None = None,
    dropout: float | None = None,
) -> nn.Module:
    """``transformers.<auto_class>.from_pretrained(name_or_path)``, or the bare architecture of ``hf_config``
    when a checkpoint supplies the weights; ``option`` names the config choice (``model=<option>``) in the
    messages. ``dropout`` replaces every dropout probability the model's config declares (GPT-2's
    ``resid_pdrop`` and the like, Llama's ``attention_dropout``); ``None`` keeps the model's own."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            f"model={option} needs transformers: pip install transformers (or pip install 'lmlab[hf]')."
        ) from None
    if hf_config is not None:
        config = transformers.AutoConfig.for_model(**_plain(hf_config))
        return getattr(transformers, auto_class).from_config(config, trust_remote_code=False).train()
    local = Path(name_or_path).expanduser()
    if not local.exists() and name_or_path.startswith((".", "/", "~")):
        raise ConfigError(
            f"model.name_or_path: no folder at '{local}'. Point it at a folder saved with save_pretrained, "
            "or give a Hugging Face hub name."
        )
    source = str(local) if local.exists() else name_or_path
    try:
        changes = {} if dropout is None else dropout_settings(transformers.AutoConfig.from_pretrained(source), dropout)
        auto = getattr(transformers, auto_class)
        model = auto.from_pretrained(source, trust_remote_code=False, use_safetensors=True, **changes)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())  # on one line
        pickled = sorted(local.glob(PICKLED_WEIGHTS)) if local.is_dir() else []
        if pickled:
            raise UnsafeCheckpointError(
                f"Refusing to load '{pickled[0]}': its weights are pickled, which could run code when loaded; lmlab "
                f"reads safetensors weights only. Convert them where you trust the file: transformers.{auto_class}"
                f".from_pretrained('{local}').save_pretrained('{local}') writes model.safetensors beside it."
            ) from None
        if local.exists():
            raise ConfigError(
                f"model.name_or_path: '{local}' holds no model that model={option} can load ({reason}). It needs "
                "the config.json and safetensors weights that save_pretrained writes."
            ) from None
        raise ConfigError(
            f"model.name_or_path: could not load '{name_or_path}' from the Hugging Face hub ({reason}). Offline? "
            "Point model.name_or_path at a local folder with the model's config and weights."
        ) from None
    # from_pretrained leaves the model in eval mode, and Lightning keeps the modes it finds: fine-tuning
    # would run without the model's dropout
    return model.train()


#: the weight files ``transformers`` saved with ``torch.save`` (a pickle) before it wrote safetensors
PICKLED_WEIGHTS = "pytorch_model*.bin"


def dropout_settings(config: Any, dropout: float) -> dict[str, float]:
    """Each dropout probability a Hugging Face config declares, set to ``dropout``."""
    return {
        key: dropout
        for key, value in config.to_dict().items()
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop"))
    }


def _plain(value: Any) -> Any:
    """``value`` as plain dicts and lists: a config read back through Hydra is a ``DictConfig``, which
    ``transformers``' typed config fields (``rope_parameters``) refuse."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def saved_config(model: nn.Module) -> dict[str, Any]:
    """A Hugging Face model's full config as plain JSON values, for a checkpoint's ``hf_config``."""
    return json.loads(model.config.to_json_string(use_diff=False))
