"""The allow-list of what a checkpoint may ask lmlab to build.

A checkpoint stores configs with ``_target_`` keys (the network, the data module, the tokenizer, the
task), and loading one builds those objects. People load checkpoints made by others, so a target
read from a checkpoint is built only when it names an object on this list; anything else is refused
before any object is created or any module outside lmlab is imported.

The list holds the objects registered with :func:`register`: lmlab's own networks, data modules,
data sources, tokenizer builders and tasks, and those of plugins (a package that declares a module
in the ``lmlab.plugins`` entry-point group, whose import registers its classes).

A target that lmlab moved keeps loading under its old name: :data:`RENAMED` maps it to where it is now, and the
configs a checkpoint stores are read through that table before anything is checked or built.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")

#: what each kind of registered object is, as a user reads it in a refusal
KINDS = {
    "network": "network",
    "data": "data module",
    "source": "data source",
    "tokenizer": "tokenizer builder",
    "task": "task",
}

#: targets that moved, old dotted path -> new. A key is a module whose objects all moved with it, or one object;
#: the longest key that a target is, or starts with up to a dot, applies (:func:`current`). Configs stored before a
#: move (a checkpoint's, a run folder's) name the old path. Entries are only ever added, so that a checkpoint of any
#: earlier version loads; each module or object that a config names and that moves gets one.
RENAMED = {
    # lmlab's top-level modules, grouped into config/, run/, training/, inference/ and evaluation/
    "lmlab.callbacks": "lmlab.training.callbacks",
    "lmlab.checkpoint.checkpoint_tokenizer": "lmlab.run.from_checkpoint.checkpoint_tokenizer",
    "lmlab.checkpoint_io": "lmlab.run.checkpoint_io",
    "lmlab.distributed": "lmlab.run.distributed",
    "lmlab.loggers": "lmlab.training.loggers",
    "lmlab.models.CheckpointLM": "lmlab.run.from_checkpoint.CheckpointLM",
    "lmlab.models.from_checkpoint": "lmlab.run.from_checkpoint",
    "lmlab.monitoring": "lmlab.training.monitoring",
    "lmlab.progress": "lmlab.training.progress",
    "lmlab.schedulers": "lmlab.training.schedulers",
    "lmlab.sweep": "lmlab.run.sweep",
}

_registered: dict[str, list[Any]] = {kind: [] for kind in KINDS}
_named: dict[str, str] = {}
_plugins_loaded = False


def register(kind: str) -> Callable[[T], T]:
    """Class or function decorator: checkpoints may build this object as a ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; one of {', '.join(KINDS)}")

    def add(obj: T) -> T:
        if not any(obj is known for known in _registered[kind]):
            _registered[kind].append(obj)
        return obj

    return add


def register_name(target: str, kind: str) -> str:
    """Allow the class at the dotted path ``target`` as a ``kind`` without importing it, and return the path.

    For lmlab's own registered classes whose modules are slow to import (they import Lightning) while a
    fast path reads their checkpoints (``lmlab-generate``); the class registers itself with :func:`register`
    too, and a test checks the two agree.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; one of {', '.join(KINDS)}")
    _named[target] = kind
    return target


def current(target: str) -> str:
    """Where the dotted path ``target`` is now, after the moves in :data:`RENAMED` (``target`` if it did not move)."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        moved = RENAMED.get(".".join(parts[:cut]))
        if moved is not None:
            return ".".join([moved, *parts[cut:]])
    return target


def with_current_targets(node: Any) -> Any:
    """A stored config (plain dicts and lists) with every ``_target_`` where it is now (:func:`current`)."""
    if isinstance(node, dict):
        return {
            key: current(value) if key == "_target_" and isinstance(value, str) else with_current_targets(value)
            for key, value in node.items()
        }
    if isinstance(node, list | tuple):
        items = [with_current_targets(item) for item in node]
        return items if isinstance(node, list) else tuple(items)
    return node


def registered(kind: str) -> tuple[Any, ...]:
    """The objects registered (by :func:`register`, on import) as a ``kind``."""
    return tuple(_registered[kind])


def describe(kind: str | None) -> str:
    """A kind as a user reads it (``None``: any kind)."""
    if kind is None:
        return "lmlab-registered class"
    return KINDS.get(kind, kind)


def is_allowed(target: str, kind: str | None = None) -> bool:
    """Whether ``target`` (a dotted path) names an allowed object of ``kind`` (``None``: of any kind).

    Only lmlab's own modules and modules already imported are looked into: a path into any other
    module is refused without importing it; a path given to :func:`register_name` needs no import.
    """
    if not isinstance(target, str) or not target or any(part.startswith("_") for part in target.split(".")):
        return False
    if target in _named and kind in (None, _named[target]):
        return True
    _load_plugins()
    obj = _resolve(target)
    if obj is None:
        return False
    kinds = [kind] if kind is not None else list(KINDS)
    return any(obj is known for each in kinds for known in _registered[each])


def _import(name: str) -> ModuleType | None:
    """The module ``name`` if it is already imported or is one of lmlab's own."""
    if name in sys.modules:
        return sys.modules[name]
    if name != "lmlab" and not name.startswith("lmlab."):
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _resolve(target: str) -> Any:
    """The object a dotted path names, looking only into modules :func:`_import` allows; else ``None``."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = _import(".".join(parts[:cut]))
        if module is None:
            continue
        obj: Any = module
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def _load_plugins() -> None:
    """Import the modules that installed packages declare in the ``lmlab.plugins`` entry-point group."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in entry_points(group="lmlab.plugins"):
        entry.load()
