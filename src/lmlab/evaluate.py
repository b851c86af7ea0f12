"""``lmlab-eval ckpt_path=...``: re-evaluate a checkpoint on its validation and test splits.

Everything needed (network, tokenizer, data settings) comes from the checkpoint. Another test file of
the same kind is named on its own (``data.source.test_files=other.parquet``); the checkpoint supplies
the rest (columns, languages, tokenizer).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from lmlab.checkpoint import check_matches, load_task
from lmlab.config import accepted_keys, check_devices, locate, validate_config
from lmlab.errors import CheckpointMismatchError, ConfigError, DataError
from lmlab.runtime import instantiate, quiet_console, to_plain, user_errors
from lmlab.tasks.base import TaskModule

log = logging.getLogger("lmlab")
_STAGES = {"validation", "test"}


def evaluate(cfg: DictConfig) -> dict[str, float]:
    quiet_console()
    validate_config(cfg, schema=None)
    check_devices(cfg)
    unknown = set(cfg.splits) - _STAGES
    if unknown:
        raise ConfigError(f"splits: unknown split(s) {sorted(unknown)}; use validation and/or test.")
    task, run_cfg = load_task(cfg.ckpt_path)
    if cfg.get("model") is not None:
        check_matches(run_cfg, to_plain(cfg.model), "model", cfg.ckpt_path)
    data_cfg = evaluation_data(cfg, run_cfg, task)
    with _training_files_named(data_cfg, cfg.ckpt_path):
        datamodule = instantiate(data_cfg, **task.datamodule_kwargs(), splits=list(cfg.splits))
        datamodule.prepare_data()
    datamodule.setup("validate")
    task.observe_data(datamodule.data_info)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_model_summary=False)
    metrics: dict[str, float] = {}
    for split in cfg.splits:
        run = trainer.validate if split == "validation" else trainer.test
        loader = datamodule.val_dataloader() if split == "validation" else datamodule.test_dataloader()
        for result in run(task, dataloaders=loader, verbose=False):
            metrics.update({k: float(v) for k, v in result.items()})
    if trainer.is_global_zero:
        for key in sorted(metrics):
            print(f"{key}: {metrics[key]:.4f}")
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "ckpt_path": str(cfg.ckpt_path),
            "splits": list(cfg.splits),
            "data": to_plain(data_cfg),
            "metrics": metrics,
        }
        (out / "metrics.json").write_text(json.dumps(record, indent=2))
    return metrics


def evaluation_data(cfg: DictConfig, run_cfg: dict[str, Any], task: TaskModule) -> DictConfig:
    """The data to score: the checkpoint's own settings; those with the ``data.*`` keys given on top
    (``data.source.test_files=other.parquet``); or a ``data`` option given whole. Every setting the network
    depends on (:attr:`TaskModule.checkpoint_data_keys`, e.g. the translation direction) comes from the
    checkpoint; giving one a different value is refused."""
    trained = run_cfg.get("data") or {}
    if cfg.get("data") is None:
        return OmegaConf.create(trained)
    if "_target_" not in cfg.data:  # keys on top of the checkpoint's settings
        _check_overlay_source(trained, cfg.data, cfg.ckpt_path)
        with open_dict(cfg):
            cfg.data = OmegaConf.merge(OmegaConf.create(trained), cfg.data)
    data = cfg.data  # changed in place: its interpolations (${data.source_lang}) resolve against the config
    given = _data_overrides()
    taken = []
    for key in task.checkpoint_data_keys:
        if key not in trained or key not in data:
            continue
        if key in given and data[key] != trained[key]:
            raise CheckpointMismatchError(
                f"Checkpoint '{cfg.ckpt_path}' was trained with data.{key}={trained[key]!r}; evaluating it with "
                f"data.{key}={data[key]!r} would score another task. Drop that override."
            )
        if data[key] != trained[key]:
            taken.append(f"data.{key}={trained[key]!r}")
        data[key] = trained[key]
    if taken:
        log.info("Taken from the checkpoint: %s", ", ".join(taken))
    return data


def _check_overlay_source(trained: dict[str, Any], overlay: DictConfig, ckpt_path: str) -> None:
    """File keys on top of a hub data set have nothing to attach to: say which data option takes files."""
    source = trained.get("source") or {}
    given = set(overlay.get("source") or {})
    accepted = accepted_keys(locate(source["_target_"])) if "_target_" in source else None
    unknown = sorted(given - accepted) if accepted is not None else []
    if unknown:
        raise ConfigError(
            f"'{ckpt_path}' was trained on {source['_target_'].rsplit('.', 1)[-1]} data, which has no "
            f"data.source.{unknown[0]}. To score local files, give their data option whole, e.g. "
            "data=translation_files (or labeled_files, text_files) with data.source.train_files and "
            "data.source.test_files."
        )


@contextlib.contextmanager
def _training_files_named(data: DictConfig, ckpt_path: str) -> Iterator[None]:
    """A split scored but drawn from the training split (``val_fraction``) needs the training files: when the
    checkpoint's are gone, say that they are the checkpoint's and how to point at them."""
    try:
        yield
    except DataError as err:
        if not str(err).startswith("data.source.train_files:") or "source.train_files" in _data_overrides():
            raise
        raise DataError(
            f"{err} These are the training files '{ckpt_path}' was trained on "
            f"(data.source.train_files={OmegaConf.select(data, 'source.train_files')}); a split drawn from them "
            "(data.source.val_fraction / test_fraction) needs them. Put them back, name where they are now "
            "(data.source.train_files=...), or name the file to score (data.source.test_files=...)."
        ) from None


def _data_overrides() -> set[str]:
    """The ``data.*`` keys given on the command line."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    keys = (o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task)
    return {k[len("data.") :] for k in keys if k.startswith("data.")}


def run(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    from lmlab.cli import evaluate

    evaluate()
