"""Mistakes are reported before torch and Lightning load, once, and leave no run folder; names that do not exist
are answered with the ones meant; any ``lightning.Trainer`` argument is a ``trainer.*`` key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUIET, Command, script
from lmlab.config import signatures
from lmlab.config.values import describe_spec, spec_matches, type_spec

# one worker runs this module's tests, which share its trained fixtures
pytestmark = pytest.mark.xdist_group("startup_checks")

#: mistakes each command can only have been told about by its config
MISTAKES = {
    "value": (["lmlab-train", "optimizer.lr=abc"], "Invalid value optimizer.lr='abc': it must be a number"),
    "range": (["lmlab-train", "trainer.max_steps=0"], "Invalid value trainer.max_steps=0"),
    "key": (["lmlab-train", "+model.n_layr=2"], "for lmlab.models.GPT. Did you mean 'n_layer'?"),
    "data file": (
        ["lmlab-train", "data=text_files", "data.source.train_files=missing/*.txt"],
        "data.source.train_files: no file matches 'missing/*.txt'",
    ),
    "checkpoint": (["lmlab-eval", "ckpt_path=runs/last.ckpt"], "ckpt_path: no checkpoint at 'runs/last.ckpt'"),
    "required": (["lmlab-generate"], "ckpt_path is required"),
    "input file": (
        ["lmlab-predict", "ckpt_path=model.ckpt", "input=texts.txt"],
        "input: no file at 'texts.txt'",
    ),
}


def _run(args: list[str], cwd: Path, *python_options: str) -> subprocess.CompletedProcess[str]:
    """A console script as a user runs it (``python_options``: the interpreter's, such as ``-X importtime``)."""
    return subprocess.run(
        [sys.executable, *python_options, script(args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def recorded_signatures(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The signatures an earlier run read, as a user's first run leaves them: the default training config's
    targets, read where they are checked."""
    folder = tmp_path_factory.mktemp("first_run")
    first = _run(["lmlab-train", "optimizer.lr=abc"], folder)
    assert "error: Invalid value optimizer.lr='abc'" in first.stderr, first.stderr
    assert signatures.recorded("torch.optim.AdamW") is not None


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_mistake_is_reported_before_torch_loads_once_and_leaves_no_run_folder(
    mistake: str, recorded_signatures: None, tmp_path: Path
) -> None:
    args, message = MISTAKES[mistake]
    (tmp_path / "model.ckpt").write_bytes(b"")
    started = time.perf_counter()
    done = _run(args, tmp_path, "-X", "importtime")
    elapsed = time.perf_counter() - started

    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert message not in done.stdout, "the error is printed twice"
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert not {"torch", "lightning"} & imported, f"reported after importing torch or Lightning ({elapsed:.1f} s)"
    assert not (tmp_path / "logs").exists(), "the failed command left a run folder"


def test_a_run_that_fails_keeps_its_folder_only_if_training_started(tmp_path: Path) -> None:
    text = tmp_path / "one_line.txt"
    text.write_text("too short for a block\n")
    (tmp_path / "before").mkdir()
    (tmp_path / "during").mkdir()
    before = Command(  # the data is found only when read, after the heavy imports: before training
        [script("lmlab-train"), "data=text_files", f"data.source.train_files={text}"], tmp_path / "before", "before"
    )
    during = Command(  # a learning rate that makes the first step's loss infinite
        [
            script("lmlab-train"),
            *QUIET,
            "optimizer.lr=1e12",
            "optimizer.weight_decay=0",
            "task.module.finite_check_every_n_steps=1",
            "model.n_layer=1",
            "data.block_size=32",
        ],
        tmp_path / "during",
        "during",
    )
    for command in (before, during):
        command.wait()
        assert command.returncode == 1
        assert command.stderr.count("error: ") == 1 and "Traceback" not in command.stderr, command.stderr
    assert not list((tmp_path / "before").glob("logs/train/runs/*")), "a run that never trained left its folder"
    (folder,) = (tmp_path / "during").glob("logs/train/runs/*")
    record = json.loads((folder / "metrics.json").read_text())
    assert record["status"] == "failed" and "NaN or infinite" in record["error"]


SUGGESTIONS = {
    "experiment=shakespeare_char": "Did you mean experiment=lm/shakespeare_char?",
    "model=gtp": "Did you mean model=gpt?",
    "lr=1e-3": "Did you mean optimizer.lr=1e-3?",
    "model.n_layr=2": "Did you mean model.n_layer=2?",
}


def test_a_name_that_does_not_exist_is_answered_with_the_one_meant(tmp_path: Path) -> None:
    commands = {
        typed: Command([script("lmlab-train"), typed], tmp_path, f"s{i}") for i, typed in enumerate(SUGGESTIONS)
    }
    for typed, command in commands.items():
        command.wait()
        assert command.returncode == 1
        assert SUGGESTIONS[typed] in command.stderr, command.stderr
        assert "Traceback" not in command.stderr
    assert "lm/shakespeare_char_llama" in commands["experiment=shakespeare_char"].stderr, "the options are listed"


def test_every_trainer_argument_is_a_trainer_key(recorded_signatures: None, tmp_path: Path) -> None:
    shown = _run(
        ["lmlab-train", "trainer.max_time=00:00:05:00", "trainer.detect_anomaly=true", "--cfg", "job"], tmp_path
    )
    assert shown.returncode == 0, shown.stderr
    assert "max_time: 00:00:05:00" in shown.stdout and "detect_anomaly: true" in shown.stdout

    typo = _run(["lmlab-train", "trainer.max_tme=00:00:05:00"], tmp_path)
    assert typo.returncode == 1
    assert "Unknown config key 'trainer.max_tme' for lightning.pytorch.Trainer. Did you mean 'max_time'?" in typo.stderr


def test_type_specs_judge_config_values_as_the_annotations_do() -> None:
    from typing import Any, Literal

    from torch import Tensor

    assert type_spec(float | Tensor) == ("float", "Tensor")
    assert type_spec(int | None) == ("int", "null")
    assert type_spec(Literal["a", "b"] | None) == (("literal", "a", "b"), "null")
    assert type_spec(Any) is None and type_spec(list[int]) is None  # not judged from a config value
    assert spec_matches(3, ("float",)) and not spec_matches(True, ("float",)) and not spec_matches("x", ("float",))
    assert spec_matches("b", (("literal", "a", "b"),)) and not spec_matches("c", (("literal", "a", "b"),))
    assert describe_spec(("float", "Tensor")) == "a number or Tensor"
    assert describe_spec((("literal", "a", "b"), "null")) == "one of 'a', 'b' or null"


def test_a_recorded_signature_is_dropped_when_its_source_changes(tmp_path: Path, monkeypatch) -> None:
    module = tmp_path / "recorded_target.py"
    module.write_text("def build(size: int = 1) -> None:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LMLAB_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(signatures, "_read", {})
    monkeypatch.setattr(signatures, "_loaded", {})

    read = signatures.signature("recorded_target.build")
    signatures.save()
    assert signatures.recorded("recorded_target.build") == read
    assert read.types == {"size": ("int",)} and read.accepted == {"size"}

    module.write_text("def build(size: str = 'a') -> None:\n    pass\n")
    stat = module.stat()
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert signatures.recorded("recorded_target.build") is None
