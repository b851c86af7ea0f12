"""lmlab-generate samples from a language model's checkpoint without importing Lightning, torchmetrics or
transformers (seconds of start-up), and gives exactly what the task's own ``generate_text`` gives."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

from conftest import FAST, Command, compose_cfg, script
from lmlab import registry
from lmlab.config.signatures import accepted_keys, locate
from lmlab.errors import CheckpointMismatchError, ConfigError
from lmlab.generate import generate_samples
from lmlab.inference import language_model
from lmlab.inference.language_model import LanguageModel
from lmlab.run.checkpoint import load_language_model, load_task
from lmlab.tasks.lm import LanguageModelingTask
from lmlab.tokenizers import Tokenizer, tokenizer_from_state, train_bpe, train_word
from lmlab.train import build_task, train

# one worker runs this module's tests, which share its trained fixtures
pytestmark = pytest.mark.xdist_group("generate_fast")

TEXT = "the city of the river is old . the city of the hills is new .\n" * 20
#: packages the console script must not import for a checkpoint of one of lmlab's own language models
HEAVY = ("lightning", "lightning_fabric", "pytorch_lightning", "torchmetrics", "transformers")
#: how ``PYTHONVERBOSE=1`` reports each module loaded, however it is imported (``-X importtime`` leaves out
#: modules loaded through ``importlib.import_module``, as the registry and the console scripts load lmlab's)
IMPORTED = re.compile(r"^import '([^']+)' # ")


def _tokenizer(kind: str) -> Tokenizer:
    if kind == "char":
        return tokenizer_from_state({"kind": "char", "chars": sorted(set(TEXT)), "unk": True})
    if kind == "word":
        return train_word([TEXT])
    return train_bpe([TEXT], vocab_size=300, min_frequency=1)


def _checkpoint(root: Path, tokenizer: Tokenizer, *overrides: str, task: str = "lm") -> Path:
    """A checkpoint of a freshly built (untrained) task, holding what Lightning's checkpoint holds for loading."""
    cfg = compose_cfg(root, [f"task={task}", *overrides])
    info: dict[str, Any] = {
        "vocab_size": tokenizer.vocab_size,
        "pad_id": tokenizer.pad_id,
        "block_size": 16,
        "chars_per_token": {},
        "num_classes": 3,
        "labels": ["a", "b", "c"],
        "max_length": 16,
    }
    built = build_task(cfg, type("Data", (), {"tokenizer": tokenizer, "data_info": info})())
    checkpoint = {"state_dict": built.state_dict(), "hyper_parameters": dict(built.hparams)}
    built.on_save_checkpoint(checkpoint)
    path = root / "built.ckpt"
    torch.save(checkpoint, path)
    return path


def _generate_cfg(root: Path, ckpt: Path, *overrides: str) -> DictConfig:
    return compose_cfg(root, [f"ckpt_path={ckpt}", *overrides], config_name="generate")


def _task_samples(task: LanguageModelingTask, cfg: DictConfig) -> list[str]:
    """What the Lightning task samples with ``cfg``'s options."""
    return task.generate_text(
        cfg.prompt,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k or None,
        top_p=cfg.top_p,
        seed=cfg.seed,
        num_samples=cfg.num_samples,
        stop_at_eos=cfg.stop_at_eos,
    )


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny character-level GPT trained for a few steps: a checkpoint as Lightning writes it."""
    root = tmp_path_factory.mktemp("fast_generate")
    text = root / "text.txt"
    text.write_text(TEXT * 10, encoding="utf-8")
    overrides = [*(f"++{o}" for o in FAST), "data=text_files", f"data.source.train_files={text}"]
    train(compose_cfg(root, [*overrides, "trainer.max_steps=4", "test=false"]))
    return root / "run" / "checkpoints" / "last.ckpt"


def test_console_script_imports_no_lightning_and_prints_the_tasks_samples(trained_ckpt: Path, tmp_path: Path) -> None:
    options = ["prompt='the city'", "max_new_tokens=20", "seed=0", "num_samples=2", "temperature=0.9", "top_k=20"]
    command = [script("lmlab-generate"), f"ckpt_path={trained_ckpt}", *options]
    done = Command(command, tmp_path, "generate", env={"PYTHONVERBOSE": "1"}).wait()
    assert done.returncode == 0, done.stderr[-3000:]
    imported = {m.group(1) for line in done.stderr.splitlines() if (m := IMPORTED.match(line))}
    assert {"torch", "lmlab.generate", "lmlab.models.gpt"} <= imported, "no import messages on stderr"
    heavy = sorted(name for name in imported if name.split(".")[0] in HEAVY)
    assert not heavy, heavy
    samples = _task_samples(load_task(trained_ckpt)[0], _generate_cfg(tmp_path, trained_ckpt, *options))
    expected = "".join(f"----- sample {i + 1}\nthe city{text}\n" for i, text in enumerate(samples))
    assert done.stdout == expected


OPTIONS = [
    ("prompt='the city of'", "seed=0"),
    ("prompt='the city of'", "seed=3", "num_samples=3", "temperature=1.0", "top_k=0", "top_p=0.9"),
    ("prompt='the'", "temperature=0"),
    ("seed=1", "stop_at_eos=true", "max_new_tokens=40"),  # the empty prompt starts at end-of-text or a newline
]


@pytest.mark.parametrize("tokenizer", ["char", "word", "bpe"])
@pytest.mark.parametrize("model", ["gpt", "lstm", "gru", "rnn"])
def test_samples_equal_the_tasks(model: str, tokenizer: str, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, _tokenizer(tokenizer), f"model={model}", "model.n_layer=1")
    task, _ = load_task(ckpt)
    for options in OPTIONS:
        cfg = _generate_cfg(tmp_path, ckpt, "max_new_tokens=12", *options)
        samples = generate_samples(cfg)
        assert samples == _task_samples(task, cfg), options
        if tokenizer == "word" and cfg.prompt:  # the word after the prompt's last one, or a new line
            assert all(text.startswith((" ", "\n")) for text in samples), samples


def test_compiled_task_checkpoint_loads_the_same_weights(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, _tokenizer("char"), "model.n_layer=1", "compile=true")
    assert any(key.startswith("_forward._orig_mod.") for key in torch.load(ckpt, weights_only=True)["state_dict"])
    model, _ = load_language_model(ckpt)
    task, _ = load_task(ckpt)
    assert isinstance(model, LanguageModel)
    assert model.net.state_dict().keys() == task.net.state_dict().keys()
    assert all(torch.equal(v, task.net.state_dict()[k]) for k, v in model.net.state_dict().items())
    cfg = _generate_cfg(tmp_path, ckpt, "prompt=the", "seed=0", "max_new_tokens=10")
    assert generate_samples(cfg) == _task_samples(task, cfg)


def test_a_classifier_checkpoint_is_the_one_line_config_error(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, _tokenizer("word"), "model=bag_of_ngrams", task="classification")
    with pytest.raises(ConfigError, match="is not a language model checkpoint; lmlab-generate needs one") as err:
        generate_samples(_generate_cfg(tmp_path, ckpt))
    assert "\n" not in str(err.value)


def _broken(path: Path, change: str) -> Path:
    ckpt = torch.load(path, weights_only=True)
    if change == "extra_hyperparameter":
        ckpt["hyper_parameters"]["dropout_everywhere"] = 0.5
    elif change == "no_weights":
        del ckpt["state_dict"]
    elif change == "missing_weight":
        ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.endswith("ln_f.weight")}
    else:
        ckpt["state_dict"]["net.not_a_parameter"] = torch.zeros(1)
    broken = path.with_name(f"{change}.ckpt")
    torch.save(ckpt, broken)
    return broken


@pytest.mark.parametrize("change", ["extra_hyperparameter", "no_weights", "missing_weight", "unexpected_weight"])
def test_a_checkpoint_that_does_not_fit_is_the_tasks_error(change: str, tmp_path: Path) -> None:
    path = _broken(_checkpoint(tmp_path, _tokenizer("char"), "model.n_layer=1"), change)
    with pytest.raises(CheckpointMismatchError) as fast:
        load_language_model(path)
    with pytest.raises(CheckpointMismatchError) as task:
        load_task(path)
    if change in {"extra_hyperparameter", "no_weights"}:
        assert str(fast.value) == str(task.value)
    else:  # the same error; torch names the module whose state_dict it loads
        for message in (str(fast.value), str(task.value)):
            assert "cannot be rebuilt as a LanguageModelingTask (RuntimeError: Error(s) in loading" in message
            assert ("ln_f.weight" if change == "missing_weight" else "net.not_a_parameter") in message


def test_what_loading_knows_without_importing_the_task_is_the_tasks() -> None:
    named = [(language_model.TASK, "task"), *((module, "data") for module in language_model.DATA_MODULES)]
    for target, kind in named:
        assert any(locate(target) is known for known in registry.registered(kind)), target
        assert registry.is_allowed(target, kind) and not registry.is_allowed(target, "network"), target
        assert kind != "data" or issubclass(locate(target), locate(language_model.DATA_MODULE)), target
    assert locate(language_model.TASK) is LanguageModelingTask
    assert LanguageModelingTask.network_inputs == language_model.NETWORK_INPUTS
    assert LanguageModelingTask.data_module == language_model.DATA_MODULE
    assert accepted_keys(LanguageModelingTask) == language_model.TASK_KEYWORDS
