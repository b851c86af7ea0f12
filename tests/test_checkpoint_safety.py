"""Loading a checkpoint never runs code: crafted checkpoints are refused by every entry point and by the
averaging script before anything is built, and a legitimate checkpoint of every model still loads."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
from omegaconf import DictConfig, open_dict

from conftest import FAST, Command, compose_cfg, script
from lmlab.errors import CheckpointError, UnsafeCheckpointError
from lmlab.evaluate import evaluate
from lmlab.generate import generate_samples
from lmlab.predict import predict
from lmlab.run.checkpoint import average_checkpoints, load_task, read_checkpoint, verify_checkpoint
from lmlab.tokenizers import tokenizer_from_state
from lmlab.train import build_task, train
from lmlab.translate import translate
from test_config import DATA_INFO, _check_network_output, _local_encoder, group_options, model_task

# one worker runs this module's tests, which share its trained fixtures
pytestmark = pytest.mark.xdist_group("checkpoint_safety")

REPO = Path(__file__).resolve().parents[1]
REFUSAL = "Refusing to load"


class MakesMarker:
    """Unpickling this creates the marker folder: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (str(self.marker),)


def _write_text_node(marker: Path) -> dict[str, Any]:
    """A config node that Hydra would turn into ``Path(marker).write_text("pwned")``."""
    return {
        "_target_": "pathlib.Path.write_text",
        "self": {"_target_": "pathlib.Path", "_args_": [str(marker)]},
        "data": "pwned",
    }


def _pickle_chain_node(marker: Path) -> dict[str, Any]:
    """``torch.load(payload, weights_only=False, mmap=min(False, Path(payload).write_text(<pickle>)))``: writes
    a pickle, then unpickles it (which creates ``marker``; any code would run the same way)."""
    payload = marker.with_suffix(".pkl")
    pickled = pickle.dumps(MakesMarker(marker), protocol=0).decode("ascii")
    write = {
        "_target_": "pathlib.Path.write_text",
        "self": {"_target_": "pathlib.Path", "_args_": [str(payload)]},
        "data": pickled,
    }
    return {
        "_target_": "torch.load",
        "f": str(payload),
        "weights_only": False,
        "mmap": {"_target_": "builtins.min", "_args_": [False, write]},
    }


def _resolver_string(marker: Path) -> str:
    """An interpolation that OmegaConf resolves into a node Hydra then builds."""
    return (
        "${oc.create:{_target_: pathlib.Path.write_text, self: {_target_: pathlib.Path, _args_: ['"
        + str(marker)
        + "']}, data: pwned}}"
    )


def _craft(ckpt: dict[str, Any], variant: str, marker: Path) -> dict[str, Any]:
    """A copy of a real checkpoint with a payload planted where ``variant`` says."""
    ckpt = copy.deepcopy(ckpt)
    hyper, extras = ckpt["hyper_parameters"], ckpt["lmlab"]
    model = hyper["model"]
    if variant == "model":
        hyper["model"] = _write_text_node(marker)
    elif variant == "pickle_chain":  # the chain of the report: write a pickle, then unpickle it
        hyper["model"] = _pickle_chain_node(marker)
    elif variant == "nested":
        hyper["model"] = {**model, "extra": _write_text_node(marker)}
    elif variant == "args":
        hyper["model"] = {**model, "_args_": [_write_text_node(marker)]}
    elif variant == "partial":
        hyper["model"] = {**_write_text_node(marker), "_partial_": True}
    elif variant == "data":
        extras["config"]["data"]["source"] = _write_text_node(marker)
    elif variant == "tokenizer":
        extras["config"]["tokenizer"] = _write_text_node(marker)
    elif variant == "task":
        extras["task"] = "pathlib.Path.write_text"
    elif variant == "interpolation":
        hyper["model"] = {**model, "n_layer": _resolver_string(marker)}
    elif variant == "env_interpolation":
        extras["config"]["data"]["block_size"] = "${oc.env:HOME}"
    else:
        raise ValueError(variant)
    return ckpt


VARIANTS = [
    "model",
    "pickle_chain",
    "nested",
    "args",
    "partial",
    "data",
    "tokenizer",
    "task",
    "interpolation",
    "env_interpolation",
]


@pytest.fixture(scope="module")
def legit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real checkpoint of a tiny character-level GPT, trained for a few steps."""
    root = tmp_path_factory.mktemp("legit")
    text = root / "text.txt"
    text.write_text("the cat sat on the mat.\n" * 400, encoding="utf-8")
    cfg = compose_cfg(
        root,
        [
            *(f"++{o}" for o in FAST),
            "data=text_files",
            f"data.source.train_files={text}",
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            "test=false",
        ],
    )
    train(cfg)
    path = root / "run" / "checkpoints" / "last.ckpt"
    return {"root": root, "path": path, "ckpt": torch.load(path, weights_only=True)}


def _crafted_file(legit: dict[str, Any], variant: str, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "pwned"
    path = folder / f"{variant}.ckpt"
    torch.save(_craft(legit["ckpt"], variant, marker), path)
    return path, marker


def test_the_crafted_payloads_do_run_when_built(legit: dict[str, Any], tmp_path: Path) -> None:
    # Without the allow-list these nodes execute: what the tests below refuse is a working exploit.
    marker = tmp_path / "pwned"
    hydra.utils.instantiate(_write_text_node(marker))
    assert marker.read_text() == "pwned"
    marker.unlink()
    hydra.utils.instantiate({"_target_": "builtins.dict", "x": _resolver_string(marker)})
    assert marker.read_text() == "pwned"
    marker.unlink()
    with pytest.raises(Exception, match="magic number"):  # torch.load fails, after the pickle ran
        hydra.utils.instantiate(_pickle_chain_node(marker))
    assert marker.is_dir()


# -- every entry point, in-process ------------------------------------------------------------------
def _eval(make_cfg: Callable[..., DictConfig], path: Path) -> Any:
    return evaluate(make_cfg([f"ckpt_path={path}"], config_name="eval"))


def _generate(make_cfg: Callable[..., DictConfig], path: Path) -> Any:
    return generate_samples(make_cfg([f"ckpt_path={path}", "max_new_tokens=2"], config_name="generate"))


def _predict(make_cfg: Callable[..., DictConfig], path: Path) -> Any:
    return predict(make_cfg([f"ckpt_path={path}", f"input={path.with_suffix('.txt')}"], config_name="predict"))


def _translate(make_cfg: Callable[..., DictConfig], path: Path) -> Any:
    return translate(make_cfg([f"ckpt_path={path}", f"input={path.with_suffix('.txt')}"], config_name="translate"))


def _resume(make_cfg: Callable[..., DictConfig], path: Path) -> Any:
    return train(make_cfg([f"ckpt_path={path}", "data=text_files", f"data.source.train_files={path}.txt"]))


def _average(make_cfg: Callable[..., DictConfig], path: Path) -> Any:
    return average_checkpoints([path, path])


ENTRY_POINTS = {
    "eval": _eval,
    "generate": _generate,
    "predict": _predict,
    "translate": _translate,
    "train_resume": _resume,
    "average": _average,
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_crafted_checkpoint_is_refused_and_runs_nothing(
    entry: str, variant: str, legit: dict[str, Any], make_cfg, tmp_path: Path
) -> None:
    path, marker = _crafted_file(legit, variant, tmp_path / "crafted")
    path.with_suffix(".txt").write_text("some input\n", encoding="utf-8")
    Path(f"{path}.txt").write_text("some training text\n" * 50, encoding="utf-8")
    with pytest.raises(UnsafeCheckpointError, match=REFUSAL) as refused:
        ENTRY_POINTS[entry](make_cfg, path)
    message = str(refused.value)
    assert str(path) in message and "\n" not in message
    assert sorted(p.name for p in marker.parent.iterdir()) == sorted(
        p.name for p in (path, path.with_suffix(".txt"), Path(f"{path}.txt"))
    ), "the payload ran"


@pytest.mark.parametrize(
    ("variant", "key"),
    [
        ("model", "hyper_parameters.model._target_"),
        ("nested", "hyper_parameters.model.extra._target_"),
        ("args", "hyper_parameters.model._args_.0._target_"),
        ("data", "lmlab.config.data.source._target_"),
        ("tokenizer", "lmlab.config.tokenizer._target_"),
        ("task", "lmlab.task"),
        ("interpolation", "hyper_parameters.model.n_layer"),
        ("env_interpolation", "lmlab.config.data.block_size"),
    ],
)
def test_refusal_names_the_key_and_the_target(variant: str, key: str, legit: dict[str, Any], tmp_path: Path) -> None:
    ckpt = _craft(legit["ckpt"], variant, tmp_path / "pwned")
    with pytest.raises(UnsafeCheckpointError) as refused:
        verify_checkpoint(ckpt, "x.ckpt")
    assert f"{key} " in str(refused.value)
    if variant in {"model", "nested", "args", "data", "tokenizer", "task"}:
        assert "'pathlib.Path.write_text'" in str(refused.value)


def test_refused_target_is_never_imported(legit: dict[str, Any]) -> None:
    ckpt = copy.deepcopy(legit["ckpt"])
    ckpt["hyper_parameters"]["model"]["_target_"] = "lmlab_test_never_imported.Net"
    # a module of that name on the path would run its top-level code on import
    with pytest.raises(UnsafeCheckpointError, match="lmlab_test_never_imported.Net"):
        verify_checkpoint(ckpt, "x.ckpt")
    assert "lmlab_test_never_imported" not in sys.modules


def test_hugging_face_config_with_custom_code_is_refused(legit: dict[str, Any]) -> None:
    ckpt = copy.deepcopy(legit["ckpt"])
    ckpt["hyper_parameters"]["model"]["hf_config"] = {"model_type": "bert", "auto_map": {"AutoModel": "evil.Net"}}
    with pytest.raises(UnsafeCheckpointError, match="auto_map"):
        verify_checkpoint(ckpt, "x.ckpt")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_plain_pickle_is_one_line_refusal(writer: str, tmp_path: Path) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "pickled.ckpt"
    content = {"lmlab": {}, "payload": MakesMarker(marker)}
    if writer == "torch.save":
        torch.save(content, path)
    else:
        with path.open("wb") as f:
            pickle.dump(content, f)
    with pytest.raises(UnsafeCheckpointError, match="pickled Python objects") as refused:
        read_checkpoint(path)
    assert "\n" not in str(refused.value) and not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", "truncated"])
def test_unreadable_file_is_a_clear_error(content: bytes | str, legit: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "broken.ckpt"
    data = legit["path"].read_bytes()
    path.write_bytes(data[: len(data) // 2] if content == "truncated" else content)
    with pytest.raises(CheckpointError, match="is not a readable checkpoint") as err:
        read_checkpoint(path)
    assert str(path) in str(err.value) and "ckpt_path=last" in str(err.value)


def test_legitimate_checkpoint_passes_and_loads(legit: dict[str, Any]) -> None:
    verify_checkpoint(legit["ckpt"], legit["path"])
    task, _ = load_task(legit["path"])
    weights = legit["ckpt"]["state_dict"]
    assert set(task.state_dict()) == set(weights)
    assert all(torch.equal(task.state_dict()[k], v) for k, v in weights.items())


# -- a legitimate checkpoint of every model loads and gives the same outputs --------------------------
@pytest.mark.parametrize("option", group_options("model"))
def test_checkpoint_of_every_model_loads_with_the_same_outputs(option: str, tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, [f"task={model_task(option)}", f"model={option}"])
    with open_dict(cfg):
        cfg.model = _local_encoder(cfg.model)
    tokenizer = tokenizer_from_state({"kind": "char", "chars": list("abcdefghijkl "), "unk": True})
    task = build_task(cfg, type("Data", (), {"tokenizer": tokenizer, "data_info": DATA_INFO})())
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)  # what Lightning's checkpoint holds besides training state
    path = tmp_path / f"{option}.ckpt"
    torch.save(checkpoint, path)
    loaded, run_cfg = load_task(path)
    assert run_cfg["model"]["_target_"] == cfg.model._target_
    task.eval(), loaded.eval()
    torch.manual_seed(0)
    ids = torch.randint(1, DATA_INFO["vocab_size"], (2, 8))
    with torch.no_grad():
        if hasattr(loaded, "generate_text"):
            assert torch.equal(task.net(ids)[0], loaded.net(ids)[0])
        elif hasattr(loaded, "predict_proba"):
            lengths = torch.tensor([8, 5])
            assert torch.equal(task.net(ids, lengths), loaded.net(ids, lengths))
        else:
            lengths = torch.tensor([8, 5])
            assert torch.equal(task.net(ids, lengths, ids[:, :6]), loaded.net(ids, lengths, ids[:, :6]))
    _check_network_output(loaded.net, cfg.model)


# -- through the console scripts, as a user runs them --------------------------------------------------
@pytest.mark.slow
def test_console_scripts_refuse_a_crafted_checkpoint_in_one_line(legit: dict[str, Any], tmp_path: Path) -> None:
    path, marker = _crafted_file(legit, "pickle_chain", tmp_path / "crafted")
    data_path, ckpt_arg = path.with_suffix(".txt"), f"ckpt_path={path}"
    data_path.write_text("some input\n", encoding="utf-8")
    commands = {
        "eval": [script("lmlab-eval"), ckpt_arg],
        "generate": [script("lmlab-generate"), ckpt_arg],
        "predict": [script("lmlab-predict"), ckpt_arg, f"input={data_path}"],
        "translate": [script("lmlab-translate"), ckpt_arg, f"input={data_path}"],
        "average": [
            script("lmlab-average"),
            str(path),
            str(path),
            "--out",
            str(tmp_path / "averaged.ckpt"),
        ],
    }
    started = {name: Command(args, tmp_path, name) for name, args in commands.items()}
    for name, command in started.items():
        command.wait()
        assert command.returncode == 1, (name, command.stderr[-2000:])
        errors = [line for line in command.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and REFUSAL in errors[0] and str(path) in errors[0], (name, command.stderr[-2000:])
        assert "Traceback" not in command.stderr, (name, command.stderr[-2000:])
    assert not marker.exists() and not marker.with_suffix(".pkl").exists()
    assert not (tmp_path / "averaged.ckpt").exists()


def test_averaging_legitimate_checkpoints_still_works(legit: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "averaged.ckpt"
    done = subprocess.run(
        [
            script("lmlab-average"),
            str(legit["path"]),
            str(legit["path"]),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    averaged = read_checkpoint(out)
    original = legit["ckpt"]["state_dict"]
    assert all(torch.equal(averaged["state_dict"][k], v) for k, v in original.items())
    assert json.dumps(averaged["lmlab"]["config"], sort_keys=True) == json.dumps(
        legit["ckpt"]["lmlab"]["config"], sort_keys=True
    )
