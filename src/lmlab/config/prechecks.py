"""What every entry point checks from its config alone, before torch and Lightning are imported.

Importing them takes seconds on an idle machine and most of a minute on a busy one; a mistake found only
afterwards (``optimizer.lr=abc``, a missing data file or checkpoint) would keep the user waiting that long. This
module imports neither: the config's keys and values are checked against the signatures earlier runs recorded
(:mod:`lmlab.config.signatures`), every file the config names must exist, and every destination must be one the
command may write (:mod:`lmlab.run.safe_output`). The entry point then checks everything
again once the targets are imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmlab.config.schema import validate_config
from lmlab.data.files import resolve_files
from lmlab.errors import ConfigError
from lmlab.inference.inputs import input_file
from lmlab.run.safe_output import check_folder, check_output

#: the data keys that name files to read (``data.source.train_files=corpus/*.txt``)
_DATA_FILE_KEYS = ("train_files", "val_files", "test_files")
#: the keys that name a text file to read (``-`` or null: stdin)
_INPUT_KEYS = ("input", "prompt_file")


def check_before_imports(cfg: DictConfig, schema: type | None, reads_data_files: bool) -> None:
    """Check ``cfg`` as far as it can be checked without importing its targets. ``reads_data_files``: the
    command reads every data file the config names (training does; scoring a checkpoint reads only the splits it
    scores)."""
    validate_config(cfg, schema, before_imports=True)
    for key in ("ckpt_path", "model.ckpt_path"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not (key == "ckpt_path" and value == "last"):
            checkpoint_file(value, key)
    for key in _INPUT_KEYS:
        if key in cfg:
            input_file(cfg[key], key)
    if "output" in cfg:
        check_output(cfg.output)
    if "out" in cfg and "overwrite" in cfg:  # a folder the command writes (lmlab-export)
        check_folder(cfg.out, "out", bool(cfg.overwrite))
    if reads_data_files:
        for key in _DATA_FILE_KEYS:
            patterns = _plain(OmegaConf.select(cfg, f"data.source.{key}", default=None))
            if patterns:
                resolve_files(patterns, f"data.source.{key}")


def checkpoint_file(value: str | Path, key: str = "ckpt_path") -> Path:
    """The checkpoint file ``value`` names; a :class:`ConfigError` naming ``key`` when there is none."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    hint = (
        " It is a folder: name a checkpoint file in it, such as checkpoints/last.ckpt."
        if path.is_dir()
        else " Give the path of a .ckpt file (a run's checkpoints/ folder holds its best and last.ckpt)."
    )
    raise ConfigError(f"{key}: no checkpoint at '{path}'.{hint}")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
