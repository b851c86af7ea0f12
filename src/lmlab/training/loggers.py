"""What a run tells its loggers: its resolved config once, flat (``optimizer.lr``), so every logger shows and
compares runs by the same keys; for W&B also a name and group that say which experiment and which point of a
sweep a run is, the monitored metric's best value in the summary and the run's Hydra files; for TensorBoard's
HParams tab, the final metrics at the end of the run."""

from __future__ import annotations

import csv
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, csv_logs, tensorboard
from lightning.pytorch.loggers import wandb as wandb_logger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from lmlab.run.runtime import to_plain

#: top-level config keys no logger gets: Hydra's own settings and this machine's folders
LEFT_OUT = ("hydra", "paths")
#: the Hydra files that record how a run was composed, saved with its W&B run
HYDRA_FILES = ("config.yaml", "overrides.yaml")


def flat_config(cfg: DictConfig, extras: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The resolved config (and ``extras``, such as the parameter counts) as one level of dotted keys."""
    plain = {key: value for key, value in to_plain(cfg).items() if key not in LEFT_OUT}
    return _flatten({**plain, **(extras or {})})


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    # by hand: Lightning's helper is private and pandas.json_normalize builds a data frame for a dict
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_run_config(loggers: Sequence[Logger], cfg: DictConfig, extras: Mapping[str, Any] | None = None) -> None:
    """Log the run's flat config to every logger, once, at the start of the run. A W&B run gets its name, group,
    best-value summary and Hydra files here, as it starts."""
    params = flat_config(cfg, extras)
    for logger in loggers:
        if isinstance(logger, wandb_logger.WandbLogger):
            _name_wandb_run(logger)
        logger.log_hyperparams(params)
        if isinstance(logger, wandb_logger.WandbLogger):
            _describe_wandb_run(logger, cfg)


def log_final_metrics(
    loggers: Sequence[Logger],
    metrics: Mapping[str, float],
    optimized_metric: str | None,
    value: float | None,
    step: int,
) -> None:
    """Give TensorBoard's HParams tab the run's final validation and test metrics and the optimized value
    (``optimized/<metric>``) beside the config. The tab reads the metrics declared with the hyperparameters, and
    only the first declaration of a run counts, so lmlab declares them once, here, when their values are known
    (``logger.tensorboard.default_hp_metric`` must stay false: it declares a placeholder at the start)."""
    final = {name: number for name, number in metrics.items() if name.startswith(("val/", "test/"))}
    if optimized_metric and value is not None:
        final[f"optimized/{optimized_metric}"] = value
    for logger in loggers:
        if isinstance(logger, tensorboard.TensorBoardLogger) and final:
            logger.log_hyperparams(logger.hparams, metrics=final, step=step)


# -- W&B ------------------------------------------------------------------------------------------------
def run_name_and_group() -> tuple[str | None, str | None]:
    """The W&B run's name and group: the experiment (``lm/shakespeare_char``, else the task and model:
    ``lm/gpt``), with a multirun job's swept overrides in the name (``lm/gpt optimizer.lr=0.001``) and the
    sweep folder in the group, which all jobs of the multirun share. ``(None, None)`` outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    choices = hydra_cfg.runtime.choices
    base = choices.get("experiment") or "/".join(c for c in (choices.get("task"), choices.get("model")) if c)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return base or None, None
    name = " ".join(part for part in (base, *swept_overrides(hydra_cfg)) if part)
    return name or None, " ".join(part for part in (base, Path(hydra_cfg.sweep.dir).name) if part)


def swept_overrides(hydra_cfg: DictConfig) -> list[str]:
    """This job's overrides of the keys its multirun sweeps: those of the sweeper's ``params`` (as
    ``hparams_search`` configs declare them) and the sweeps of the multirun's command line, which the sweep
    folder's ``multirun.yaml`` records (Hydra's basic sweeper writes it; the job's own overrides hold only the
    values it got)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{key}={value}" for key, value in _unresolved(hydra_cfg, "sweeper.params", {}).items()]
    multirun = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if multirun.is_file():
        lines += _unresolved(OmegaConf.load(multirun), "hydra.overrides.task", [])
    parser = OverridesParser.create()
    swept = {override.key_or_group for override in parser.parse_overrides(lines) if override.is_sweep_override()}
    job = parser.parse_overrides(_unresolved(hydra_cfg, "overrides.task", []))
    return [override.input_line for override in job if override.key_or_group in swept]


def _unresolved(cfg: DictConfig, key: str, default: Any) -> Any:
    """``cfg``'s ``key`` as plain containers, overrides as typed (``x=${y}`` stays so)."""
    node = OmegaConf.select(cfg, key)
    return default if node is None else OmegaConf.to_container(node, resolve=False)


def _name_wandb_run(logger: wandb_logger.WandbLogger) -> None:
    """Name and group the run before it starts, where ``logger.wandb.name`` / ``group`` leave them unset.
    ``_wandb_init`` is what WandbLogger hands ``wandb.init``: the group cannot change once a run exists."""
    name, group = run_name_and_group()
    for key, default in (("name", name), ("group", group)):
        if logger._wandb_init.get(key) is None and default is not None:
            logger._wandb_init[key] = default


def _describe_wandb_run(logger: wandb_logger.WandbLogger, cfg: DictConfig) -> None:
    """The summary keeps the best value of the monitored metric (``task.monitor`` by ``task.mode``) besides its
    last, against the trainer's step as every metric is; the run's Hydra files are saved with it."""
    from hydra.core.hydra_config import HydraConfig

    run = logger.experiment  # a no-op stand-in on processes other than rank zero
    monitor = cfg.task.get("monitor")
    if monitor:
        run.define_metric(monitor, step_metric="trainer/global_step", summary=f"{cfg.task.get('mode', 'min')},last")
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is None:  # hydra.output_subdir=null: Hydra wrote no files
        return
    folder = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
    for name in HYDRA_FILES:
        if (folder / name).is_file():
            run.save(str(folder / name), base_path=str(folder.parent), policy="now")


# -- a run continued in its folder ------------------------------------------------------------------------
class CSVLogger(csv_logs.CSVLogger):
    """Lightning's CSV logger, which a run continued in its folder (``continue_from_step``: the checkpoint's step)
    continues: ``metrics.csv`` keeps the rows logged before that step, and the continued run's rows follow them,
    one history (Lightning's logger starts the file afresh)."""

    def __init__(self, *args: Any, continue_from_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.continue_from_step = continue_from_step

    @property
    @rank_zero_experiment
    def experiment(self) -> csv_logs.ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self.continue_from_step)
        return self._experiment


class _ContinuedWriter(csv_logs.ExperimentWriter):
    def __init__(self, log_dir: str, keep_before: int | None) -> None:
        self.keep_before = keep_before
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if self.keep_before is None or not self._fs.isfile(self.metrics_file_path):
            super()._check_log_dir_exists()
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            header, rows = list(reader.fieldnames or []), list(reader)
        kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < self.keep_before]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
        self.metrics_keys = header


class TensorBoardLogger(tensorboard.TensorBoardLogger):
    """Lightning's TensorBoard logger; in a run continued in its folder, TensorBoard leaves out the events the
    earlier run wrote from ``continue_from_step`` on (``SummaryWriter``'s ``purge_step``), so the history has each
    step once."""

    def __init__(self, *args: Any, continue_from_step: int | None = None, **kwargs: Any) -> None:
        if continue_from_step is not None:
            kwargs["purge_step"] = continue_from_step
        super().__init__(*args, **kwargs)


class WandbLogger(wandb_logger.WandbLogger):
    """Lightning's W&B logger; a run continued in its folder continues its W&B run (the id it finds in the folder's
    ``wandb/``, where ``id`` is not given)."""

    def __init__(self, *args: Any, continue_from_step: int | None = None, **kwargs: Any) -> None:
        if continue_from_step is not None and not kwargs.get("id"):
            earlier = _wandb_run_id(Path(str(kwargs.get("save_dir") or ".")) / "wandb")
            if earlier:
                kwargs.update(id=earlier, resume="allow")
        super().__init__(*args, **kwargs)


def _wandb_run_id(folder: Path) -> str | None:
    """The id of the newest W&B run under ``folder`` (``run-<time>-<id>`` or ``offline-run-<time>-<id>``)."""
    runs = sorted(folder.glob("*run-*-*"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


def continued_loggers(cfg: DictConfig, continue_from_step: int | None) -> list[Logger]:
    """The run's loggers (``cfg.logger``); those that can continue a run's history do so from
    ``continue_from_step`` (the step of the checkpoint a run continues from in its own folder; ``None``: a new
    run)."""
    from lmlab.config.signatures import locate
    from lmlab.run.runtime import instantiate

    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if node is None or "_target_" not in node:
            continue
        parameters = inspect.signature(locate(str(node._target_))).parameters
        continues = continue_from_step is not None and "continue_from_step" in parameters
        loggers.append(instantiate(node, **({"continue_from_step": continue_from_step} if continues else {})))
    return loggers
