"""A new task is one small package and a config folder: the sequence-tagging plugin in ``tests/plugins``
(``lmlab_tagging``: a data module, a network, a task, and ``conf/`` with ``task/tagging.yaml``,
``data/tagging_files.yaml``, ``model/bigru_tagger.yaml``) trains, evaluates and predicts through the console
scripts as a user runs them, with no change to ``src/lmlab``.

The plugin is made importable with ``PYTHONPATH`` and its configs visible with Hydra's search path
(``hydra.searchpath=[pkg://lmlab_tagging.conf]`` on the command line). Checkpoints of the plugin's task load
only when the plugin is declared in the ``lmlab.plugins`` entry-point group (the allow-list of
:mod:`lmlab.registry`): ``pip install`` of ``tests/plugins`` would declare it; here the test writes the
entry point's metadata (a ``.dist-info`` folder, what ``pip`` writes) into a folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.hydra_config import HydraConfig

from conftest import QUIET, Command, script
from lmlab.config.schema import data_options, user_options

# one worker runs this module's tests, which share its trained fixtures
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("extension")]

PLUGINS = Path(__file__).resolve().parent / "plugins"
#: puts the plugin's configs on Hydra's search path
SEARCH_PATH = "hydra.searchpath=[pkg://lmlab_tagging.conf]"
#: the plugin's entry point, as its pyproject.toml declares it
ENTRY_POINT = '[project.entry-points."lmlab.plugins"]\ntagging = "lmlab_tagging"'

#: the toy tag set: every word has one tag, so the tags are a function of the words
LEXICON = {
    "DET": ["the", "a", "every"],
    "ADJ": ["red", "big", "old", "small"],
    "NOUN": ["cat", "dog", "mat", "bird", "fish"],
    "VERB": ["sees", "likes", "chases", "eats"],
    "ADP": ["on", "with", "near"],
}
TAG_OF = {word: tag for tag, words in LEXICON.items() for word in words}


def tagged_sentence(rng: random.Random) -> dict[str, list[str]]:
    """``DET (ADJ) NOUN VERB DET (ADJ) NOUN (ADP DET NOUN)`` with random words of each tag."""
    tags = ["DET", *["ADJ"] * (rng.random() < 0.5), "NOUN", "VERB", "DET", *["ADJ"] * (rng.random() < 0.5), "NOUN"]
    if rng.random() < 0.5:
        tags += ["ADP", "DET", "NOUN"]
    return {"tokens": [rng.choice(LEXICON[tag]) for tag in tags], "tags": tags}


def write_split(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps(tagged_sentence(rng)) + "\n" for _ in range(n)), encoding="utf-8")
    return path


def plugin_env(tmp: Path, entry_point: bool) -> dict[str, str]:
    """``PYTHONPATH`` with the plugin package, and with the plugin's entry point declared when asked."""
    paths = [str(PLUGINS)]
    if entry_point:
        info = tmp / "site" / "lmlab_tagging-0.1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lmlab-tagging\nVersion: 0.1.0\n")
        (info / "entry_points.txt").write_text("[lmlab.plugins]\ntagging = lmlab_tagging\n")
        paths.append(str(tmp / "site"))
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {"PYTHONPATH": os.pathsep.join(paths)}


def train_args(data: Path, *extra: str) -> list[str]:
    """The ``lmlab-train`` command line of a fast tagging run."""
    return [
        script("lmlab-train"),
        SEARCH_PATH,
        "task=tagging",
        f"data.source.train_files={data / 'train.jsonl'}",
        f"data.source.val_files={data / 'val.jsonl'}",
        f"data.source.test_files={data / 'test.jsonl'}",
        "data.batch_size=16",
        "optimizer.lr=1e-2",
        "scheduler.warmup_steps=5",
        "trainer.max_steps=20",
        "trainer.val_check_interval=10",
        *QUIET,
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A training run and a run that only tests the untrained network (side by side), from an empty folder;
    then, on the checkpoint, ``lmlab-eval`` with and without the plugin's entry point and ``lmlab-predict``."""
    tmp = tmp_path_factory.mktemp("extension")
    data = tmp / "data"
    data.mkdir()
    for split, n, seed in (("train", 300, 0), ("val", 50, 1), ("test", 50, 2)):
        write_split(data / f"{split}.jsonl", n, seed)
    cwd = tmp / "work"
    cwd.mkdir()
    importable, registered = plugin_env(tmp, entry_point=False), plugin_env(tmp, entry_point=True)
    commands = {
        "train": Command(train_args(data), cwd, "train", importable),
        "untrained": Command(train_args(data, "train=false", "task_name=untrained"), cwd, "untrained", importable),
    }
    found: dict[str, Any] = {"cwd": cwd, "commands": commands}
    for command in commands.values():
        command.wait()
    if commands["train"].returncode != 0:
        return found
    (run_dir,) = (cwd / "logs" / "train" / "runs").iterdir()
    report = json.loads((run_dir / "metrics.json").read_text())
    ckpt = report["best_checkpoint"]
    (cwd / "input.txt").write_text("the red cat sees a dog\n\nevery bird eats the small fish near a mat\n")
    later = {
        "eval": Command([script("lmlab-eval"), f"ckpt_path={ckpt}"], cwd, "eval", registered),
        "eval_unregistered": Command([script("lmlab-eval"), f"ckpt_path={ckpt}"], cwd, "eval_unregistered", importable),
        "predict": Command(
            [script("lmlab-predict"), f"ckpt_path={ckpt}", "input=input.txt", "output=tags.jsonl"],
            cwd,
            "predict",
            registered,
        ),
    }
    for command in later.values():
        command.wait()
    commands.update(later)
    return {**found, "run_dir": run_dir, "report": report}


def ok(runs: dict[str, Any], name: str) -> Command:
    command = runs["commands"][name]
    assert command.returncode == 0, command.stderr[-3000:]
    assert "Traceback" not in command.stderr
    return command


def metrics_of(cwd: Path, task_name: str) -> dict[str, float]:
    (path,) = (cwd / "logs" / task_name / "runs").glob("*/metrics.json")
    return json.loads(path.read_text())["metrics"]


def test_plugin_declares_the_entry_point_the_test_writes() -> None:
    assert ENTRY_POINT in (PLUGINS / "pyproject.toml").read_text()


def test_train_learns_the_tags_and_writes_a_checkpoint(runs: dict[str, Any]) -> None:
    ok(runs, "train")
    ok(runs, "untrained")
    metrics = runs["report"]["metrics"]
    untrained = metrics_of(runs["cwd"], "untrained")["test/acc"]
    assert metrics["val/acc"] > 0.9 and metrics["test/acc"] > 0.9, metrics
    assert metrics["test/acc"] > untrained + 0.3, (metrics, untrained)
    best = Path(runs["report"]["best_checkpoint"])
    assert best.is_file() and best.parent == runs["run_dir"] / "checkpoints"
    assert (best.parent / "last.ckpt").is_file()
    saved = torch.load(best, weights_only=True)
    assert saved["lmlab"]["task"] == "lmlab_tagging.task.TaggingTask"
    assert saved["hyper_parameters"]["data_info"]["tags"] == sorted(LEXICON)
    assert saved["hyper_parameters"]["model"]["_target_"] == "lmlab_tagging.model.BiGRUTagger"


def test_eval_scores_the_checkpoint_when_the_plugin_is_registered(runs: dict[str, Any]) -> None:
    ok(runs, "train")
    ok(runs, "eval")
    scored, trained = metrics_of(runs["cwd"], "eval"), runs["report"]["metrics"]
    assert scored["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
    assert scored["test/loss"] == pytest.approx(trained["test/loss"], abs=1e-4)


def test_eval_refuses_the_checkpoint_when_the_plugin_is_only_importable(runs: dict[str, Any]) -> None:
    ok(runs, "train")
    refused = runs["commands"]["eval_unregistered"]
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "Refusing to load" in refused.stderr and "lmlab.plugins" in refused.stderr


def test_predict_tags_each_word(runs: dict[str, Any]) -> None:
    ok(runs, "train")
    ok(runs, "predict")
    records = [json.loads(line) for line in (runs["cwd"] / "tags.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 3]
    for record in records:
        assert record["tags"] == [TAG_OF[word] for word in record["tokens"]]


# -- where lmlab lists options, it lists those of the search path's folders ------------------------------
@pytest.fixture(scope="module")
def listings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``lmlab-train --help``, and a run of the plugin's task on lmlab's data, with the plugin's configs on the
    search path (side by side)."""
    tmp = tmp_path_factory.mktemp("extension_options")
    importable = plugin_env(tmp, entry_point=False)
    commands = {
        "help": Command([script("lmlab-train"), SEARCH_PATH, "--help"], tmp, "help", importable),
        "other_data": Command(
            [script("lmlab-train"), SEARCH_PATH, "task=tagging", "data=pydoc", *QUIET], tmp, "other_data", importable
        ),
    }
    for task in ("tagging", "lm"):  # shell completion of model= on a line that puts the plugin on the search path
        line = f"lmlab-train {SEARCH_PATH} task={task} model="
        commands[f"complete_{task}"] = Command(
            [script("lmlab-train"), "-sc", "query=bash"], tmp, f"complete_{task}", {**importable, "COMP_LINE": line}
        )
    for command in commands.values():
        command.wait()
    return {"commands": commands}


def _listing(text: str) -> dict[str, list[str]]:
    """``group: option, ...`` lines (of ``--help``, or :func:`user_options`) as each group's options."""
    return {group: options.split(", ") for group, _, options in (line.partition(": ") for line in text.splitlines())}


def test_help_lists_the_plugins_options(listings: dict[str, Any]) -> None:
    listing = _listing(ok(listings, "help").stdout.split("== Config ==")[0])
    for group, option in (("task", "tagging"), ("data", "tagging_files"), ("model", "bigru_tagger")):
        assert option in listing[group], (group, listing[group])
    assert {"lm", "pydoc", "gpt"} <= {*listing["task"], *listing["data"], *listing["model"]}  # lmlab's own stay
    assert "base/tagging" not in listing["data"]


def test_refusal_of_another_tasks_data_names_the_plugins_data(listings: dict[str, Any]) -> None:
    refused = listings["commands"]["other_data"]
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "data=pydoc is data for another task: task=tagging" in refused.stderr
    assert "Pick one of data=tagging_files." in refused.stderr


def test_completion_of_model_offers_the_plugin_tasks_models_to_it_alone(listings: dict[str, Any]) -> None:
    offered = {
        task: {word.removeprefix("model=") for word in ok(listings, f"complete_{task}").stdout.split()}
        for task in ("tagging", "lm")
    }
    assert offered["tagging"] == {"bigru_tagger"}, offered["tagging"]
    assert "bigru_tagger" not in offered["lm"] and {"gpt", "lstm"} <= offered["lm"], offered["lm"]


def test_options_of_a_folder_on_the_search_path_are_listed(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, a ``file://`` folder: its nested options are listed, its callback pieces are not, and its
    data option's base may be one of lmlab's."""
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)  # others read lmlab's alone
    conf = tmp_path / "conf"
    for folder in ("data", "experiment/mine", "callbacks"):
        (conf / folder).mkdir(parents=True)
    (conf / "data" / "my_text.yaml").write_text("defaults:\n  - base/lm\n  - _self_\n")
    (conf / "experiment" / "mine" / "small.yaml").write_text("# @package _global_\nseed: 1\n")
    (conf / "callbacks" / "my_callback.yaml").write_text("my_callback:\n  _target_: builtins.dict\n")
    make_cfg([f"hydra.searchpath=[file://{conf}]"])
    listing = _listing(user_options("train"))
    assert "my_text" in listing["data"] and "pydoc" in listing["data"]
    assert "mine/small" in listing["experiment"]
    assert "my_callback" not in listing["callbacks"]
    assert data_options()["my_text"] == data_options()["pydoc"] == "lmlab.data.lm.LMDataModule"
