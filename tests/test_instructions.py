"""Instruction tuning (``data=instructions``): prompt/response pairs in lmlab-chat's format, a loss over the
response tokens only, cut or skipped overlong examples (counted), the bad-input errors, and whole runs: a
character GPT that answers in lmlab-chat what it was tuned on, and a pretrained causal LM tuned with LoRA
in its tokenizer's chat template."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import (
    CHAT_TEMPLATE,
    EXCHANGES,
    QUIET,
    Command,
    compose_cfg,
    script,
    toy_chat_lm_folder,
    write_exchanges,
)
from lmlab.data.instructions import NO_LOSS, InstructionDataModule
from lmlab.data.tables import TableFiles
from lmlab.errors import DataError
from lmlab.tokenizers import load_pretrained, train_bpe, train_char

TEMPLATE = CHAT_TEMPLATE
EOS = "<|endoftext|>"


def _data(tmp_path: Path, tokenizer: Any = train_char, **settings: Any) -> InstructionDataModule:
    tmp_path.mkdir(exist_ok=True)
    source = TableFiles(
        str(write_exchanges(tmp_path / "pairs.jsonl", 4)), {"prompt": "prompt", "response": "response"}, val_fraction=0
    )
    data = InstructionDataModule(source, tokenizer, cache_dir=str(tmp_path / "cache"), batch_size=4, **settings)
    data.setup()
    return data


def _scored(data: InstructionDataModule) -> list[tuple[str, str]]:
    """``(input text, scored target text)`` of every training example."""
    train = data.datasets["train"]
    x, y = train.__getitems__(list(range(len(train))))
    decode = data.tokenizer.decode
    rows = []
    for inputs, targets, length in zip(x, y, torch.as_tensor(train.lengths), strict=True):
        rows.append((decode(inputs[: length - 1].tolist()), decode(targets[targets != NO_LOSS].tolist())))
    return rows


def test_only_the_response_and_its_end_are_scored(tmp_path: Path) -> None:
    # a character vocabulary has no end-of-text token: a reply ends where the next user turn starts
    expected = {f"User: {p}\nAssistant: {r}\nUser": f" {r}\nUser:" for p, r in EXCHANGES.items()}
    assert dict(_scored(_data(tmp_path))) == expected


def test_the_tasks_loss_has_no_gradient_at_prompt_or_padding_positions(tmp_path: Path) -> None:
    from lmlab.tasks.lm import LanguageModelingTask

    data = _data(tmp_path)
    model = {"_target_": "lmlab.models.gpt.GPT", "n_layer": 1, "n_head": 2, "n_embd": 16}
    task = LanguageModelingTask(model=model, data_info=data.data_info.as_dict())
    x, y = next(iter(data.train_dataloader()))
    logits = torch.randn(*x.shape, data.tokenizer.vocab_size, requires_grad=True)
    task.forward = lambda idx: logits  # type: ignore[method-assign]
    task._loss((x, y)).backward()
    has_gradient = logits.grad.abs().sum(-1) > 0
    assert torch.equal(has_gradient, y != NO_LOSS), "a gradient exactly where a response token is the target"
    assert (y == NO_LOSS).sum() > (y != NO_LOSS).sum() > 0, "prompts and padding are most of the positions"


def test_a_chat_template_writes_the_exchange_and_a_plain_one_ends_with_the_end_of_text_token(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    folder.mkdir()
    train_bpe(["User: hi there\nAssistant: hello see you a tiny model\n" * 50], vocab_size=300).backend.save(
        str(folder / "tokenizer.json")
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    tokenizer = load_pretrained(name_or_path=str(folder), eos_token=EOS)
    templated = dict(_scored(_data(tmp_path / "auto", tokenizer)))
    assert templated[f"<|user|>hi{EOS}\n<|assistant|>hello there{EOS}"] == f"hello there{EOS}\n"
    plain = dict(_scored(_data(tmp_path / "plain", tokenizer, template="plain")))
    assert plain["User: bye\nAssistant: see you\n"] == f" see you\n{EOS}"


def test_overlong_examples_are_cut_or_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # "User: who are you?\nAssistant:" is 29 characters, " a tiny model\nUser:" 19
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        cut = _data(tmp_path / "cut", block_size=24, max_prompt_share=0.7)
    rows = dict(_scored(cut))
    assert rows[" you?\nAssistant: a tiny "] == " a tiny m", (
        "the prompt keeps its last 16 tokens, the response the rest"
    )
    counts = cut.meta["splits"]["train"]
    assert (counts["prompt_cut"], counts["response_cut"], counts["skipped"]) == (12, 12, 0)
    assert "12 prompt(s) were cut to their last 16 tokens (data.max_prompt_share of the context)" in caplog.text
    skipped = _data(tmp_path / "skip", block_size=40, overlong="skip")
    assert skipped.meta["splits"]["train"]["skipped"] == 4 and len(skipped.datasets["train"]) == 8
    with pytest.raises(DataError, match="data.overlong=skip leaves them all out"):
        _data(tmp_path / "none", block_size=20, overlong="skip")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_prompt_share": 1.0}, r"data.max_prompt_share=1.0 must be in \(0, 1\)"),
        ({"overlong": "wrap"}, "data.overlong='wrap': pick truncate or skip"),
        ({"template": "jinja"}, "data.template='jinja': pick one of auto, plain"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, settings: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        _data(tmp_path, **settings)


def test_a_missing_column_names_the_key_and_the_columns_there_are(tmp_path: Path) -> None:
    path = write_exchanges(tmp_path / "pairs.jsonl", prompt="instruction", response="output")
    source = TableFiles(str(path), {"prompt": "instruction", "response": "response"}, val_fraction=0)
    data = InstructionDataModule(source, train_char, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"columns: instruction, output\). Set data.source.columns.response"):
        data.setup()


def test_a_context_column_joins_the_prompt(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.jsonl"
    rows = [
        {"instruction": "add", "input": "2 and 3", "output": "5"},
        {"instruction": "say hi", "input": "", "output": "hi"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows * 4))
    columns = {"prompt": "instruction", "context": "input", "response": "output"}
    data = InstructionDataModule(TableFiles(str(path), columns, val_fraction=0), train_char, cache_dir=str(tmp_path))
    data.setup()
    texts = {text for text, _ in _scored(data)}
    assert texts == {"User: add\n\n2 and 3\nAssistant: 5\nUser", "User: say hi\nAssistant: hi\nUser"}


@pytest.mark.slow
def test_a_tuned_character_model_answers_in_lmlab_chat(tmp_path: Path) -> None:
    """The commands of docs/language-models.md, from an empty folder: tune on the pairs, then ask each prompt."""
    pairs = write_exchanges(tmp_path / "pairs.jsonl", 40)
    run = tmp_path / "run"
    run.mkdir()
    train_args = [
        script("lmlab-train"),
        "data=instructions",
        f"data.source.train_files={pairs}",
        "tokenizer=char",
        "data.block_size=64",
        "data.batch_size=16",
        "model.n_layer=2",
        "model.n_embd=64",
        "trainer.max_steps=300",
        "optimizer.lr=3e-3",
        "test=false",
    ]
    done = Command(train_args, run, "train").wait()
    assert done.returncode == 0, done.stderr[-3000:]
    [checkpoint] = run.glob("logs/train/runs/*/checkpoints/last.ckpt")
    metrics = json.loads(next(run.glob("logs/train/runs/*/metrics.json")).read_text())["metrics"]
    assert metrics["val/ppl"] < 1.2, metrics
    stdin = tmp_path / "conversation.txt"
    stdin.write_text("".join(f"{prompt}\n/reset\n" for prompt in EXCHANGES))
    chat = [script("lmlab-chat"), f"ckpt_path={checkpoint}", "interactive=true", "temperature=0"]
    answered = Command(["bash", "-c", " ".join(chat) + f" < {stdin}"], tmp_path, "chat").wait()
    assert answered.returncode == 0, answered.stderr[-3000:]
    replies = [line for line in answered.stdout.splitlines() if line != "(history cleared)"]
    assert replies == list(EXCHANGES.values())


def test_lora_instruction_tuning_of_a_pretrained_model_in_its_chat_template(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from lmlab.train import train

    folder = toy_chat_lm_folder()
    pairs = write_exchanges(tmp_path / "pairs.jsonl", 40)
    overrides = [
        "data=instructions",
        f"data.source.train_files={pairs}",
        "data.block_size=32",
        "data.batch_size=16",
        "model=hf_causal_lm",
        f"model.name_or_path={folder}",
        "model.lora.r=8",
        "tokenizer=pretrained",
        f"tokenizer.name_or_path={folder}",
        f"tokenizer.eos_token='{EOS}'",
        "trainer.max_steps=200",
        "optimizer.lr=3e-2",
        "test=false",
        "callbacks.samples=null",
        *QUIET,
    ]
    metrics = {}
    for name, extra in (("baseline", ["train=false"]), ("tuned", [])):
        run_dir = tmp_path / name
        train(compose_cfg(tmp_path, [*overrides, *extra], run_dir=run_dir))
        metrics[name] = json.loads((run_dir / "metrics.json").read_text())["metrics"]["val/ppl"]
    # rank-8 updates of a randomly initialised model: a real but modest gain in 200 steps
    assert metrics["tuned"] < metrics["baseline"] / 1.5, metrics
    checkpoint = torch.load(tmp_path / "tuned" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["lmlab"]["tokenizer"]["chat_template"] == TEMPLATE, "lmlab-chat writes what it was tuned on"


def test_a_hub_tokenizers_chat_template_is_fetched_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    import lmlab.tokenizers
    from lmlab.tokenizers import HFBackend

    hub = tmp_path / "hub"
    hub.mkdir()
    train_bpe(["hello there\n" * 20], vocab_size=270).backend.save(str(hub / "tokenizer.json"))
    (hub / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))

    def download(repo_id: str, filename: str, **_: Any) -> str:
        assert repo_id == "someone/tiny"
        if not (hub / filename).is_file():
            raise FileNotFoundError(filename)
        return str(hub / filename)

    def from_pretrained(name: str) -> HFBackend:
        assert name == "someone/tiny"
        return HFBackend.from_file(str(hub / "tokenizer.json"))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(lmlab.tokenizers, "HFBackend", SimpleNamespace(from_pretrained=from_pretrained))
    assert load_pretrained(name_or_path="someone/tiny", eos_token=EOS).chat_template == TEMPLATE
    (hub / "tokenizer_config.json").unlink()
    (hub / "chat_template.jinja").write_text("{{ messages }}")
    assert load_pretrained(name_or_path="someone/tiny", eos_token=EOS).chat_template == "{{ messages }}"
    (hub / "chat_template.jinja").unlink()
    assert load_pretrained(name_or_path="someone/tiny", eos_token=EOS).chat_template is None
