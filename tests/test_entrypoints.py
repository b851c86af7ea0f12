"""The entry points end to end: train a tiny model, then evaluate, sample and resume from its checkpoint,
in-process and through the console scripts as a user types them; and the errors a user meets on the way."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from conftest import FAST, Command, script
from lmlab.config.schema import config_dir
from lmlab.data.tables import AlignedTextFiles, HubTable
from lmlab.data.text_sources import HubText, PydocTopics
from lmlab.errors import CheckpointMismatchError, ConfigError, DataError, NonFiniteLossError, TokenizerError
from lmlab.evaluate import evaluate
from lmlab.generate import generate_samples
from lmlab.run.checkpoint import load_task
from lmlab.tasks.lm import LanguageModelingTask
from lmlab.tokenizers import tokenizer_from_state
from lmlab.train import resolve_ckpt_path, train

# one worker runs this module's tests, which share its trained fixtures
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("entrypoints")]

CONF = Path(config_dir())
FAST_OVERRIDES = [f"++{o}" for o in FAST]


def _learnable_text(path: Path) -> Path:
    """The ``learnable_text`` fixture's text, for module-scoped fixtures."""
    lines = [f"the {a} cat sat on the {b} mat." for a in ("red", "big", "old") for b in ("blue", "flat")]
    path.write_text("\n".join(lines * 120) + "\n", encoding="utf-8")
    return path


def _train_overrides(text: Path) -> list[str]:
    # Whole validation and test splits, so a re-evaluation sees exactly the batches training saw.
    return [
        *FAST_OVERRIDES,
        "data=text_files",
        f"data.source.train_files={text}",
        "data.source.test_fraction=0.1",
        "++trainer.limit_val_batches=1.0",
        "++trainer.limit_test_batches=1.0",
    ]


def _compose(root: Path, overrides: list[str], run_dir: Path, config_name: str = "train") -> DictConfig:
    """What the ``make_cfg`` fixture does, for a module-scoped training run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name=config_name, overrides=[f"paths.root_dir={root}", *overrides], return_hydra_config=True
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.runtime.cwd = str(root)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny character-level GPT, trained in-process; shared by the tests of this module."""
    root = tmp_path_factory.mktemp("trained")
    text = _learnable_text(root / "learnable.txt")
    run_dir = root / "run"
    cfg = _compose(root, _train_overrides(text), run_dir)
    value = train(cfg)
    report = json.loads((run_dir / "metrics.json").read_text())
    return {
        "root": root,
        "text": text,
        "run_dir": run_dir,
        "value": value,
        "report": report,
        "best": Path(report["best_checkpoint"]),
        "last": run_dir / "checkpoints" / "last.ckpt",
    }


# -- evaluate -------------------------------------------------------------------------------------------
def test_evaluate_reproduces_training_metrics_of_the_checkpoint(trained: dict[str, Any], make_cfg) -> None:
    best = trained["best"]
    ckpt = torch.load(best, weights_only=True)
    score = next(v["best_model_score"] for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))

    metrics = evaluate(make_cfg([f"ckpt_path={best}"], config_name="eval"))

    # validation: the score training recorded for this checkpoint (and returned as the optimized metric)
    assert metrics["val/ppl"] == pytest.approx(float(score), rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(trained["value"], rel=1e-5)
    assert metrics["val/loss"] == pytest.approx(math.log(metrics["val/ppl"]), rel=1e-5)
    # test: training tested this same (best) checkpoint
    tested = {k: v for k, v in trained["report"]["metrics"].items() if k.startswith("test/")}
    assert set(tested) == {"test/loss", "test/ppl", "test/bpc"}
    for key, value in tested.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), key


def test_evaluate_one_split_and_writes_metrics(trained: dict[str, Any], make_cfg, tmp_path: Path) -> None:
    metrics = evaluate(make_cfg([f"ckpt_path={trained['best']}", "splits=[test]"], config_name="eval"))
    assert set(metrics) == {"test/loss", "test/ppl", "test/bpc"}
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["metrics"] == metrics and saved["ckpt_path"] == str(trained["best"])
    with pytest.raises(ConfigError, match="train"):
        evaluate(make_cfg([f"ckpt_path={trained['best']}", "splits=[train]"], config_name="eval"))


def test_evaluate_scores_the_splits_there_are_and_names_why_others_are_not(
    trained: dict[str, Any], make_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = f"ckpt_path={trained['best']}"
    no_test = [ckpt, "++data.source.test_fraction=0.0"]
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        metrics = evaluate(make_cfg(no_test, config_name="eval"))
    assert set(metrics) == {"val/loss", "val/ppl", "val/bpc"}
    assert "Skipping the test split: no data.source.test_files are given and data.source.test_fraction is 0" in (
        caplog.text
    )
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["splits"] == ["validation"] and saved["metrics"] == metrics
    assert "data.source.test_fraction is 0" in saved["skipped"]["test"]
    # asked for by name, a split the data lacks is an error with the reason; val is validation
    with pytest.raises(DataError, match=r"splits=\[test\]: the data has no test split: no data.source.test_files"):
        evaluate(make_cfg([*no_test, "splits=[test]"], config_name="eval"))
    assert evaluate(make_cfg([*no_test, "splits=[val]"], config_name="eval")) == metrics
    # a split shorter than one block: the checkpoint fixes data.block_size, so the advice is more text
    with pytest.raises(DataError, match=r"test split has \d+ tokens, fewer than one block of data.block_size\+1=33"):
        evaluate(make_cfg([ckpt, "++data.source.test_fraction=0.001", "splits=[test]"], config_name="eval"))
    with pytest.raises(DataError, match=r"Nothing to score: the data has no validation split: .*; no test split"):
        evaluate(make_cfg([*no_test, "++data.source.val_fraction=0.0"], config_name="eval"))


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (
            HubText("karpathy/tiny_shakespeare", test_fraction=0.0),
            "the data set 'karpathy/tiny_shakespeare' has no 'test' split and data.source.test_fraction is 0 "
            "(map one of its splits to it (data.source.splits.test=<split>), or set data.source.test_fraction above 0 "
            "to have one cut from the end of the training text)",
        ),
        (
            HubTable("parquet", {"text": "t"}, splits={"train": "train"}, data_files={"train": "t.parquet"}),
            "data.source.splits maps nothing to test and data.source.test_fraction is 0",
        ),
        (PydocTopics(test_fraction=0.0), "data.source.test_fraction is 0 (set it above 0 to have a test split cut"),
        (AlignedTextFiles({"src": "a", "tgt": "b"}), "no data.source.test files are given"),
    ],
)
def test_a_source_says_why_it_has_no_test_split(source: Any, reason: str) -> None:
    assert source.absent_reason("test").startswith(reason)


# -- generate -------------------------------------------------------------------------------------------
def _generate(make_cfg: Callable[..., DictConfig], ckpt: Path, *extra: str) -> list[str]:
    return generate_samples(
        make_cfg([f"ckpt_path={ckpt}", "prompt='the '", "max_new_tokens=20", *extra], config_name="generate")
    )


def test_generate_is_reproducible_with_a_seed(trained: dict[str, Any], make_cfg) -> None:
    first = _generate(make_cfg, trained["best"], "seed=0")
    again = _generate(make_cfg, trained["best"], "seed=0")
    other = _generate(make_cfg, trained["best"], "seed=1")
    assert len(first) == 1 and len(first[0]) == 20  # character level: one character per token
    assert set(first[0]) <= set(trained["text"].read_text())
    assert first == again
    assert other != first


def test_generate_num_samples(trained: dict[str, Any], make_cfg) -> None:
    samples = _generate(make_cfg, trained["best"], "seed=0", "num_samples=3")
    assert len(samples) == 3 and all(len(s) == 20 for s in samples)
    assert len(set(samples)) > 1


def test_prompt_outside_char_vocabulary_names_the_character(trained: dict[str, Any], make_cfg) -> None:
    cfg = make_cfg([f"ckpt_path={trained['best']}", "prompt='the Zebra'", "seed=0"], config_name="generate")
    with pytest.raises(TokenizerError, match="'Z'"):
        generate_samples(cfg)


@pytest.mark.parametrize("config_name", ["eval", "generate"])
def test_model_override_must_match_checkpoint(config_name: str, trained: dict[str, Any], make_cfg) -> None:
    run = evaluate if config_name == "eval" else generate_samples
    with pytest.raises(CheckpointMismatchError, match="model"):
        run(make_cfg([f"ckpt_path={trained['best']}", "model=lstm"], config_name=config_name))
    with pytest.raises(CheckpointMismatchError, match="n_embd"):
        run(
            make_cfg(
                [f"ckpt_path={trained['best']}", "model=gpt", "model.n_layer=1", "model.n_embd=64"],
                config_name=config_name,
            )
        )
    # the checkpoint's own model settings are accepted
    quick = ["splits=[validation]"] if config_name == "eval" else ["max_new_tokens=2"]
    matching = make_cfg(
        [f"ckpt_path={trained['best']}", "model=gpt", "model.n_layer=1", *quick], config_name=config_name
    )
    assert run(matching)


# -- resume and ckpt_path -------------------------------------------------------------------------------
def test_resume_with_different_model_raises(trained: dict[str, Any], make_cfg) -> None:
    cfg = make_cfg([*_train_overrides(trained["text"]), f"ckpt_path={trained['last']}", "model.n_embd=64"])
    with pytest.raises(CheckpointMismatchError, match="n_embd"):
        train(cfg)


def test_resume_with_different_tokenizer_raises(trained: dict[str, Any], make_cfg) -> None:
    cfg = make_cfg([*_train_overrides(trained["text"]), f"ckpt_path={trained['last']}", "tokenizer=bpe"])
    with pytest.raises(CheckpointMismatchError, match="tokenizer"):
        train(cfg)


def test_missing_checkpoint_is_a_config_error(make_cfg, tmp_path: Path) -> None:
    for config_name in ("train", "eval", "generate"):
        cfg = make_cfg(["ckpt_path=missing.ckpt"], config_name=config_name)
        run = {"train": train, "eval": evaluate, "generate": generate_samples}[config_name]
        with pytest.raises(ConfigError, match="missing.ckpt"):
            run(cfg)
    assert not (tmp_path / ".cache").exists(), "train() did work before checking ckpt_path"


def test_ckpt_path_last_finds_newest_last_ckpt_of_the_task(trained: dict[str, Any], make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="last"):
        resolve_ckpt_path(make_cfg(["ckpt_path=last"]))

    def place(relative: str, age: float) -> Path:
        path = tmp_path / "logs" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(trained["last"], path)
        stamp = time.time() - age
        os.utime(path, (stamp, stamp))
        return path

    place("train/runs/old/checkpoints/last.ckpt", age=300)
    newest = place("train/multiruns/sweep/0/checkpoints/last.ckpt", age=100)
    place("train/runs/older/checkpoints/last.ckpt", age=200)
    place("train/runs/other/checkpoints/step_000020.ckpt", age=150)  # a step checkpoint counts too, but is older
    place("train/runs/other/checkpoints/samples.ckpt", age=0)  # not a checkpoint name lmlab writes
    place("other_task/runs/x/checkpoints/last.ckpt", age=0)  # another task_name
    assert resolve_ckpt_path(make_cfg(["ckpt_path=last"])) == str(newest)
    newest = place("train/runs/crashed/checkpoints/interrupted.ckpt", age=50)  # saved on Ctrl-C or a crash
    assert resolve_ckpt_path(make_cfg(["ckpt_path=last"])) == str(newest)
    assert resolve_ckpt_path(make_cfg(["ckpt_path=last", "task_name=other_task"])) == str(
        tmp_path / "logs" / "other_task/runs/x/checkpoints/last.ckpt"
    )

    # and training resumes from it: 10 more steps (one validation) after the checkpoint's 20
    steps = torch.load(newest, weights_only=True)["global_step"]
    cfg = make_cfg(
        [*_train_overrides(trained["text"]), "ckpt_path=last", f"trainer.max_steps={steps + 10}", "test=false"],
        run_dir=tmp_path / "resumed",
    )
    train(cfg)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == steps + 10


# -- the checkpoint file --------------------------------------------------------------------------------
def _interpolations(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _interpolations(v)]
    if isinstance(node, list):
        return [s for v in node for s in _interpolations(v)]
    return [node] if isinstance(node, str) and "${" in node else []


def test_checkpoint_is_self_contained_and_weights_only(trained: dict[str, Any]) -> None:
    for path in (trained["best"], trained["last"]):
        ckpt = torch.load(path, weights_only=True)
        extras = ckpt["lmlab"]
        tokenizer = tokenizer_from_state(extras["tokenizer"])
        text = trained["text"].read_text()
        assert extras["tokenizer"]["kind"] == "char"
        assert tokenizer.decode(tokenizer.encode(text[:200], strict=True)) == text[:200]
        config = extras["config"]
        assert not _interpolations(config), "the saved config is not resolved"
        assert config["data"]["source"]["train_files"] == str(trained["text"])
        assert config["paths"]["output_dir"] == str(trained["run_dir"])
        assert config["model"]["_target_"] == "lmlab.models.GPT" and config["model"]["n_layer"] == 1
        assert "run_config" not in ckpt["hyper_parameters"] and "tokenizer_state" not in ckpt["hyper_parameters"]

    task, run_cfg = load_task(trained["best"])
    assert isinstance(task, LanguageModelingTask) and run_cfg["task_name"] == "train"
    assert task.tokenizer is not None and task.tokenizer.fingerprint() == tokenizer.fingerprint()


# -- a non-finite loss ----------------------------------------------------------------------------------
def test_nan_loss_stops_with_step_and_last_good_checkpoint(
    make_cfg, learnable_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nan_step = 7
    loss = LanguageModelingTask._loss

    def nan_from_step(self: LanguageModelingTask, batch: Any) -> torch.Tensor:
        value = loss(self, batch)
        return value * float("nan") if self.training and self.global_step >= nan_step else value

    monkeypatch.setattr(LanguageModelingTask, "_loss", nan_from_step)
    cfg = make_cfg(
        [
            *FAST_OVERRIDES,
            "data=text_files",
            f"data.source.train_files={learnable_text}",
            "trainer.val_check_interval=5",
        ]
    )
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg)
    message = str(info.value)
    assert f"step {nan_step}" in message
    match = re.search(r"Last good checkpoint: (\S+?\.ckpt)", message)
    assert match, message
    good = Path(match.group(1))
    assert good.is_file() and good.parent == tmp_path / "run" / "checkpoints"
    saved = torch.load(good, weights_only=True)
    assert saved["global_step"] == 5  # saved at the validation before the NaN, not after it
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values() if t.is_floating_point())
    assert not (good.parent / "interrupted.ckpt").exists()


def _tiny_task(**settings: Any) -> LanguageModelingTask:
    model = {"_target_": "lmlab.models.GPT", "n_layer": 1, "n_head": 2, "n_embd": 16}
    return LanguageModelingTask(model=model, data_info={"vocab_size": 13, "block_size": 8}, **settings)


class _NoDeviceReads:
    """Within it, a tensor read on the host (``.item()``, ``bool``, ``int``, ``float``) is an error: on a GPU each
    is a sync that makes the step wait for the device."""

    def __enter__(self) -> _NoDeviceReads:
        self.saved = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "__int__", "__float__")}

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("a tensor was read on the host")

        for name in self.saved:
            setattr(torch.Tensor, name, refuse)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)


def test_the_finite_check_reads_the_device_only_every_n_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    task = _tiny_task(finite_check_every_n_steps=4)
    step = {"now": 0}
    monkeypatch.setattr(LanguageModelingTask, "global_step", property(lambda self: step["now"]))
    monkeypatch.setattr(LanguageModelingTask, "current_epoch", property(lambda self: 0))
    monkeypatch.setattr(LanguageModelingTask, "trainer", property(lambda self: None))  # no checkpoint saved yet
    losses = [torch.tensor(2.0), torch.tensor(float("nan")), torch.tensor(1.0)]
    for step["now"], loss in enumerate(losses):
        with _NoDeviceReads():
            task.check_finite(loss)  # steps 0-2: noted on the device, nothing read
    step["now"] = 3
    with pytest.raises(NonFiniteLossError, match=r"became NaN or infinite at step 1 \(seen at step 3"):
        task.check_finite(torch.tensor(1.0))


def test_adam_is_fused_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    optimizer = {"_target_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.1, "fused": None}
    task = _tiny_task(optimizer=optimizer)
    assert task.configure_optimizers().defaults["fused"] is None, "PyTorch's own choice on the CPU"
    monkeypatch.setattr(LanguageModelingTask, "device", property(lambda self: torch.device("cuda")))
    assert task.configure_optimizers().defaults["fused"] is True


# -- console scripts ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Command]:
    """``lmlab-train`` from a fresh directory; then ``lmlab-eval`` and ``lmlab-generate`` on its checkpoint.

    ``--help`` and a run with a missing data file run alongside the training run.
    """
    cwd = tmp_path_factory.mktemp("cli")
    text = _learnable_text(cwd / "input.txt")
    help_dir, bad_dir = tmp_path_factory.mktemp("cli_help"), tmp_path_factory.mktemp("cli_bad")
    commands = {
        "train": Command(
            [script("lmlab-train"), *_train_overrides(text), "trainer.max_steps=10", "trainer.val_check_interval=5"],
            cwd,
            "train",
        ),
        "help": Command([sys.executable, "-m", "lmlab.train", "--help"], help_dir, "help"),
        "bad": Command(
            [
                script("lmlab-train"),
                "data=text_files",
                "data.source.train_files=/nonexistent.txt",
                "print_config=false",
            ],
            bad_dir,
            "bad",
        ),
    }
    if commands["train"].wait().returncode == 0:
        report = json.loads(next((cwd / "logs" / "train" / "runs").glob("*/metrics.json")).read_text())
        ckpt = report["best_checkpoint"]
        commands["eval"] = Command([script("lmlab-eval"), f"ckpt_path={ckpt}"], cwd, "eval")
        # prompt="the " with its quotes reaching Hydra (typed as 'prompt="the "' in a shell)
        commands["generate"] = Command(
            [script("lmlab-generate"), f"ckpt_path={ckpt}", 'prompt="the "', "max_new_tokens=20", "seed=0"],
            cwd,
            "generate",
        )
    for command in commands.values():
        command.wait()
    return commands


def _ok(command: Command) -> Command:
    assert command.returncode == 0, command.stderr[-3000:]
    assert "Traceback" not in command.stderr
    return command


def _train_report(cli: dict[str, Command]) -> dict[str, Any]:
    _ok(cli["train"])
    runs = list((cli["train"].cwd / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, "outputs go to logs/<task_name>/runs/<time> under the launch directory"
    return {"run_dir": runs[0], **json.loads((runs[0] / "metrics.json").read_text())}


def _printed_metric(output: str, key: str) -> float:
    match = re.search(rf"{re.escape(key)}\W+([0-9]+\.[0-9]+)", output)
    assert match, f"{key} not printed:\n{output}"
    return float(match.group(1))


def test_cli_train_prints_metrics_and_writes_checkpoint(cli: dict[str, Command]) -> None:
    report = _train_report(cli)
    out = cli["train"].stdout
    for key in ("val/ppl", "test/ppl"):
        assert _printed_metric(out, key) == pytest.approx(report["metrics"][key], abs=1e-4)
    best = re.search(r"best checkpoint: (\S+)", out)
    assert best and Path(best.group(1)).is_file()
    assert Path(best.group(1)).parent == report["run_dir"] / "checkpoints"
    assert torch.load(report["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10


def test_cli_eval_prints_the_checkpoint_metrics(cli: dict[str, Command]) -> None:
    report = _train_report(cli)
    out = _ok(cli["eval"]).stdout
    for key in ("val/ppl", "test/ppl", "test/loss"):
        assert _printed_metric(out, f"{key}:") == pytest.approx(report["metrics"][key], abs=1e-4)


def test_cli_generate_prints_prompt_and_seeded_sample(cli: dict[str, Command], make_cfg) -> None:
    report = _train_report(cli)
    out = _ok(cli["generate"]).stdout
    expected = generate_samples(
        make_cfg(
            [f"ckpt_path={report['best_checkpoint']}", "prompt='the '", "max_new_tokens=20", "seed=0"],
            config_name="generate",
        )
    )
    assert out == "the " + expected[0] + "\n"


def test_cli_help_lists_groups_and_starts_no_run(cli: dict[str, Command]) -> None:
    out = _ok(cli["help"]).stdout
    for group in ("model", "data", "tokenizer", "optimizer", "scheduler", "logger"):
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in out
    # only what a user picks: not the pieces of a callback set, nor a base that other options build on
    assert "callbacks: classification, default, none, translation\n" in out
    assert "trainer: cpu, ddp, fsdp, gpu\n" in out
    assert "debug: fast_dev_run, limit, overfit, profiler, quick\n" in out
    assert "paths:" not in out.split("== Config ==")[0]
    assert "ckpt_path" in out
    assert not (cli["help"].cwd / "logs").exists(), "--help started a run"


def test_cli_bad_input_is_one_error_line_without_traceback(cli: dict[str, Command]) -> None:
    bad = cli["bad"]
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, bad.stderr[-3000:]
    assert "/nonexistent.txt" in errors[0] and "train_files" in errors[0]
    assert "Traceback" not in bad.stderr + bad.stdout
