"""Helpers the entry points share: user-facing error reporting, config printing, object lists."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from lmlab.config.signatures import accepted_keys, locate
from lmlab.errors import LmlabError, RunInterrupted

log = logging.getLogger("lmlab")


class UserErrorExit(SystemExit):
    """The exit of a command stopped by an :class:`LmlabError`, whose message was printed."""

    def __init__(self, error: LmlabError) -> None:
        super().__init__(1)
        self.error = error


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print an :class:`LmlabError` as one clear message and exit with status 1 (no traceback); a run
    stopped by a signal exits with that signal's status. The message is printed once, on stderr; the run's log
    file records it too."""
    try:
        yield
    except RunInterrupted as stopped:
        print(f"stopped: {stopped}", file=sys.stderr)
        raise SystemExit(stopped.exit_code) from None
    except LmlabError as err:
        _log_to_files(f"{type(err).__name__}: {err}")
        print(f"error: {err}", file=sys.stderr)
        raise UserErrorExit(err) from None


def _log_to_files(message: str) -> None:
    """Write an error record to the log files (a run's ``train.log``), not to the console that shows it already."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


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


def build_network(model: Mapping[str, Any], data_info: Mapping[str, Any], inputs: tuple[str, ...]) -> Any:
    """The network of ``model`` (a config with a ``_target_``), given the ``inputs`` from ``data_info`` that its
    constructor takes."""
    accepted = accepted_keys(locate(model["_target_"]))
    decided = {k: data_info[k] for k in inputs if accepted is None or k in accepted}
    return instantiate(model, **decided)


def instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a named group such as ``callbacks`` or ``logger``."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if node is not None and "_target_" in node]


def to_plain(cfg: Any) -> Any:
    """A resolved plain-container copy (safe to store in checkpoints and hyperparameters)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def print_config(cfg: DictConfig, save_to: Path | None = None) -> None:
    """Print what a researcher reads at the start of a run (the options chosen and the overrides typed), and
    save the whole resolved config beside the run's outputs."""
    from hydra.core.hydra_config import HydraConfig

    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        save_to.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        choices = hydra_cfg.runtime.choices
        shown = [f"{group}={choices[group]}" for group in _GROUPS_SHOWN if choices.get(group)]
        print("options:   " + " ".join(shown))
        if hydra_cfg.overrides.task:
            print("overrides: " + " ".join(hydra_cfg.overrides.task))
    if save_to is not None:
        print(f"config:    {save_to}")


#: the config groups a run's first line names, in the order a reader takes them in
_GROUPS_SHOWN = (
    "experiment",
    "task",
    "data",
    "tokenizer",
    "model",
    "optimizer",
    "scheduler",
    "trainer",
    "logger",
    "callbacks",
    "hparams_search",
    "debug",
)

#: Lightning's start-up messages that tell a researcher nothing about the run
_NOISE = (
    "Tip: For seamless cloud logging",
    "Trainer already configured with model summary callbacks",
    "was configured so 100% of the batches",
    "TPU available:",
    "HPU available:",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in _NOISE)


def quiet_console() -> None:
    """One copy of each Lightning message, without its start-up noise and a deprecation warning from
    Lightning's own code that no user can act on."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # false for lmlab: its data modules restore their position in the epoch (the run says so when it resumes),
    # and a run continued in its folder finds its own checkpoints there
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)  # where Lightning's messages are logged
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    if logging.getLogger().handlers:  # Hydra's handlers print and save them: Lightning's own would print a copy
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:
                    logger.removeHandler(handler)
            logger.propagate = True
