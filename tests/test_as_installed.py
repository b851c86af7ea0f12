"""Sweeps and short runs exactly as a user types them: console scripts from a fresh, empty directory, with
no ``paths.*`` or ``hydra.*`` overrides, adding only limits (steps, model size, number of trials)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import Command, script
from lmlab.config.schema import config_dir
from test_config import group_options

# one worker runs this module's tests, which share its trained fixtures
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("as_installed")]

# limits only: a tiny model, a few steps, few validation and test batches, short samples
TINY = [
    "model.n_layer=1",
    "data.block_size=16",
    "data.batch_size=4",
    "trainer.max_steps=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "callbacks.samples.max_new_tokens=5",
]


def _summary(cwd: Path) -> list[dict[str, str]]:
    found = list(cwd.glob("logs/train/multiruns/*/summary.csv"))
    assert len(found) == 1, f"one sweep folder with a summary expected, found {found}"
    with found[0].open(newline="") as f:
        return list(csv.DictReader(f))


def _ok(command: Command) -> Command:
    command.wait()
    assert command.returncode == 0, command.stderr[-3000:]
    assert "Traceback" not in command.stderr
    return command


@pytest.fixture(scope="module")
def commands(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Command]:
    """Each command in its own fresh directory, all started at once."""
    typed = {
        "grid": ["-m", "optimizer.lr=1e-3,3e-3"],
        "short": [],  # fewer steps than trainer.val_check_interval
        "optuna": ["hparams_search=lm_optuna", "hydra.sweeper.n_trials=2"],
        "random": ["hparams_search=lm_random", "hydra.sweeper.n_trials=2"],
        "random_sampler": ["hparams_search=lm_optuna", "hydra/sweeper/sampler=random", "hydra.sweeper.n_trials=2"],
        "default_run": ["trainer.val_check_interval=2"],
    }
    started = {}
    for name, args in typed.items():
        cwd = tmp_path_factory.mktemp(name)
        started[name] = Command([script("lmlab-train"), *args, *TINY], cwd, name)
    return started


@pytest.mark.parametrize("name", ["grid", "optuna", "random", "random_sampler"])
def test_documented_sweeps_run_from_a_fresh_directory(name: str, commands: dict[str, Command]) -> None:
    command = _ok(commands[name])
    rows = _summary(command.cwd)
    assert len(rows) == 2
    assert all(math.isfinite(float(r["val/ppl"])) for r in rows), rows
    assert [float(r["val/ppl"]) for r in rows] == sorted(float(r["val/ppl"]) for r in rows)
    if name != "grid":
        results = next(command.cwd.glob("logs/train/multiruns/*/optimization_results.yaml"))
        assert "best_value" in results.read_text()


def test_random_search_samples_randomly(commands: dict[str, Command]) -> None:
    overrides = [
        json.loads(p.read_text())["overrides"]
        for p in _ok(commands["random"]).cwd.glob("logs/train/multiruns/*/*/metrics.json")
    ]
    lrs = {dict(o.split("=", 1) for o in run)["optimizer.lr"] for run in overrides}
    assert len(lrs) == 2
    config = next(commands["random"].cwd.glob("logs/train/multiruns/*/0/.hydra/hydra.yaml"))
    assert OmegaConf.load(config).hydra.sweeper.sampler._target_ == "optuna.samplers.RandomSampler"


def test_run_shorter_than_the_validation_interval_still_reports_its_metric(commands: dict[str, Command]) -> None:
    command = _ok(commands["short"])
    report = json.loads(next(command.cwd.glob("logs/train/runs/*/metrics.json")).read_text())
    assert report["value"] is not None and math.isfinite(report["value"])
    assert report["value"] == pytest.approx(report["metrics"]["val/ppl"])
    assert Path(report["best_checkpoint"]).name == "step_000003.ckpt", "best and last come from the final step"


# -- each search preset works with every model of its task -------------------------------------------------
def _task_models(task: str) -> list[str]:
    from test_config import model_task

    return [option for option in group_options("model") if model_task(option) == task]


PRESETS = [
    (preset, task)
    for preset in group_options("hparams_search")
    for task in [{"lm": "lm", "cls": "classification", "mt": "translation"}[preset.split("_")[0]]]
]


@pytest.mark.parametrize(("preset", "task"), PRESETS, ids=[p for p, _ in PRESETS])
def test_search_preset_fits_every_model_of_its_task(preset: str, task: str) -> None:
    GlobalHydra.instance().clear()
    try:
        for model in _task_models(task):
            with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
                cfg = compose(
                    "train", overrides=[f"hparams_search={preset}", f"model={model}"], return_hydra_config=True
                )
            assert cfg.hydra.sweeper.params, preset
            for key in cfg.hydra.sweeper.params:
                parent, _, leaf = str(key).rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                assert node is not None and leaf in node, f"{preset} sweeps {key}, which model={model} lacks"
            GlobalHydra.instance().clear()
    finally:
        GlobalHydra.instance().clear()


# -- defaults that agree with each other --------------------------------------------------------------------
@pytest.mark.parametrize(
    "choice",
    ["task=lm", "task=classification", "task=translation", *(f"experiment={e}" for e in group_options("experiment"))],
)
def test_the_schedule_warms_up_within_the_run(choice: str, make_cfg) -> None:
    cfg = make_cfg([choice])
    warmup = cfg.scheduler.get("warmup_steps") or 0
    assert warmup < cfg.trainer.max_steps / 2, f"{choice}: warmup {warmup} of {cfg.trainer.max_steps} steps"


def test_quick_preset_shortens_a_run(make_cfg) -> None:
    cfg = make_cfg(["debug=quick", "task=translation"])
    assert cfg.trainer.max_steps <= 200 and cfg.trainer.limit_test_batches <= 20
    assert cfg.trainer.val_check_interval <= cfg.trainer.max_steps


# -- an experiment keeps its settings whichever data source serves it ------------------------------------
LOCAL_DATA = {"lm": "text_files", "classification": "labeled_files", "translation": "translation_files"}
#: what a local-files source is given by the user, or uses in place of a hub data set's official splits
SOURCE_ONLY = {
    "_target_",
    "path",
    "name",
    "splits",
    "data_files",
    "revision",
    "train_files",
    "val_files",
    "test_files",
    "columns",
    "text_column",
    "val_fraction",
    "test_fraction",
    "split_seed",
}


def _task_of(cfg) -> str:
    target = str(cfg.task.module._target_)
    return (
        "lm"
        if target.endswith("LanguageModelingTask")
        else "classification"
        if target.endswith("ClassificationTask")
        else "translation"
    )


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_experiment_settings_survive_a_local_data_source(experiment: str, make_cfg) -> None:
    hub = make_cfg([f"experiment={experiment}"])
    local = make_cfg([f"experiment={experiment}", f"data={LOCAL_DATA[_task_of(hub)]}", "data.source.train_files=x"])
    for key in hub.data:
        if key not in ("source", "_target_") and key in local.data:
            assert local.data[key] == hub.data[key], f"data.{key}"
    for key in set(hub.data.source) - SOURCE_ONLY:
        if key in local.data.source:
            assert local.data.source[key] == hub.data.source[key], f"data.source.{key}"


def test_a_default_run_prints_what_a_researcher_reads(commands: dict[str, Command]) -> None:
    command = _ok(commands["default_run"])
    out = command.stdout + command.stderr
    for noise in ("Tip:", "LeafSpec", "/-2", "FLOPs", "was configured so 100%", "already configured with model"):
        assert noise not in out, noise
    run_dir = next(command.cwd.glob("logs/train/runs/*"))
    assert f"run folder: {run_dir}" in command.stdout
    assert f"last checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}" in command.stdout
    assert "options:   task=lm data=pydoc tokenizer=char model=gpt" in command.stdout
    assert (run_dir / "config_tree.yaml").is_file() and "config_tree.yaml" in command.stdout
    assert command.stdout.count("test/ppl") == 1, "the test metrics once, in the results table"
    assert len(out.splitlines()) < 60
    assert out.count("Seed set to") == 1, "each Lightning message once"


@pytest.mark.parametrize(
    ("line", "task"),
    [
        ("lmlab-train task=classification model=", "classification"),
        ("lmlab-train model=", "lm"),
        ("lmlab-train experiment=mt/multi30k_cpu model=", "translation"),
        ("lmlab-train -m task=translation optimizer.lr=1e-3,3e-3 model=", "translation"),
    ],
)
def test_completion_of_model_offers_the_models_of_the_task(line: str, task: str, tmp_path: Path) -> None:
    import os
    import subprocess

    done = subprocess.run(
        [script("lmlab-train"), "-sc", "query=bash"],
        cwd=tmp_path,
        env={**os.environ, "COMP_LINE": line},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    offered = sorted(word.removeprefix("model=") for word in done.stdout.split())
    listed = OmegaConf.load(Path(config_dir()) / "task" / f"{task}.yaml").task.models
    assert offered == sorted(listed)
