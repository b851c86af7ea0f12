"""Helpers the entry points share: user-facing error reporting, config printing, object lists."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from lmlab.errors import LmlabError, RunInterrupted

log = logging.getLogger("lmlab")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print an :class:`LmlabError` as one clear message and exit with status 1 (no traceback); a run
    stopped by a signal exits with that signal's status."""
    try:
        yield
    except RunInterrupted as stopped:
        print(f"stopped: {stopped}", file=sys.stderr)
        raise SystemExit(stopped.exit_code) from None
    except LmlabError as err:
        log.error("%s: %s", type(err).__name__, err)
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets lmlab's own errors through unwrapped.

    Hydra wraps any exception raised by a target in ``InstantiationException``; a
    :class:`LmlabError` (a missing file, a bad model setting) should reach the user as it is.
    """
    try:
        return hydra.utils.instantiate(node, *args, **kwargs)
    except InstantiationException as wrapped:
        cause: BaseException | None = wrapped
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, LmlabError):
            raise cause from None
        raise


def instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a named group such as ``callbacks`` or ``logger``."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if node is not None and "_target_" in node]


def to_plain(cfg: Any) -> Any:
    """A resolved plain-container copy (safe to store in checkpoints and hyperparameters)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def print_config(cfg: DictConfig, save_to: Path | None = None) -> None:
    """Show the resolved config as a tree and save it beside the run's outputs."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config")
    for key, value in cfg.items():
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(str(key)).add(Syntax(text, "yaml"))
    Console(stderr=False).print(tree)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        save_to.write_text(OmegaConf.to_yaml(cfg, resolve=True))
