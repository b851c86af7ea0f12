"""A checkpoint written before lmlab moved a target keeps loading: :data:`lmlab.registry.RENAMED` maps the old
dotted paths its configs name to where the targets are now. A run fine-tuned from a checkpoint
(``model=from_checkpoint tokenizer=from_checkpoint``) named ``lmlab.models.CheckpointLM`` and
``lmlab.checkpoint.checkpoint_tokenizer``, both built when the checkpoint loads. A config of a user's own that
names an old path is refused with the path to write instead."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from conftest import tiny_lm_checkpoint
from lmlab import registry
from lmlab.config.schema import check_targets
from lmlab.config.signatures import locate
from lmlab.errors import ConfigError
from lmlab.inference.language_model import LanguageModel
from lmlab.run.checkpoint import load_language_model, read_checkpoint
from lmlab.run.from_checkpoint import CheckpointLM
from lmlab.run.runtime import instantiate
from lmlab.tasks.lm import LanguageModelingTask


def _find(path: str) -> Any:
    """The module or object at a dotted path (an ``ImportError`` when there is none)."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError:
        return locate(path)


@pytest.mark.parametrize(("old", "new"), sorted(registry.RENAMED.items()))
def test_each_renamed_target_is_gone_from_its_old_path_and_found_at_its_new_one(old: str, new: str) -> None:
    with pytest.raises(ImportError):
        _find(old)
    assert _find(new) is not None
    assert registry.current(old) == new


def test_a_target_is_renamed_by_its_longest_entry_and_others_stay() -> None:
    assert registry.current("lmlab.callbacks.InterruptCheckpoint") == "lmlab.training.callbacks.InterruptCheckpoint"
    assert registry.current("lmlab.models.from_checkpoint.set_dropout") == "lmlab.run.from_checkpoint.set_dropout"
    assert registry.current("lmlab.callbacks_extra.X") == "lmlab.callbacks_extra.X", "a module only at a dot"
    assert registry.current("lmlab.models.GPT") == "lmlab.models.GPT"
    assert registry.current("lmlab.training.callbacks.ModelCheckpoint") == "lmlab.training.callbacks.ModelCheckpoint"


def test_a_config_naming_a_moved_target_says_where_it_is_now() -> None:
    cfg = OmegaConf.create({"callbacks": {"interrupt": {"_target_": "lmlab.callbacks.InterruptCheckpoint"}}})
    with pytest.raises(ConfigError, match="It has moved: write 'lmlab.training.callbacks.InterruptCheckpoint'"):
        check_targets(cfg)


def _fine_tuned_before_the_move(folder: Path) -> Path:
    """A checkpoint of a run fine-tuned from :func:`tiny_lm_checkpoint` as lmlab wrote it before the move."""
    base = tiny_lm_checkpoint()
    start = read_checkpoint(base)
    model = {"_target_": "lmlab.run.from_checkpoint.CheckpointLM", "ckpt_path": str(base), "dropout": None}
    tokenizer = {"_target_": "lmlab.checkpoint.checkpoint_tokenizer", "ckpt_path": str(base)}
    run_config = {
        "model": {**model, "_target_": "lmlab.models.CheckpointLM"},
        "tokenizer": tokenizer,
        "callbacks": {"interrupt_checkpoint": {"_target_": "lmlab.callbacks.InterruptCheckpoint"}},
        "scheduler": {"_target_": "lmlab.schedulers.warmup_decay", "_partial_": True, "warmup_steps": 10},
        "trainer": {"plugins": [{"_target_": "lmlab.checkpoint_io.AtomicCheckpointIO"}]},
    }
    task = LanguageModelingTask(
        model=model,
        data_info=start["hyper_parameters"]["data_info"],
        tokenizer_state=start["lmlab"]["tokenizer"],
        run_config=run_config,
    )
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    checkpoint["hyper_parameters"]["model"]["_target_"] = "lmlab.models.CheckpointLM"
    torch.save(checkpoint, folder / "fine_tuned.ckpt")
    return folder / "fine_tuned.ckpt"


def test_a_checkpoint_naming_the_old_targets_loads_and_builds_them(tmp_path: Path) -> None:
    path = _fine_tuned_before_the_move(tmp_path)
    assert torch.load(path, weights_only=True)["hyper_parameters"]["model"]["_target_"] == "lmlab.models.CheckpointLM"
    ckpt = read_checkpoint(path)
    config = ckpt["lmlab"]["config"]
    assert ckpt["hyper_parameters"]["model"]["_target_"] == config["model"]["_target_"]
    assert config["model"]["_target_"] == "lmlab.run.from_checkpoint.CheckpointLM"
    assert config["tokenizer"]["_target_"] == "lmlab.run.from_checkpoint.checkpoint_tokenizer"
    assert config["callbacks"]["interrupt_checkpoint"]["_target_"] == "lmlab.training.callbacks.InterruptCheckpoint"
    assert config["scheduler"] == {
        "_target_": "lmlab.training.schedulers.warmup_decay",
        "_partial_": True,
        "warmup_steps": 10,
    }
    assert config["trainer"]["plugins"] == [{"_target_": "lmlab.run.checkpoint_io.AtomicCheckpointIO"}]

    model, _ = load_language_model(path)
    assert isinstance(model, LanguageModel) and isinstance(model.net, CheckpointLM)
    base, _ = load_language_model(tiny_lm_checkpoint())
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model.net(ids)[0], base.net(ids)[0]), "the network is the fine-tuned one, weights and all"
    tokenizer = instantiate(config["tokenizer"])
    assert tokenizer.fingerprint() == base.tokenizer.fingerprint()
