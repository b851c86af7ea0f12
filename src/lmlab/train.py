"""``lmlab-train``: compose an experiment from config, train it, validate and test it.

Returns the value of ``optimized_metric`` so Hydra sweepers (grid, Optuna) can optimize it.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from lmlab.config.schema import check_devices, validate_config
from lmlab.config.signatures import locate
from lmlab.errors import CheckpointError, CheckpointMismatchError, ConfigError, RunInterrupted
from lmlab.models.lora import parameter_counts
from lmlab.run import continuation
from lmlab.run.checkpoint import check_matches, read_checkpoint
from lmlab.run.checkpoint_io import remove_stale_temporaries
from lmlab.run.distributed import end_job
from lmlab.run.preemption import (
    StopSignals,
    is_requeued_slurm_job,
    mark_slurm_run,
    requeue_signal_of,
    requeue_slurm_job,
    signal_name,
    slurm_job_id,
    slurm_runs,
)
from lmlab.run.runtime import instantiate, instantiate_dict, print_config, quiet_console, to_plain, user_errors
from lmlab.tasks.base import TaskModule
from lmlab.tokenizers import Tokenizer, tokenizer_from_state
from lmlab.training.callbacks import InterruptCheckpoint
from lmlab.training.loggers import continued_loggers, log_final_metrics, log_run_config

log = logging.getLogger("lmlab")


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path``: a file, or ``last`` for the newest checkpoint of this ``task_name`` that loads."""
    point = resume_point(cfg)
    return point[0] if point else None


def resume_point(cfg: DictConfig) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint to resume from and its contents (read once, and checked against the allow-list).

    ``ckpt_path=last`` takes the newest checkpoint (by time written) among ``last``, ``interrupted`` and
    step checkpoints of this task's runs that really loads, skipping broken ones with a warning. A SLURM
    job that was requeued resumes its own run without being asked.
    """
    value = cfg.get("ckpt_path")
    root = Path(cfg.paths.log_dir) / cfg.task_name
    if not value and is_requeued_slurm_job():
        folders = slurm_runs(root)
        point = _newest_loadable(
            [p for folder in folders for p in continuation.checkpoints_under(folder)], f"SLURM job {slurm_job_id()}"
        )
        if point:
            log.info("Requeued SLURM job %s: resuming from %s", slurm_job_id(), point[0])
        return point
    if not value:
        return None
    if value == "last":
        found = continuation.checkpoints_under(root)
        point = _newest_loadable(found, "ckpt_path=last")
        if point is None:
            what = "no checkpoint that loads" if found else "no last.ckpt, interrupted.ckpt or step_*.ckpt"
            raise ConfigError(
                f"ckpt_path=last: {what} under '{root}'. Give the checkpoint file instead: "
                "ckpt_path=/path/to/last.ckpt."
            )
        log.info("ckpt_path=last: resuming from %s", point[0])
        return point
    path = Path(value).expanduser()
    return str(path), read_checkpoint(path)


def _newest_loadable(paths: list[Path], what: str) -> tuple[str, dict[str, Any]] | None:
    skipped = []
    for path in continuation.newest_first(paths):
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as err:
            skipped.append(f"{path} ({err})")
            continue
        if skipped:
            log.warning("%s: skipped %d checkpoint(s) that do not load: %s", what, len(skipped), "; ".join(skipped))
        return str(path), ckpt
    if skipped:
        log.warning("%s: no checkpoint loads: %s", what, "; ".join(skipped))
    return None


def build_datamodule(cfg: DictConfig, tokenizer: Tokenizer | None = None) -> L.LightningDataModule:
    """The task's data module with its tokenizer ready (trained or loaded from cache)."""
    spec = tokenizer if tokenizer is not None else instantiate(cfg.tokenizer)
    datamodule = instantiate(cfg.data, tokenizer=spec)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def build_task(cfg: DictConfig, datamodule: Any) -> TaskModule:
    """The task module; values the data decides (vocabulary size, pad id) come from ``datamodule.data_info``."""
    kwargs = to_plain(cfg.task.module)
    task_cls = locate(kwargs.pop("_target_"))
    return task_cls(
        **kwargs,
        model=to_plain(cfg.model),
        data_info=dict(datamodule.data_info),
        optimizer=to_plain(cfg.optimizer),
        scheduler=to_plain(cfg.get("scheduler")),
        compile=cfg.compile,
        tokenizer_state=datamodule.tokenizer.state(),
        run_config=to_plain(cfg),
    )


def check_resume(path: str, ckpt: dict[str, Any], cfg: DictConfig, datamodule: Any) -> None:
    """A resumed run must use the checkpoint's model, tokenizer and what the data fixes (e.g. its labels)."""
    extras = ckpt["lmlab"]
    check_matches(extras.get("config") or {}, to_plain(cfg.model), "model", path)
    check_data_matches(
        path, locate(extras["task"]), ckpt["hyper_parameters"].get("data_info") or {}, datamodule.data_info
    )
    tokenizer: Tokenizer = datamodule.tokenizer
    if extras.get("tokenizer") and tokenizer_from_state(extras["tokenizer"]).fingerprint() != tokenizer.fingerprint():
        raise CheckpointMismatchError(
            f"Checkpoint '{path}' was trained with a different tokenizer than the one these data and tokenizer "
            "settings give. Use the checkpoint's tokenizer and data settings, or start a new run without ckpt_path."
        )


def check_data_matches(path: str, task_cls: type[TaskModule], trained: dict[str, Any], given: dict[str, Any]) -> None:
    """The data must agree with the checkpoint on everything its network was shaped by (vocabulary, labels)."""
    for key in task_cls.fixed_by_checkpoint:
        if key in trained and trained[key] != given.get(key):
            raise CheckpointMismatchError(
                f"Checkpoint '{path}' was trained with {key}={_short(trained[key])}, but the data gives "
                f"{key}={_short(given.get(key))}. Use data with the checkpoint's {key}, or start a new run "
                "without ckpt_path."
            )


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def train(cfg: DictConfig) -> float | None:
    quiet_console()
    validate_config(cfg)
    check_devices(cfg)
    if cfg.seed is not None:
        L.seed_everything(cfg.seed, workers=True)
    remove_stale_temporaries(cfg.paths.log_dir)
    if continuation.resuming is not None:
        continuation.report(continuation.resuming)
    # read, and checked against the allow-list, before any data is built
    point = resume_point(cfg)
    ckpt_path = point[0] if point else None
    datamodule = build_datamodule(cfg)
    if point is not None:
        check_resume(point[0], point[1], cfg, datamodule)
        log.info(
            "Resuming from %s at step %d, exactly: the data module restores its position in the epoch and the "
            "random state, so the run continues with the batches and losses of an uninterrupted one.",
            ckpt_path,
            point[1].get("global_step", 0),
        )
    task = build_task(cfg, datamodule)

    loggers = continued_loggers(cfg, point[1].get("global_step", 0) if point else None)
    try:
        return _fit_and_test(cfg, task, datamodule, loggers, ckpt_path)
    finally:
        _finish_wandb(loggers, failed=sys.exc_info()[0] is not None)
        end_job()


def _fit_and_test(
    cfg: DictConfig, task: TaskModule, datamodule: Any, loggers: list[Any], ckpt_path: str | None
) -> float | None:
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=instantiate_dict(cfg.get("callbacks")), logger=loggers or False
    )
    if trainer.is_global_zero and cfg.print_config:
        print_config(cfg, Path(cfg.paths.output_dir) / "config_tree.yaml")
    trainable, total = parameter_counts(task.net)
    if trainer.is_global_zero:
        log.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    log_run_config(loggers, cfg, {"parameters": {"trainable": trainable, "total": total}, "data_info": dict(task.info)})

    metrics: dict[str, float] = {}
    if cfg.train:
        if trainer.is_global_zero:
            mark_slurm_run(cfg.paths.output_dir)
        _fit(cfg, trainer, task, datamodule, ckpt_path)
        metrics.update(_floats(trainer.callback_metrics))
    elif datamodule.has_split("validation"):  # the model as it is (a pretrained one's baseline): its validation too
        trainer.validate(task, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        metrics.update(_floats(trainer.callback_metrics))
    best = _best_checkpoint(trainer)
    if cfg.test:
        if not datamodule.has_split("test"):
            log.warning("Skipping the test stage: %s", datamodule.absent_reason("test"))
        else:
            # verbose=False: the results table at the end shows the test metrics once, with the others
            trainer.test(
                task, datamodule=datamodule, ckpt_path=best or (None if cfg.train else ckpt_path), verbose=False
            )
            metrics.update(_floats(trainer.callback_metrics))

    value = _optimized_value(cfg, trainer, metrics)
    log_final_metrics(loggers, metrics, cfg.get("optimized_metric"), value, trainer.global_step)
    if trainer.is_global_zero:
        _report(cfg, metrics, value, best)
    return value


def _fit(cfg: DictConfig, trainer: L.Trainer, task: TaskModule, datamodule: Any, ckpt_path: str | None) -> None:
    """``trainer.fit``, stopping cleanly on Ctrl-C, SIGTERM and the SLURM requeue signal (see
    :mod:`lmlab.run.preemption`)."""
    stop = StopSignals(requeue_signal_of(getattr(trainer.strategy, "cluster_environment", None)))
    with stop:
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except BaseException:
            if stop.received is None:
                raise
        else:
            if stop.received is None:
                return
    raise _interrupted(cfg, trainer, stop)


def _interrupted(cfg: DictConfig, trainer: L.Trainer, stop: StopSignals) -> RunInterrupted:
    """What was saved, how to resume; the run's metrics.json records the stop."""
    assert stop.received is not None
    saved = next((cb.saved for cb in trainer.callbacks if isinstance(cb, InterruptCheckpoint) and cb.saved), None)
    name = signal_name(stop.received)
    if stop.forced:
        what = f"at once on a second Ctrl-C at step {trainer.global_step}; nothing more was saved"
    elif saved:
        what = f"at step {trainer.global_step}; saved {saved}"
    else:
        what = f"at step {trainer.global_step} before a training step finished; nothing new to save"
    resume = saved or _latest_saved(trainer)
    message = f"Training stopped by {name} {what}."
    if resume:
        message += f" Resume with: lmlab-train ckpt_path={resume} (the run continues with its own config)."
    if stop.requeue and trainer.is_global_zero:
        message += " " + requeue_slurm_job() + "."
    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(
            json.dumps(
                {
                    "status": "interrupted",
                    "signal": signal.Signals(stop.received).name,
                    "step": trainer.global_step,
                    "interrupted_checkpoint": str(saved) if saved else None,
                    "resume_from": str(resume) if resume else None,
                    "metrics": _floats(trainer.callback_metrics),
                    "overrides": _overrides(),
                },
                indent=2,
            )
        )
    return RunInterrupted(message, exit_code=128 + stop.received)


def _latest_saved(trainer: L.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "last_model_path", "") if callback else ""
    return path if path and Path(path).is_file() else None


def _finish_wandb(loggers: list[Any], failed: bool) -> None:
    """End the W&B run: its config and summary are written only then, and the next job of a multirun
    (same process) would otherwise log into this run instead of starting its own."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish(exit_code=1 if failed else 0)


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback else ""
    return path if path and Path(path).is_file() else None


def _optimized_value(cfg: DictConfig, trainer: L.Trainer, metrics: dict[str, float]) -> float | None:
    name = cfg.get("optimized_metric")
    if not name:
        return None
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "monitor", None) == name and callback.best_model_score is not None:
        return float(callback.best_model_score)
    if name not in metrics:
        log.warning(
            "optimized_metric '%s' was not logged (no validation ran? logged: %s); returning None.",
            name,
            ", ".join(sorted(metrics)) or "nothing",
        )
        return None
    return metrics[name]


def _report(cfg: DictConfig, metrics: dict[str, float], value: float | None, best: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lmlab results")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(k for k in metrics if k.startswith(("val/", "test/"))):
        table.add_row(key, f"{metrics[key]:.4f}")
    Console().print(table)
    out = Path(cfg.paths.output_dir)
    print(f"run folder: {out}")
    if best:
        print(f"best checkpoint: {best}")
    last = out / "checkpoints" / "last.ckpt"
    if last.is_file():
        print(f"last checkpoint: {last}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(
        json.dumps(
            {
                "optimized_metric": cfg.get("optimized_metric"),
                "mode": cfg.task.get("mode", "min"),
                "value": None if value is None or math.isnan(value) else value,
                "metrics": metrics,
                "best_checkpoint": best,
                "overrides": _overrides(),
            },
            indent=2,
        )
    )


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run(cfg: DictConfig) -> float | None:
    with user_errors():
        return train(cfg)


if __name__ == "__main__":
    from lmlab.cli import train

    train()
