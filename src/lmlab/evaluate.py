"""``lmlab-eval ckpt_path=...``: re-evaluate a checkpoint on its validation and test splits.

Everything needed (network, tokenizer, data settings) comes from the checkpoint. Another test file of
the same kind is named on its own (``data.source.test_files=other.parquet``); the checkpoint supplies
the rest (columns, languages, tokenizer).

Which splits the data has is decided before any is scored: by default each of validation and test that the
data has is scored, and each other is named with the reason (no files and a share of 0, a hub data set without
it, a test split without labels, text shorter than one block); a split asked for by name (``splits=[test]``)
must be there.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from lmlab.config.schema import check_devices, validate_config
from lmlab.config.signatures import accepted_keys, locate
from lmlab.errors import CheckpointMismatchError, ConfigError, DataError
from lmlab.run.checkpoint import check_matches, load_task
from lmlab.run.runtime import instantiate, quiet_console, to_plain, user_errors
from lmlab.tasks.base import TaskModule

log = logging.getLogger("lmlab")
#: the splits scored, by the names ``splits=[...]`` takes (``val``: the prefix of the validation metrics)
_SPLIT_NAMES = {"validation": "validation", "val": "validation", "test": "test"}
#: what ``splits`` null (the default) scores, of what the data has
_EVERY_SPLIT = ("validation", "test")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    quiet_console()
    validate_config(cfg, schema=None)
    check_devices(cfg)
    asked = requested_splits(cfg.get("splits"))
    wanted = asked or _EVERY_SPLIT
    task, run_cfg = load_task(cfg.ckpt_path)
    if cfg.get("model") is not None:
        check_matches(run_cfg, to_plain(cfg.model), "model", cfg.ckpt_path)
    data_cfg = evaluation_data(cfg, run_cfg, task)
    with _training_files_named(data_cfg, cfg.ckpt_path):
        datamodule = instantiate(data_cfg, **task.datamodule_kwargs(), splits=list(wanted))
        datamodule.prepare_data()
    datamodule.setup("validate")
    scored, skipped = splits_to_score(datamodule, wanted, asked is not None)
    task.observe_data(datamodule.data_info)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_model_summary=False)
    metrics: dict[str, float] = {}
    for split in scored:
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
            "splits": scored,
            "skipped": skipped,
            "data": to_plain(data_cfg),
            "metrics": metrics,
        }
        (out / "metrics.json").write_text(json.dumps(record, indent=2))
    return metrics


def requested_splits(given: Any) -> list[str] | None:
    """The splits ``splits=[...]`` names (``val`` is ``validation``), in order, once each; ``None``: not given."""
    if given is None:
        return None
    names = [str(name) for name in given]
    unknown = sorted(set(names) - set(_SPLIT_NAMES))
    if unknown or not names:
        what = f"unknown split(s) {unknown}" if unknown else "no split named"
        raise ConfigError(
            f"splits: {what}; use validation (or val) and/or test, or leave splits out to score every split the "
            "data has."
        )
    return list(dict.fromkeys(_SPLIT_NAMES[name] for name in names))


def splits_to_score(datamodule: Any, wanted: Sequence[str], asked: bool) -> tuple[list[str], dict[str, str]]:
    """The ``wanted`` splits the data has, and why it has none of each other. A split asked for by name
    (``asked``) must be there; otherwise a split the data lacks is skipped with a warning, unless none is left."""
    absent = {split: why for split in wanted if (why := datamodule.absent_reason(split))}
    scored = [split for split in wanted if split not in absent]
    if absent and (asked or not scored):
        lacks = "; ".join(f"no {split} split: {why}" for split, why in absent.items())
        head = f"splits=[{','.join(wanted)}]" if asked else "Nothing to score"
        raise DataError(f"{head}: the data has {lacks}.")
    for split, why in absent.items():
        log.warning("Skipping the %s split: %s.", split, why)
    return scored, absent


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
