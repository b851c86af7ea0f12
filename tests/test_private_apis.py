"""The private parts of Lightning, Hydra's launcher support and sacrebleu that lmlab relies on, one test per
use, so an upgrade past the pinned minor versions (pyproject.toml) fails here, loudly, with the name of what
moved, rather than somewhere deep in a run."""

from __future__ import annotations

import dataclasses
import inspect

import lightning as L
import pytest
import sacrebleu
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import subprocess_script
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from sacrebleu.metrics import BLEU, CHRF


def _tiny_fit(tmp_path, callbacks=(), max_steps: int = 2) -> L.Trainer:
    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
    )
    trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2))
    return trainer


def test_loop_progress_counters(tmp_path) -> None:
    # callbacks._as_saved_between_batches / _as_saved_before_validation rewrite these before a save
    trainer = _tiny_fit(tmp_path)
    loop = trainer.fit_loop.epoch_loop
    for tracker in (loop.batch_progress.total, loop.batch_progress.current, loop.val_loop.batch_progress.total):
        assert {"ready", "started", "processed", "completed"} <= set(vars(tracker))
    assert loop._batches_that_stepped == 2
    assert hasattr(loop.batch_progress, "is_last_batch") and callable(loop.batch_progress.current.reset)
    epochs = trainer.fit_loop.epoch_progress.current
    assert epochs.ready >= epochs.completed


def test_model_checkpoint_internals() -> None:
    # callbacks.ModelCheckpoint defers step saves to validation; PeriodicCheckpoint writes last.ckpt through it
    checkpoint = ModelCheckpoint(monitor="val/loss", every_n_train_steps=3)
    for name in (
        "_should_skip_saving_checkpoint",
        "_should_save_on_train_epoch_end",
        "_save_last_checkpoint",
        "_monitor_candidates",
    ):
        assert callable(getattr(checkpoint, name)), name
    for name in (
        "_every_n_train_steps",
        "_train_time_interval",
        "_last_time_checked",
        "_defer_save_until_validation",
        "_last_global_step_saved",
    ):
        assert hasattr(checkpoint, name), name
    assert checkpoint._every_n_train_steps == 3
    source = inspect.getsource(ModelCheckpoint.on_validation_end)
    assert "_defer_save_until_validation" in source, "validation end no longer performs a deferred save"


def test_rich_progress_bar_parts_the_run_bar_uses() -> None:
    # progress.ProgressBar replaces the epoch's description and total, and keeps one bar for the run
    assert "current_epoch" in inspect.signature(RichProgressBar._get_train_description).parameters
    bar = RichProgressBar()
    for name in ("validation_description", "progress", "train_progress_bar_id", "theme"):
        assert hasattr(bar, name), name
    assert isinstance(inspect.getattr_static(RichProgressBar, "total_train_batches"), property)
    assert "total_train_batches" in inspect.getsource(RichProgressBar.on_train_epoch_start)


def test_subprocess_launcher_hooks() -> None:
    # distributed.HydraDDPStrategy starts DDP workers on the Hydra job's own config
    assert callable(subprocess_script._hydra_subprocess_cmd)
    assert callable(_SubprocessScriptLauncher._call_children_scripts)
    assert callable(DDPStrategy._configure_launcher)
    assert "procs" in inspect.getsource(_SubprocessScriptLauncher)


def test_sigterm_stops_at_batch_ends() -> None:
    # preemption: Lightning's SIGTERM flag is what stops the loops; received_sigterm is how a run knows
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    assert issubclass(SIGTERMException, SystemExit)
    assert isinstance(L.Trainer.received_sigterm, property)


def test_signal_connector_and_worker_watcher() -> None:
    # preemption: with several processes, Lightning's signal handlers are not installed (their SIGTERM handler
    # makes a collective call), the agreed stop is set on the connector's flag, and the launcher's watcher of
    # the DDP workers takes the agreed exit status as a clean end
    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

    assert list(inspect.signature(_SignalConnector.register_signal_handlers).parameters) == ["self"]
    assert "received_sigterm" in inspect.getsource(_SignalConnector.__init__)
    assert "_signal_connector" in inspect.getsource(L.Trainer.__init__)
    assert callable(_ChildProcessObserver._run)
    assert "_child_processes" in inspect.getsource(_ChildProcessObserver.__init__)


@pytest.mark.parametrize("metric", [BLEU(), CHRF()], ids=["bleu", "chrf"])
def test_sacrebleu_statistics_functions(metric) -> None:
    # metrics.CorpusScore sums sufficient statistics across batches and processes, then scores them
    stats = metric._extract_corpus_statistics(["the cat sat"], [["the cat sat"]])
    summed = [sum(column) for column in zip(*stats, strict=True)]
    assert metric._compute_score_from_stats(summed).score == pytest.approx(
        metric.corpus_score(["the cat sat"], [["the cat sat"]]).score
    )
    assert sacrebleu.__version__.startswith("2.")


def test_hydra_group_options_for_completion() -> None:
    # cli._complete_what_users_pick wraps the loader's listing of a group's options
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    parameters = list(inspect.signature(ConfigLoaderImpl.get_group_options).parameters)
    assert parameters == ["self", "group_name", "results_filter", "config_name", "overrides"]
    assert callable(ConfigLoaderImpl.load_configuration)


def test_hydra_config_repository_for_help_and_data_options() -> None:
    # config._config_repository reads the running app's folders through Hydra's repository
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
    from hydra.conf import ConfigSourceInfo, RuntimeConf
    from hydra.core.default_element import ConfigDefault, GroupDefault
    from hydra.core.plugins import Plugins

    from lmlab.config.schema import config_dir

    Plugins.instance()
    search_path = ConfigSearchPathImpl()
    search_path.append("lmlab", f"file://{config_dir()}")
    repo = ConfigRepository(search_path)
    loaded = repo.load_config("data/pydoc")
    assert loaded is not None and any(isinstance(d, ConfigDefault) for d in loaded.defaults_list)
    train = repo.load_config("train")
    assert train is not None and any(isinstance(d, GroupDefault) and d.group == "data" for d in train.defaults_list)
    assert "pydoc" in repo.get_group_options("data")
    # the running app's folders: HydraConfig.get().runtime.config_sources
    assert "config_sources" in {f.name for f in dataclasses.fields(RuntimeConf)}
    assert {"provider", "path", "schema"} <= {f.name for f in dataclasses.fields(ConfigSourceInfo)}


def test_wandb_logger_init_arguments() -> None:
    # loggers: a W&B run is named and grouped through what WandbLogger hands wandb.init, before the run starts
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="p", name=None, group=None, offline=True)
    assert isinstance(logger._wandb_init, dict) and "name" in logger._wandb_init and "project" in logger._wandb_init
    assert "self._wandb_init" in inspect.getsource(WandbLogger.experiment.fget)
