"""Loading lmlab checkpoints safely (``weights_only``) and checking they match the config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmlab.config import locate
from lmlab.errors import CheckpointMismatchError, ConfigError
from lmlab.tasks.base import TaskModule


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, loaded without unpickling arbitrary objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path: no checkpoint at '{path}'.")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "lmlab" not in ckpt:
        raise CheckpointMismatchError(f"'{path}' is not an lmlab checkpoint (it has no 'lmlab' section).")
    return ckpt


def load_task(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[TaskModule, dict[str, Any]]:
    """Rebuild the task, network, tokenizer and weights from a checkpoint; returns it and the run config."""
    ckpt = read_checkpoint(path)
    extras = ckpt["lmlab"]
    task_cls = locate(extras["task"])
    task = task_cls(**ckpt["hyper_parameters"], tokenizer_state=extras["tokenizer"], run_config=extras["config"])
    task.load_state_dict(ckpt["state_dict"])
    return task.to(map_location), extras["config"] or {}


def check_matches(ckpt_config: dict[str, Any], requested: dict[str, Any] | None, key: str, path: str) -> None:
    """Raise if ``requested`` (a config group like ``model``) differs from what the checkpoint was trained with."""
    trained = ckpt_config.get(key)
    if requested is None or trained is None or trained == requested:
        return
    diff = sorted(k for k in set(trained) | set(requested) if trained.get(k) != requested.get(k))
    shown = ", ".join(f"{k}: {trained.get(k)!r} -> {requested.get(k)!r}" for k in diff[:6])
    raise CheckpointMismatchError(
        f"Checkpoint '{path}' was trained with a different {key} ({shown}). Drop the {key} overrides to use "
        f"the checkpoint's own settings, or point ckpt_path at a checkpoint trained with this {key}."
    )


def average_checkpoints(paths: list[str | Path]) -> dict[str, Any]:
    """The last checkpoint with its weights replaced by the mean of every checkpoint's (floating-point
    tensors; integer buffers are the last one's). Averaging the last few checkpoints of a translation run
    usually gains a little BLEU at no training cost. All must come from the same task, tokenizer and
    network shape."""
    if len(paths) < 2:
        raise ConfigError(f"Averaging needs at least two checkpoints, got {len(paths)}.")
    checkpoints = [read_checkpoint(p) for p in paths]
    last = checkpoints[-1]
    reference = {k: (v.shape, v.dtype) for k, v in last["state_dict"].items()}
    for path, ckpt in zip(paths, checkpoints, strict=True):
        shapes = {k: (v.shape, v.dtype) for k, v in ckpt["state_dict"].items()}
        if ckpt["lmlab"]["task"] != last["lmlab"]["task"] or shapes != reference:
            raise CheckpointMismatchError(f"'{path}' holds another task or network shape than '{paths[-1]}'; "
                                          "average checkpoints of one run.")
        if ckpt["lmlab"]["tokenizer"] != last["lmlab"]["tokenizer"]:
            raise CheckpointMismatchError(f"'{path}' was trained with another tokenizer than '{paths[-1]}'.")
    averaged = {}
    for key, value in last["state_dict"].items():
        if value.is_floating_point():
            averaged[key] = torch.stack([c["state_dict"][key].double() for c in checkpoints]).mean(0).to(value.dtype)
        else:
            averaged[key] = value
    return {**last, "state_dict": averaged}
