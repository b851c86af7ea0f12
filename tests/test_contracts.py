"""The contract between a task and its networks is a base class the start-up check verifies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lmlab.config.schema import accepted_keys, config_dir, group_targets, locate, task_models, validate_config
from lmlab.data.info import LMDataInfo
from lmlab.errors import ConfigError
from lmlab.models.base import LanguageModelNetwork
from lmlab.tasks.lm import LanguageModelingTask


@pytest.mark.parametrize("task", sorted(task_models()))
def test_every_model_a_task_lists_is_a_network_of_its_kind(task: str) -> None:
    task_cfg = OmegaConf.load(Path(config_dir()) / "task" / f"{task}.yaml")
    wanted = locate(locate(task_cfg.task.module._target_).network)
    for option in task_models()[task]:
        target = group_targets("model")[option]
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


@pytest.mark.parametrize("task", sorted(task_models()))
def test_every_network_input_of_a_task_is_a_field_of_its_datas_info_and_every_model_takes_the_required_ones(
    task: str,
) -> None:
    task_cls = locate(OmegaConf.load(Path(config_dir()) / "task" / f"{task}.yaml").task.module._target_)
    info_type = locate(task_cls.data_module).info_type
    info_type.check_inputs(task_cls.network_inputs, task_cls.__name__)
    required = locate(task_cls.network).required_inputs
    assert set(required) <= set(task_cls.network_inputs), "the task hands every network what it requires"
    for option in task_models()[task]:
        accepted = accepted_keys(locate(group_targets("model")[option]))
        assert accepted is None or set(required) <= accepted, f"model={option} takes {required}"


class UnnamedVocabulary(LanguageModelNetwork):
    """A language model whose constructor misnames the vocabulary size (it would silently get nothing)."""

    def __init__(self, vocab: int = 10) -> None:
        super().__init__()
        self.head = torch.nn.Embedding(vocab, vocab)

    def forward(self, idx, state=None, return_state=False):
        return self.head(idx), None


def test_a_network_that_does_not_take_what_its_kind_is_built_from_is_refused_by_name(make_cfg) -> None:
    cfg = make_cfg([f"model._target_={__name__}.UnnamedVocabulary"])
    with pytest.raises(ConfigError, match=r"UnnamedVocabulary's constructor takes no vocab_size.*task=lm"):
        validate_config(cfg)


def test_a_task_whose_network_inputs_are_not_in_its_datas_info_fails_naming_the_fields() -> None:
    class Misnamed(LanguageModelingTask):
        network_inputs = ("vocab_size", "context_size")

    info = LMDataInfo(vocab_size=5, block_size=4)
    with pytest.raises(
        ConfigError, match=r"Misnamed.network_inputs names context_size.*vocab_size, block_size, pad_id"
    ):
        Misnamed(model={"_target_": "lmlab.models.GPT"}, data_info=info.as_dict())
    assert LMDataInfo.from_dict({**info.as_dict(), "dropped_in_a_later_version": 1}) == info
    assert dict(info) == info.as_dict() and info["block_size"] == info.block_size == 4
