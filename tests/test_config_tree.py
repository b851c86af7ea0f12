"""The shape of the config tree: each data option builds on the base of its task (``conf/data/base``) and holds
only its own settings; the bases are no options a user picks (``--help``, shell completion); the search presets
take their metric and direction from the task.

Options are read from ``conf/``, so a new data option or preset is covered without editing this module.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from conftest import compose_cfg, script
from lmlab.config.schema import BASE_FOLDER, config_dir, data_options, is_base, locate, user_options
from test_config import group_options

CONF = Path(config_dir())
DATA = group_options("data")
BASES = sorted(p.relative_to(CONF / "data").with_suffix("").as_posix() for p in (CONF / "data" / "base").glob("*.yaml"))
#: the task each data module serves
TASK_OF = {
    "lmlab.data.lm.LMDataModule": "lm",
    "lmlab.data.instructions.InstructionDataModule": "lm",
    "lmlab.data.classification.ClassificationDataModule": "classification",
    "lmlab.data.translation.TranslationDataModule": "translation",
}
#: the base every data option of a data module builds on first: its task's, unless the module has its own
BASE_OF = {"lmlab.data.instructions.InstructionDataModule": "base/instructions"}
#: the keys a user must give (``???``): the local files of the options that read local files, the data set
#: of the option that reads any hub data set
MANDATORY = {
    "text_files": {"data.source.train_files"},
    "hub_text": {"data.source.path"},
    "instructions": {"data.source.train_files"},
    "labeled_files": {"data.source.train_files"},
    "translation_files": {"data.source.train_files"},
    "aligned_text": {"data.source.train.src", "data.source.train.tgt"},
}
#: an option's own settings, in YAML lines that are neither comments nor blank (its defaults list included)
MAX_OWN_LINES = 20


@pytest.fixture
def cfg_of(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    def compose(*overrides: str) -> DictConfig:
        return compose_cfg(tmp_path, overrides)

    yield compose
    GlobalHydra.instance().clear()


def _defaults(option: str) -> list[str]:
    """The entries of a data option's defaults list, ``_self_`` left out."""
    entries = OmegaConf.load(CONF / "data" / f"{option}.yaml").get("defaults", [])
    return [str(entry) for entry in entries if entry != "_self_"]


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def _raw(path: Path) -> dict[str, Any]:
    """A YAML file as written (interpolations unresolved), without its defaults list."""
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert isinstance(node, dict)
    node.pop("defaults", None)
    return node


# -- every data option builds on the base of its task ---------------------------------------------------
def test_the_tree_has_data_options_and_bases() -> None:
    assert {"pydoc", "imdb", "multi30k"} <= set(DATA)
    assert {"base/lm", "base/classification", "base/translation"} <= set(BASES)
    assert not set(BASES) & set(DATA)


@pytest.mark.parametrize("option", DATA)
def test_data_option_composes_to_the_data_module_of_its_task(option: str, cfg_of) -> None:
    target = data_options()[option]
    task = TASK_OF[target]
    cfg = cfg_of(f"task={task}", f"data={option}")
    assert cfg.data._target_ == target
    assert cfg.data.source._target_ and locate(cfg.data.source._target_)
    # nothing left to the user but the documented local files
    assert set(OmegaConf.missing_keys(cfg)) == MANDATORY.get(option, set())
    # the data settings resolve (the missing files stay missing)
    OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=False)


@pytest.mark.parametrize("option", DATA)
def test_data_option_inherits_from_its_task_base_not_from_another_data_set(option: str) -> None:
    defaults = _defaults(option)
    target = data_options()[option]
    base = BASE_OF.get(target, f"base/{TASK_OF[target]}")
    assert defaults and defaults[0] == base, f"data={option} must build on {base} first"
    assert all(is_base(entry) for entry in defaults), f"data={option} inherits from another data option"
    assert all(entry in BASES for entry in defaults)


@pytest.mark.parametrize("option", DATA)
def test_data_option_holds_only_its_own_settings(option: str) -> None:
    path = CONF / "data" / f"{option}.yaml"
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) <= MAX_OWN_LINES, f"data={option}: {len(lines)} lines; shared settings belong in a base"
    inherited: dict[str, Any] = {}
    for base in _defaults(option):
        inherited.update(_leaves(_raw(CONF / "data" / f"{base}.yaml")))
    restated = [key for key, value in _leaves(_raw(path)) if key in inherited and inherited[key] == value]
    assert not restated, f"data={option} restates what its bases set: {restated}"


@pytest.mark.parametrize("base", BASES)
def test_base_is_used_and_lands_in_the_data_package(base: str, cfg_of) -> None:
    users = [option for option in DATA if base in _defaults(option)]
    assert users, f"{base} is used by no data option"
    cfg = cfg_of(f"task={TASK_OF[data_options()[users[0]]]}", f"data={users[0]}")
    assert BASE_FOLDER not in cfg.data, "a base nested under data.base: it needs its '# @package data' header"
    absent = object()
    for key, _ in _leaves(_raw(CONF / "data" / f"{base}.yaml")):
        assert OmegaConf.select(cfg.data, key, default=absent) is not absent, f"{base}: data.{key} did not arrive"


def test_translation_columns_named_after_the_languages_live_in_one_place() -> None:
    mapping = {"src": "${data.source_lang}", "tgt": "${data.target_lang}"}
    holders = [
        name
        for name in (*DATA, *BASES)
        if _raw(CONF / "data" / f"{name}.yaml").get("source", {}).get("columns") == mapping
    ]
    assert holders == ["base/translation_table"]


# -- the bases are no options a user picks ---------------------------------------------------------------
def test_help_lists_no_base() -> None:
    listing = dict(line.split(": ", 1) for line in user_options("train").splitlines())
    assert listing["data"].split(", ") == DATA
    assert not any(_names_a_base(option) for options in listing.values() for option in options.split(", "))


def _names_a_base(word: str) -> bool:
    """``base/lm``, ``data=base/lm``, ``data/base=``, ``data/base=lm``."""
    return is_base(word.split("=")[-1]) or BASE_FOLDER in word.split("=")[0].split("/")[1:]


def _complete(line: str, cwd: Path) -> list[str]:
    done = subprocess.run(
        [script("lmlab-train"), "-sc", "query=bash"],
        cwd=cwd,
        env={**os.environ, "COMP_LINE": line},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.parametrize("line", ["lmlab-train data=", "lmlab-train data", "lmlab-train data/", "lmlab-train "])
def test_completion_offers_no_base(line: str, tmp_path: Path) -> None:
    offered = _complete(line, tmp_path)
    assert not any(_names_a_base(word) for word in offered), offered
    if line.endswith("data="):
        assert sorted(word.removeprefix("data=") for word in offered) == DATA
    if line.endswith((" ", "data")):
        assert "data=" in offered  # a group to pick an option of, not a folder of subgroups


# -- the search presets follow the task ------------------------------------------------------------------
SEARCHES = group_options("hparams_search")


def _full(root: Path, *overrides: str) -> DictConfig:
    """The composed config with its ``hydra`` node (compose_cfg drops it)."""
    from hydra import compose, initialize_config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={root}", *overrides], return_hydra_config=True)


@pytest.mark.parametrize("preset", SEARCHES)
def test_search_preset_does_not_restate_the_task_metric(preset: str) -> None:
    node = _raw(CONF / "hparams_search" / f"{preset}.yaml")
    assert "optimized_metric" not in node, "optimized_metric is ${task.monitor} (conf/train.yaml)"
    direction = node.get("hydra", {}).get("sweeper", {}).get("direction")
    assert direction is None or "${task.mode}" in str(direction)


@pytest.mark.parametrize("preset", SEARCHES)
@pytest.mark.parametrize("task", group_options("task"))
def test_search_direction_and_metric_follow_the_task(preset: str, task: str, tmp_path: Path) -> None:
    full = _full(tmp_path, f"task={task}", f"hparams_search={preset}")
    assert full.optimized_metric == full.task.monitor
    assert full.hydra.sweeper.direction == {"max": "maximize", "min": "minimize"}[full.task.mode]
    # a monitor of the other mode turns the search around
    other = {"max": "min", "min": "max"}[full.task.mode]
    turned = _full(tmp_path, f"task={task}", f"hparams_search={preset}", f"task.mode={other}", "task.monitor=val/loss")
    assert turned.optimized_metric == "val/loss"
    assert turned.hydra.sweeper.direction == f"{other}imize"
