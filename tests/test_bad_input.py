"""Bad input gets one clear message that names the key and what is allowed, before any data is read:
values out of their declared range or of the wrong type, keys that do not exist (with the closest one that
does), values left missing, devices this machine lacks, and folders that cannot be written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

from conftest import Command, script
from lmlab.cli import explain
from lmlab.errors import ConfigError
from lmlab.evaluate import evaluate
from lmlab.generate import generate_samples
from lmlab.predict import predict
from lmlab.train import train
from lmlab.translate import translate

# (overrides, the key the message must name, what it must say is allowed)
TRAIN_VALUES = [
    (["optimizer.lr=abc"], "optimizer.lr", "a number"),
    (["optimizer.lr=-1"], "optimizer.lr", "> 0"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay", ">= 0"),
    (["data.num_workers=-1"], "data.num_workers", ">= 0"),
    (["data.batch_size=0"], "data.batch_size", ">= 1"),
    (["data.eval_batch_size=0"], "data.eval_batch_size", ">= 1"),
    (["data.block_size=0"], "data.block_size", ">= 1"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval", "> 0"),
    (["trainer.max_steps=0"], "trainer.max_steps", ">= 1 (or -1)"),
    (["trainer.max_steps=1.5"], "trainer.max_steps", "an integer"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches", ">= 1"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val", ">= 0"),
    (["trainer.limit_val_batches=-1"], "trainer.limit_val_batches", ">= 0"),
    (["trainer.precision=bf17"], "trainer.precision", "'bf16-mixed'"),
    (["tokenizer=bpe", "tokenizer.vocab_size=0"], "tokenizer.vocab_size", ">= 258"),
    (["tokenizer=word", "tokenizer.vocab_size=2"], "tokenizer.vocab_size", ">= 4"),
    (["model.n_layer=0"], "model.n_layer", ">= 1"),
    (["model.n_head=-2"], "model.n_head", ">= 1"),
    (["model.dropout=1.5"], "model.dropout", "< 1"),
    (["model.bias=maybe"], "model.bias", "true or false"),
    (["model.norm=batchnorm"], "model.norm", "'layernorm', 'rmsnorm'"),
    (["model.mlp=relu"], "model.mlp", "'gelu', 'swiglu'"),
    (["model.position=alibi"], "model.position", "'learned', 'sinusoidal', 'rope'"),
    (["model.n_kv_head=0"], "model.n_kv_head", ">= 1"),
    (["task=classification", "model=transformer_encoder", "model.positions=alibi"], "model.positions", "'rope'"),
    (["scheduler.warmup_steps=-5"], "scheduler.warmup_steps", ">= 0"),
    (["scheduler.min_lr_ratio=2"], "scheduler.min_lr_ratio", "<= 1"),
    (["scheduler.decay=exponential"], "scheduler.decay", "'cosine', 'linear', 'inverse_sqrt', 'constant'"),
    (["callbacks.periodic_checkpoint.every_minutes=0"], "callbacks.periodic_checkpoint.every_minutes", "> 0"),
    (["callbacks.early_stopping.patience=-1"], "callbacks.early_stopping.patience", ">= 0"),
    (
        ["data=text_files", "data.source.train_files=x.txt", "data.source.val_fraction=1.2"],
        "data.source.val_fraction",
        "< 1",
    ),
    (["task=classification", "task.module.label_smoothing=1"], "task.module.label_smoothing", "< 1"),
]


@pytest.mark.parametrize(("overrides", "key", "allowed"), TRAIN_VALUES, ids=[" ".join(o) for o, _, _ in TRAIN_VALUES])
def test_bad_training_value_fails_before_any_data_is_read(
    overrides: list[str], key: str, allowed: str, make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as err:
        train(make_cfg(overrides))
    message = str(err.value)
    assert f"{key}=" in message and allowed in message, message
    assert "\n" not in message
    assert not (tmp_path / ".cache").exists(), "data was read before the value was checked"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("override", ["trainer.accelerator=gpu", "trainer=gpu"])
def test_gpu_on_a_machine_without_one(override: str, make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu, but torch finds no CUDA GPU.*trainer=cpu"):
        train(make_cfg([override]))
    assert not (tmp_path / ".cache").exists()


ENTRY_VALUES = [
    ("generate", ["num_samples=0"], "num_samples", ">= 1"),
    ("generate", ["temperature=-1"], "temperature", ">= 0"),
    ("generate", ["max_new_tokens=0"], "max_new_tokens", ">= 1"),
    ("generate", ["top_k=-3"], "top_k", ">= 0"),
    ("generate", ["top_p=0"], "top_p", "> 0"),
    ("generate", ["top_p=1.5"], "top_p", "<= 1"),
    ("predict", ["batch_size=0"], "batch_size", ">= 1"),
    ("translate", ["beam_size=0"], "beam_size", ">= 1"),
    ("translate", ["max_length_ratio=0"], "max_length_ratio", "> 0"),
]
RUN = {"generate": generate_samples, "predict": predict, "translate": translate, "eval": evaluate}


@pytest.mark.parametrize(
    ("entry", "overrides", "key", "allowed"), ENTRY_VALUES, ids=[f"{e} {' '.join(o)}" for e, o, _, _ in ENTRY_VALUES]
)
def test_bad_inference_value_is_named_before_the_checkpoint_is_read(
    entry: str, overrides: list[str], key: str, allowed: str, make_cfg
) -> None:
    with pytest.raises(ConfigError) as err:
        RUN[entry](make_cfg(["ckpt_path=/no/such.ckpt", *overrides], config_name=entry))
    assert f"{key}=" in str(err.value) and allowed in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_inference_device_this_machine_lacks(make_cfg) -> None:
    with pytest.raises(ConfigError, match="device=cuda.*device=cpu"):
        generate_samples(make_cfg(["ckpt_path=/no/such.ckpt", "device=cuda"], config_name="generate"))


@pytest.mark.parametrize("entry", sorted(RUN))
def test_missing_ckpt_path_names_the_key(entry: str, make_cfg) -> None:
    with pytest.raises(ConfigError, match=r"^ckpt_path is required: add ckpt_path=<value>"):
        RUN[entry](make_cfg([], config_name=entry))


def test_missing_data_file_setting_names_the_key(make_cfg) -> None:
    with pytest.raises(ConfigError, match=r"^data.source.train_files is required"):
        train(make_cfg(["data=text_files"]))


@pytest.mark.parametrize(
    ("override", "closest"),
    [
        ("model.n_layr=4", "model.n_layer=4"),
        ("trainer.max_step=10", "trainer.max_steps=10"),
        ("optimizer.lrr=0.1", "optimizer.lr=0.1"),
        ("seeed=3", "seed=3"),
    ],
)
def test_unknown_key_names_the_closest_valid_key(override: str, closest: str, make_cfg) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg([override])
    message = explain(err.value)
    key = override.split("=")[0]
    assert message is not None and message.startswith(f"{key} is not a key of")
    assert f"Did you mean {closest}?" in message
    assert message.index("Did you mean") < message.index("+"), "the fix comes first, adding a key last"


# -- as typed in a shell: one line on stderr, status 1, no traceback ------------------------------------------
@pytest.mark.slow
def test_console_errors_are_one_line(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    not_ckpt = tmp_path / "notes.ckpt"
    not_ckpt.write_text("just some notes\n")
    commands = {
        "eval_no_ckpt": ([script("lmlab-eval")], "ckpt_path is required"),
        "generate_no_ckpt": ([script("lmlab-generate")], "ckpt_path is required"),
        "typo": ([script("lmlab-train"), "model.n_layr=4"], "Did you mean model.n_layer=4?"),
        "trainer_typo": (
            [script("lmlab-train"), "trainer.max_step=10"],
            "for lightning.pytorch.Trainer. Did you mean 'max_steps'?",
        ),
        "lr": ([script("lmlab-train"), "optimizer.lr=abc"], "optimizer.lr='abc'"),
        "samples": ([script("lmlab-generate"), "ckpt_path=x.ckpt", "num_samples=0"], "num_samples=0"),
        "truncated": ([script("lmlab-eval"), f"ckpt_path={truncated}"], "is not a readable checkpoint"),
        "not_ckpt": ([script("lmlab-eval"), f"ckpt_path={not_ckpt}"], "is not a readable checkpoint"),
        "option": ([script("lmlab-train"), "model=gtp"], "Available options: "),
        "unquoted": ([script("lmlab-generate"), "ckpt_path=x.ckpt", "prompt=\u2603"], "prompt='\u2603'"),
    }
    started = {name: (Command(args, tmp_path, name), expected) for name, (args, expected) in commands.items()}
    for name, (command, expected) in started.items():
        command.wait()
        errors = [line for line in command.stderr.splitlines() if line.startswith("error:")]
        assert command.returncode == 1, (name, command.stderr[-2000:])
        assert len(errors) == 1 and expected in errors[0], (name, command.stderr[-2000:])
        assert "Traceback" not in command.stderr + command.stdout, (name, command.stderr[-2000:])
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").glob("**/metrics.json"))


def test_console_run_folder_that_cannot_be_written(tmp_path: Path) -> None:
    # sysfs refuses new folders even to root, which a read-only mode bit would not
    root = Path("/sys/lmlab-cannot-write-here")
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs here to stand in for a read-only folder")
    command = Command(
        [script("lmlab-train"), "trainer.max_steps=2"], tmp_path, "ro", env={"LMLAB_ROOT": str(root)}
    ).wait()
    errors = [line for line in command.stderr.splitlines() if line.startswith("error:")]
    assert command.returncode == 1 and len(errors) == 1, command.stderr[-2000:]
    assert str(root) in errors[0] and "LMLAB_ROOT" in errors[0]
    assert "Traceback" not in command.stderr
