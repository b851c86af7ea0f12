"""A training run's folder, and continuing the run in it.

One training is one run: ``lmlab-train ckpt_path=last`` (or the path of a checkpoint of a run) continues the run
the checkpoint belongs to, in its folder, with its config. The overrides the run was started with (Hydra's
``.hydra/overrides.yaml``) are given again, those typed now on top of them; an override that would change the
network, the tokenizer or the data the checkpoint was trained on is refused before anything starts. The loggers
continue the run's history there (one ``metrics.json``, one CSV, one TensorBoard history, the same W&B run).

This runs before Hydra starts the run, and before torch is imported: a checkpoint is told apart from a torn or
foreign file by its zip directory, which every checkpoint written by ``torch.save`` has.
"""

from __future__ import annotations

import logging
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmlab import registry
from lmlab.errors import ConfigError

log = logging.getLogger("lmlab")
#: checkpoints ``ckpt_path=last`` may resume from: Lightning's, the interrupt save, the step-named top-k ones
RESUMABLE = re.compile(r"(last|interrupted)(-v\d+)?\.ckpt|step_\d+.*\.ckpt|hpc_ckpt_\d+\.ckpt")
#: groups and keys whose change would give the checkpoint another network, tokenizer or data
FIXED_BY_THE_RUN = ("experiment", "task", "model", "tokenizer", "data")
#: data settings that change how the data is read, not what it is, so a resumed run may change them
DATA_READING_KEYS = ("data.num_workers", "data.num_proc", "data.shard_tokens", "data.eval_batch_size")


@dataclass
class Resume:
    """A run being continued: its folder, the checkpoint, and the overrides restored and added."""

    folder: Path
    checkpoint: Path
    restored: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


#: the run this process continues, set before Hydra starts it (``None``: a new run)
resuming: Resume | None = None


def checkpoints_under(root: Path) -> list[Path]:
    """The checkpoints a run can resume from, in the run folders under ``root``."""
    return [p for p in root.glob("**/checkpoints/*.ckpt") if RESUMABLE.fullmatch(p.name)]


def newest_first(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)


def looks_complete(path: Path) -> bool:
    """Whether ``path`` reads as a whole ``torch.save`` file: a torn or truncated write has no zip directory."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def run_folder_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint was saved in (``<run>/checkpoints/<name>.ckpt`` beside ``<run>/.hydra``)."""
    folder = checkpoint.resolve().parent.parent
    if checkpoint.resolve().parent.name == "checkpoints" and (folder / ".hydra" / "overrides.yaml").is_file():
        return folder
    return None


def continue_the_run(args: list[str], compose: Any) -> list[str]:
    """The command line that continues the run ``ckpt_path`` names in ``args``: its overrides, ``args`` on top,
    ``ckpt_path`` the checkpoint file and Hydra's run folder the run's (unless ``hydra.run.dir`` names another).
    ``compose(overrides)`` composes the train config (without Hydra's runtime). ``args`` as they are when they
    resume no run (no ``ckpt_path``, a checkpoint outside a run folder, a multirun)."""
    global resuming
    given = _key_values(args)
    value = given.get("ckpt_path")
    if not value or value == "null" or {"-m", "--multirun"} & set(args):
        return args
    others = [arg for arg in args if _key(arg) != "ckpt_path"]
    skipped: list[str] = []
    if value == "last":
        checkpoint = _newest_complete(_log_root(compose(others)), skipped)
        if checkpoint is None:
            return args  # the run reports that nothing loads, and where it looked
    else:
        checkpoint = Path(value).expanduser()
    folder = run_folder_of(checkpoint) if checkpoint.is_file() else None
    if folder is None:
        return args
    restored = [
        arg for arg in _saved_overrides(folder) if _key(arg) not in given and not _key(arg).startswith("hydra.")
    ]
    added = [arg for arg in others if not _key(arg).startswith("hydra.")]
    merged = [*restored, *others, f"ckpt_path={checkpoint.resolve()}"]
    _refuse_changes_to_what_was_trained(folder, compose, merged, added)
    resuming = Resume(folder, checkpoint.resolve(), restored, added, skipped)
    if "hydra.run.dir" in given:  # the folder asked for: the run goes on there
        resuming.folder = Path(given["hydra.run.dir"])
        return merged
    return [*merged, f"hydra.run.dir={folder}"]


def report(resume: Resume) -> None:
    """Log what the continued run took from where (into its ``train.log`` too)."""
    for broken in resume.skipped:
        log.warning("ckpt_path=last: skipped a checkpoint that does not load: %s", broken)
    log.info("Continuing the run in %s from %s", resume.folder, resume.checkpoint)
    log.info("Its config: %s", " ".join(resume.restored) or "(the defaults)")
    if resume.added:
        log.info("Changed now: %s", " ".join(resume.added))


def _newest_complete(root: Path, skipped: list[str]) -> Path | None:
    for path in newest_first(checkpoints_under(root)):
        if looks_complete(path):
            return path
        skipped.append(f"{path} (not a complete checkpoint file)")
    return None


def _log_root(cfg: DictConfig) -> Path:
    return Path(str(cfg.paths.log_dir)) / str(cfg.task_name)


def _saved_overrides(folder: Path) -> list[str]:
    saved = OmegaConf.load(folder / ".hydra" / "overrides.yaml")
    return [str(arg) for arg in saved if _key(str(arg)) != "ckpt_path"]


def _refuse_changes_to_what_was_trained(folder: Path, compose: Any, merged: list[str], added: list[str]) -> None:
    """An override typed now that would give the checkpoint another network, tokenizer or data is refused, naming
    the key, both values and the way to do it instead."""
    typed = [_key(arg) for arg in added]
    fixed = [
        key
        for key in typed
        if key.split(".", 1)[0].split("/", 1)[0] in FIXED_BY_THE_RUN and not key.startswith(DATA_READING_KEYS)
    ]
    if not fixed:
        return
    trained = OmegaConf.load(folder / ".hydra" / "config.yaml")
    now = compose(merged)
    for key in fixed:
        head = key.split(".", 1)[0].split("/", 1)[0]
        names = FIXED_BY_THE_RUN[1:] if head == "experiment" else (key if "." in key else head,)
        for name in names:
            # the run's config names the targets as they were named when it started
            before, after = registry.with_current_targets(_plain(trained, name)), _plain(now, name)
            if before != after:
                raise ConfigError(
                    f"{key}: the run in {folder} was trained with {name}={_short(before)}; continuing it with "
                    f"{name}={_short(after)} would change its {_what(name)}. Drop that override to continue the run, "
                    "or start a new run from the checkpoint's weights (model=from_checkpoint "
                    "model.ckpt_path=<checkpoint>)."
                )


def _what(key: str) -> str:
    head = key.split(".", 1)[0]
    return {"model": "network", "tokenizer": "tokenizer", "data": "data"}.get(head, "network or data")


def _plain(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value


def _short(value: Any, limit: int = 100) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def _key_values(args: list[str]) -> dict[str, str]:
    return {_key(arg): arg.split("=", 1)[1] for arg in args if "=" in arg and not arg.startswith("-")}
