"""Loading lmlab checkpoints safely and checking they match the config.

A checkpoint may come from anyone, so loading one never runs code: the file is read with
``torch.load(weights_only=True)`` (tensors and plain values only), and every ``_target_`` in the
configs that loading builds from (the task, the network, the data and tokenizer settings) must
name an object on :mod:`lmlab.registry`'s allow-list before anything is built. Interpolations
(``${...}``) there are refused too: stored configs are resolved, and a resolver call could only be
an attempt to reach the environment or run code. The rest of the stored run config (callbacks,
loggers, optimizer) is kept as inert data and never built from a checkpoint. A target that lmlab has moved since
the checkpoint was written is read where it is now (:data:`lmlab.registry.RENAMED`).
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator, Set
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmlab import registry
from lmlab.config.prechecks import checkpoint_file
from lmlab.config.signatures import accepted_keys, locate
from lmlab.errors import CheckpointError, CheckpointMismatchError, ConfigError, UnsafeCheckpointError
from lmlab.inference import language_model
from lmlab.inference.language_model import LanguageModel
from lmlab.models.lora import load_adapted, weights_source

if TYPE_CHECKING:
    from lmlab.tasks.base import TaskModule

#: the configs loading builds from, and the kind of object the ``_target_`` at their top must be (nested
#: targets: any registered kind)
BUILT_FROM = {
    "hyper_parameters.model": "network",
    "lmlab.config.model": "network",
    "lmlab.config.data": "data",
    "lmlab.config.data.source": "source",
    "lmlab.config.tokenizer": "tokenizer",
}
#: a Hugging Face config key that points transformers at custom model code
_REMOTE_CODE_KEY = "auto_map"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, read without unpickling objects and checked by :func:`verify_checkpoint`."""
    path = checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err) or _is_pickle_stream(path):
            raise UnsafeCheckpointError(
                f"Refusing to load '{path}': it holds pickled Python objects, which could run code when loaded. "
                "lmlab checkpoints hold only tensors and plain values; get the checkpoint from its lmlab run."
            ) from None
        raise _unreadable(path, err) from None
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise _unreadable(path, err) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("lmlab"), dict):
        raise CheckpointMismatchError(f"'{path}' is not an lmlab checkpoint (it has no 'lmlab' section).")
    _name_current_targets(ckpt)
    verify_checkpoint(ckpt, path)
    return ckpt


def _name_current_targets(ckpt: dict[str, Any]) -> None:
    """Name each target that the checkpoint's configs (and its task) give where it is now, when lmlab has moved it
    since the checkpoint was written (:data:`lmlab.registry.RENAMED`)."""
    if "hyper_parameters" in ckpt:
        ckpt["hyper_parameters"] = registry.with_current_targets(ckpt["hyper_parameters"])
    extras = ckpt["lmlab"]
    if isinstance(extras.get("task"), str):
        extras["task"] = registry.current(extras["task"])
    if "config" in extras:
        extras["config"] = registry.with_current_targets(extras["config"])


def _is_pickle_stream(path: Path) -> bool:
    """A bare pickle (protocol 2 or later opens with PROTO), not torch's zip format."""
    with path.open("rb") as f:
        return f.read(1) == pickle.PROTO


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    size = path.stat().st_size
    reason = " ".join(str(err).split())[:200] or type(err).__name__
    return CheckpointError(
        f"'{path}' ({size} bytes) is not a readable checkpoint: truncated, empty or not a checkpoint file "
        f"({type(err).__name__}: {reason}). Use another checkpoint of the run (last.ckpt, interrupted.ckpt or "
        "step_*.ckpt), or ckpt_path=last to pick the newest one that loads."
    )


def verify_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint whose task, network, data or tokenizer config names anything outside the
    allow-list (nested ``_target_``s, ``_args_`` lists and ``_partial_`` nodes alike), holds an
    interpolation, or points transformers at custom code."""
    network_inputs = _network_inputs(ckpt["lmlab"].get("task"), path)
    for key in ("hyper_parameters.model", "lmlab.config.model", "lmlab.config.data", "lmlab.config.tokenizer"):
        _verify_node(_get(ckpt, key), key, path)
    # the data_info values the task hands to the network's config
    data_info = _get(ckpt, "hyper_parameters.data_info") or {}
    for name in network_inputs:
        _verify_node(
            data_info.get(name) if isinstance(data_info, dict) else None, f"hyper_parameters.data_info.{name}", path
        )


def _network_inputs(task: Any, path: str | Path) -> tuple[str, ...]:
    """The ``data_info`` keys the checkpoint's task builds its network from; a task off the allow-list is refused."""
    if not registry.is_allowed(task, "task"):
        raise _refused(path, "lmlab.task", task, "task")
    if task == language_model.TASK:
        return language_model.NETWORK_INPUTS
    return getattr(locate(task), "network_inputs", ())


def _get(ckpt: dict[str, Any], key: str) -> Any:
    node: Any = ckpt
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _verify_node(node: Any, key: str, path: str | Path) -> None:
    if isinstance(node, str):
        if "${" in node:
            raise UnsafeCheckpointError(
                f"Refusing to load '{path}': {key} holds the interpolation {node[:80]!r}. Stored configs are "
                "resolved, so an interpolation or resolver call there is not from an lmlab run."
            )
        return
    if isinstance(node, list | tuple):
        for i, item in enumerate(node):
            _verify_node(item, f"{key}.{i}", path)
        return
    if not isinstance(node, dict):
        return
    if "_target_" in node and not registry.is_allowed(node["_target_"], BUILT_FROM.get(key)):
        raise _refused(path, f"{key}._target_", node["_target_"], BUILT_FROM.get(key))
    if _REMOTE_CODE_KEY in node:
        raise UnsafeCheckpointError(
            f"Refusing to load '{path}': {key}.{_REMOTE_CODE_KEY} points transformers at custom model code, "
            "which lmlab never runs from a checkpoint."
        )
    for child_key, child in node.items():
        _verify_node(child, f"{key}.{child_key}", path)


def _refused(path: str | Path, key: str, target: Any, kind: str | None) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"Refusing to load '{path}': {key} is {target!r}, which is not a {registry.describe(kind)} that lmlab "
        "allows a checkpoint to build (loading a checkpoint never runs other code). If it is your own class, "
        "register it with @lmlab.registry.register in a module of the 'lmlab.plugins' entry-point group."
    )


def load_task(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[TaskModule, dict[str, Any]]:
    """Rebuild the task, network, tokenizer and weights from a checkpoint; returns it and the run config."""
    return _build_task(read_checkpoint(path), path, map_location)


def load_language_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[LanguageModel | TaskModule, dict[str, Any]]:
    """What text is sampled from, and the run config: the network and tokenizer of a language-model task's
    checkpoint as a :class:`LanguageModel`, built without the task (or Lightning); for another task, the task
    as :func:`load_task` rebuilds it, which can generate text only if it has ``generate_text``."""
    ckpt = read_checkpoint(path)
    extras = ckpt["lmlab"]
    if extras["task"] != language_model.TASK:
        return _build_task(ckpt, path, map_location)
    name = language_model.TASK.rpartition(".")[2]
    hyper = _hyperparameters(ckpt, path, name, language_model.TASK_KEYWORDS)
    with _rebuilding(path, name):
        model = LanguageModel.from_task_state(
            hyper, extras.get("tokenizer"), ckpt["state_dict"], extras.get("base_left_out")
        )
    return model.to(map_location), extras.get("config") or {}


def _build_task(
    ckpt: dict[str, Any], path: str | Path, map_location: str | torch.device
) -> tuple[TaskModule, dict[str, Any]]:
    extras = ckpt["lmlab"]
    task_cls = locate(extras["task"])
    hyper = _hyperparameters(ckpt, path, task_cls.__name__, accepted_keys(task_cls))
    with _rebuilding(path, task_cls.__name__):
        # the optimizer and schedule are for training: a loaded task never builds them
        built = {**hyper, "optimizer": None, "scheduler": None}
        task = task_cls(**built, tokenizer_state=extras.get("tokenizer"), run_config=extras.get("config"))
        load_adapted(task, ckpt["state_dict"], extras.get("base_left_out"), weights_source(hyper["model"]))
    return task.to(map_location), extras.get("config") or {}


def _hyperparameters(
    ckpt: dict[str, Any], path: str | Path, task_name: str, accepted: Set[str] | None
) -> dict[str, Any]:
    """The task's hyperparameters, refused unless they and the weights are there and the task takes them all."""
    hyper = ckpt.get("hyper_parameters")
    if not isinstance(hyper, dict) or not {"model", "data_info"} <= set(hyper) or "state_dict" not in ckpt:
        raise CheckpointMismatchError(f"'{path}' holds no task hyperparameters and weights; it cannot be rebuilt.")
    unexpected = sorted(set(hyper) - accepted) if accepted is not None else []
    if unexpected:
        raise CheckpointMismatchError(
            f"'{path}' has hyperparameters {', '.join(unexpected)} that {task_name} does not take; it was "
            "written by another program or lmlab version."
        )
    return hyper


@contextlib.contextmanager
def _rebuilding(path: str | Path, task_name: str) -> Iterator[None]:
    """Report a network or weights that do not fit the stored config as one mismatch error."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        reason = " ".join(str(err).split())[:300]
        raise CheckpointMismatchError(
            f"'{path}' cannot be rebuilt as a {task_name} ({type(err).__name__}: {reason})."
        ) from None


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
            raise CheckpointMismatchError(
                f"'{path}' holds another task or network shape than '{paths[-1]}'; average checkpoints of one run."
            )
        if ckpt["lmlab"]["tokenizer"] != last["lmlab"]["tokenizer"]:
            raise CheckpointMismatchError(f"'{path}' was trained with another tokenizer than '{paths[-1]}'.")
    averaged = {}
    for key, value in last["state_dict"].items():
        if value.is_floating_point():
            averaged[key] = torch.stack([c["state_dict"][key].double() for c in checkpoints]).mean(0).to(value.dtype)
        else:
            averaged[key] = value
    return {**last, "state_dict": averaged}
