"""What a run tells its loggers, read back from their files: W&B (offline) gets the flat config once, a name and
group from the experiment and the sweep, tags, the monitored metric's best value in the summary and the Hydra
files, each multirun job its own run; TensorBoard's HParams tab the flat config with the final metrics; the CSV
logger's hparams.yaml the flat config; and gradient norms and histograms where the gradient monitor is on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from conftest import FAST
from lmlab.config.schema import config_dir
from lmlab.train import train
from lmlab.training.loggers import run_name_and_group

pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
hparams_metadata = pytest.importorskip("tensorboard.plugins.hparams.metadata")

FAST_OVERRIDES = [f"++{o}" for o in FAST]
TIMEOUT_S = 300


@pytest.fixture(autouse=True)
def _wandb_offline_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, and W&B's own config, cache and artifact staging folders under ``tmp_path``."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / sub))


# -- reading an offline run ---------------------------------------------------------------------------
def _records(path: Path) -> list[Any]:
    """The records of a ``run-<id>.wandb`` file: a LevelDB-style log (32 KiB blocks, 7-byte record headers:
    checksum, length, type) after a 7-byte ``:W&B`` header, each record a ``wandb_internal.Record``."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


class OfflineRun:
    """What an offline run holds: its name, group, tags, config, metric definitions, history rows, summary, the
    files and artifacts saved with it, and whether it finished."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.name = self.group = ""
        self.tags: list[str] = []
        self.config: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self.files: list[str] = []
        self.artifacts: list[tuple[str, list[str]]] = []  # (type, aliases)
        self.finished = False
        for record in _records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.name, self.group, self.tags = record.run.display_name, record.run.run_group, list(record.run.tags)
                self.config.update(_items(record.run.config.update))
            elif kind == "metric" and record.metric.name:
                self.metrics[record.metric.name] = record.metric
            elif kind == "files":
                self.files += [f.path for f in record.files.files]
            elif kind == "artifact":
                self.artifacts.append((record.artifact.type, list(record.artifact.aliases)))
            elif kind == "config":
                self.config.update(_items(record.config.update))
            elif kind == "history":
                self.history.append(_items(record.history.item))
            elif kind == "summary":
                self.summary.update(_items(record.summary.update))
            elif kind == "exit":
                self.finished = True


def _items(items: Any) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _offline_run(output_dir: Path, settle_s: float = 10.0) -> OfflineRun:
    """The run's records; the W&B service process may flush the last ones (the exit record) shortly after
    ``wandb.finish()`` returns, so an unfinished run is read again for up to ``settle_s`` seconds."""
    runs = list((output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {output_dir / 'wandb'}, found {runs}"
    deadline = time.monotonic() + settle_s
    run = OfflineRun(runs[0])
    while not run.finished and time.monotonic() < deadline:
        time.sleep(0.2)
        run = OfflineRun(runs[0])
    return run


# -- tests -------------------------------------------------------------------------------------------
def test_every_logger_gets_the_flat_config_once_and_the_final_metrics(
    make_cfg, learnable_text: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    cfg = make_cfg(
        [
            *FAST_OVERRIDES,
            "logger=many",
            "data=text_files",
            f"data.source.train_files={learnable_text}",
            "data.source.test_fraction=0.1",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "trainer.log_every_n_steps=1",
            "model.n_head=2",
            "optimizer.lr=0.0025",
            # the best validation perplexity is then the first, highest one: the summary must keep it, not the last
            "task.mode=max",
            "tags=[smoke,tiny]",
            "callbacks.gradient_monitor.every_n_steps=2",
            "callbacks.gradient_monitor.histograms=true",
        ],
        run_dir=run_dir,
    )
    train(cfg)
    result = json.loads((run_dir / "metrics.json").read_text())
    metrics = result["metrics"]

    run = _offline_run(run_dir)
    assert run.finished, "the W&B run was not finished when train() returned"
    assert (run.name, run.group, run.tags) == ("lm/gpt", "", ["smoke", "tiny"])  # a single run has no group
    # the config once, flat: no nested copy (the task's hyperparameters) and no "config." prefix
    config = {key: value for key, value in run.config.items() if key != "_wandb"}
    assert not [key for key, value in config.items() if isinstance(value, dict)]
    assert not [key for key in config if key.startswith(("config", "paths.", "hydra."))]
    assert [key for key in config if key.endswith("lr")] == ["optimizer.lr"]
    assert (config["optimizer.lr"], config["model.n_layer"], config["model.n_head"]) == (0.0025, 1, 2)
    assert config["tags"] == ["smoke", "tiny"] and config["task.mode"] == "max"
    assert 0 < config["parameters.trainable"] == config["parameters.total"]
    assert config["data_info.vocab_size"] > 0
    # metrics: every training step, validation at steps 3 and 6
    assert sum("train/loss" in row for row in run.history) == 6
    val_ppl = [row["val/ppl"] for row in run.history if "val/ppl" in row]
    assert len(val_ppl) == 2 and val_ppl[0] > val_ppl[-1], val_ppl
    # the monitored metric's summary: its best (by task.mode) and its last value
    definition = run.metrics["val/ppl"]
    assert definition.summary.max and definition.summary.last and definition.step_metric == "trainer/global_step"
    assert run.summary["val/ppl"] == {"max": pytest.approx(val_ppl[0]), "last": pytest.approx(val_ppl[-1])}
    assert result["value"] == pytest.approx(val_ppl[0])
    assert run.summary["test/ppl"] == pytest.approx(metrics["test/ppl"])
    assert run.summary["samples/_type"] == "table-file"  # text samples went to W&B as a table
    # the gradient monitor: norms and histograms on every second step, from the first step that completes two
    norm_steps = [row["trainer/global_step"] for row in run.history if "grad_2.0_norm_total" in row]
    assert norm_steps == [1, 3, 5]
    histograms = [row for row in run.history if "gradients/net.wte.weight/_type" in row]  # a histogram's keys nest
    assert [row["trainer/global_step"] for row in histograms] == [1, 3, 5]
    assert {histograms[0][f"{kind}/net.wte.weight/_type"] for kind in ("weights", "gradients")} == {"histogram"}

    _check_tensorboard(run_dir / "tensorboard", metrics, result["value"])
    hparams = yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())
    assert hparams["optimizer.lr"] == 0.0025 and "model" not in hparams and "config" not in hparams
    assert hparams.keys() == config.keys()


def _check_tensorboard(folder: Path, metrics: dict[str, float], best: float) -> None:
    """The HParams tab's data: the flat config, and the final metrics declared with it, whose values it reads as
    the last of each scalar; and the histograms."""
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    content = events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    assert start.hparams["optimizer.lr"].number_value == pytest.approx(0.0025)
    assert start.hparams["model.n_head"].number_value == 2
    assert start.hparams["model._target_"].string_value == "lmlab.models.GPT"
    assert start.hparams["parameters.total"].number_value > 0
    assert not [name for name in start.hparams if name.startswith(("config", "paths", "hydra"))]
    experiment = hparams_metadata.parse_experiment_plugin_data(content[hparams_metadata.EXPERIMENT_TAG])
    declared = {info.name.tag for info in experiment.metric_infos}
    final = {key: value for key, value in metrics.items() if key.startswith(("val/", "test/"))}
    assert declared == {*final, "optimized/val/ppl"}
    assert {"val/ppl", "test/ppl", "test/loss"} <= declared
    for tag, value in {**final, "optimized/val/ppl": best}.items():
        assert events.Scalars(tag)[-1].value == pytest.approx(value, rel=1e-6), tag
    assert [event.step for event in events.Histograms("gradients/net.wte.weight")] == [1, 3, 5]


@pytest.mark.slow
def test_multirun_jobs_get_own_runs_named_and_grouped_by_the_sweep(learnable_text: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "my_sweep"
    args = [
        "-m",
        "optimizer.lr=1e-3,2e-3",
        "logger=wandb",
        "logger.wandb.log_model=all",  # with lmlab's ModelCheckpoint; offline, staged for `wandb sync`
        "data=text_files",
        f"data.source.train_files={learnable_text}",
        "data.block_size=16",
        "data.batch_size=8",
        "model.n_layer=1",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        "callbacks.rich_progress_bar=null",
        "callbacks.rich_model_summary=null",
        "callbacks.samples.max_new_tokens=5",
        "print_config=false",
        "test=false",
        f"paths.root_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "lmlab.train", *args],
        cwd=tmp_path,
        env=dict(os.environ),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]

    runs = [_offline_run(sweep / job) for job in ("0", "1")]  # each job its own run, in its own folder
    assert runs[0].folder.name != runs[1].folder.name
    for job, run, lr in zip(("0", "1"), runs, (1e-3, 2e-3), strict=True):
        assert run.finished
        assert run.name == f"lm/gpt optimizer.lr={lr}"  # the swept override only
        assert run.group == "lm/gpt my_sweep"
        assert run.config["optimizer.lr"] == lr and run.config["logger.wandb.group"] is None
        assert "val/ppl" in run.summary
        # the job's Hydra files, saved with its run
        assert {".hydra/config.yaml", ".hydra/overrides.yaml"} <= set(run.files)
        saved = run.folder / "files" / ".hydra" / "overrides.yaml"
        assert saved.read_text() == (sweep / job / ".hydra" / "overrides.yaml").read_text()
        assert [aliases for kind, aliases in run.artifacts if kind == "model" and "best" in aliases]


@pytest.fixture
def hydra_mode(tmp_path: Path):
    """Compose the train config with W&B as a job in a given Hydra mode would see it, with the job's overrides
    and the sweeper's params."""

    def _compose(mode: str, overrides: list[str] = [], params: dict[str, str] | None = None) -> Any:  # noqa: B006
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(
                config_name="train",
                return_hydra_config=True,
                overrides=[
                    "logger=wandb",
                    f"paths.root_dir={tmp_path}",
                    f"hydra.mode={mode}",
                    f"hydra.sweep.dir={tmp_path}/multiruns/2024-01-02_03-04-05",
                    *overrides,
                ],
            )
        with open_dict(cfg):
            cfg.hydra.sweeper.params = params
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None


def test_a_single_run_is_named_after_the_experiment_or_task_and_model(hydra_mode) -> None:
    hydra_mode("RUN", ["optimizer.lr=0.01"])
    assert run_name_and_group() == ("lm/gpt", None)
    hydra_mode("RUN", ["experiment=lm/shakespeare_char", "optimizer.lr=0.01"])
    assert run_name_and_group() == ("lm/shakespeare_char", None)


def test_a_multirun_job_is_named_after_its_swept_overrides_and_grouped_by_the_sweep(hydra_mode, tmp_path) -> None:
    sweep = tmp_path / "multiruns" / "2024-01-02_03-04-05"
    sweep.mkdir(parents=True)
    # what Hydra's basic sweeper records of the command line: the sweeps, and a value that is not swept
    recorded = {"hydra": {"overrides": {"task": ["optimizer.lr=1e-3,2e-3", "model.n_layer=1"]}}}
    OmegaConf.save(recorded, sweep / "multirun.yaml")
    hydra_mode(
        "MULTIRUN",
        ["experiment=lm/shakespeare_char", "optimizer.lr=0.002", "model.n_layer=1", "model.dropout=0.1"],
        params={"model.dropout": "choice(0.0, 0.1)", "seed": "7"},  # an hparams_search config's: one swept
    )
    name = "lm/shakespeare_char optimizer.lr=0.002 model.dropout=0.1"
    assert run_name_and_group() == (name, "lm/shakespeare_char 2024-01-02_03-04-05")


def test_a_multirun_job_without_swept_keys_is_named_after_the_task_and_model(hydra_mode) -> None:
    hydra_mode("MULTIRUN", ["optimizer.lr=0.002"])
    assert run_name_and_group() == ("lm/gpt", "lm/gpt 2024-01-02_03-04-05")


def test_no_name_or_group_without_hydra() -> None:
    HydraConfig.instance().cfg = None
    assert run_name_and_group() == (None, None)
