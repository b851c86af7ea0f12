"""The contract between a task and its networks is a base class the start-up check verifies."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lmlab.config import config_dir, locate, task_models, validate_config
from lmlab.errors import ConfigError


@pytest.mark.parametrize("task", sorted(task_models()))
def test_every_model_a_task_lists_is_a_network_of_its_kind(task: str) -> None:
    task_cfg = OmegaConf.load(Path(config_dir()) / "task" / f"{task}.yaml")
    wanted = locate(locate(task_cfg.task.module._target_).network)
    for option in task_models()[task]:
        target = OmegaConf.load(Path(config_dir()) / "model" / f"{option}.yaml")._target_
        assert issubclass(locate(target), wanted), f"model={option} ({target}) is not a {wanted.__name__}"


@pytest.mark.parametrize(
    ("task", "target", "kind"),
    [
        ("lm", "lmlab.models.TextCNN", "LanguageModelNetwork"),
        ("classification", "lmlab.models.GPT", "ClassifierNetwork"),
        ("translation", "torch.nn.Identity", "Seq2SeqNetwork"),
    ],
)
def test_a_network_of_another_kind_is_refused_before_any_work(task: str, target: str, kind: str, make_cfg) -> None:
    cfg = make_cfg([f"task={task}", f"model._target_={target}"])
    with pytest.raises(ConfigError, match=rf"is not a {kind}, the kind of network task={task} trains") as info:
        validate_config(cfg)
    assert "|".join(cfg.task.models) in str(info.value)
