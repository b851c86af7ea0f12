"""Any text can be a prompt: quoted on the command line, from a file, or from stdin; and the continuation
joins the prompt as the tokenizer would have written it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import FAST, Command, compose_cfg, script
from lmlab.errors import ConfigError
from lmlab.generate import generate_samples
from lmlab.tokenizers import train_word
from lmlab.train import build_task, train

# one worker runs this module's tests, which share its trained fixtures
pytestmark = pytest.mark.xdist_group("prompts")

PROMPT = "def f(x): return 'a, b' \"é\""


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny character model whose vocabulary has every character of :data:`PROMPT`."""
    root = tmp_path_factory.mktemp("prompts")
    text = root / "code.txt"
    text.write_text(f"{PROMPT}\nthe cat sat on the mat.\n" * 300, encoding="utf-8")
    train(
        compose_cfg(
            root,
            [
                *(f"++{o}" for o in FAST),
                "data=text_files",
                f"data.source.train_files={text}",
                "trainer.max_steps=4",
                "test=false",
            ],
        )
    )
    return root / "run" / "checkpoints" / "last.ckpt"


def _generate(ckpt: Path, cwd: Path, name: str, *args: str, stdin: str | None = None) -> str:
    command = [script("lmlab-generate"), f"ckpt_path={ckpt}", "max_new_tokens=5", "seed=0", *args]
    if stdin is None:
        done = Command(command, cwd, name).wait()
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout
    finished = subprocess.run(command, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    return finished.stdout


def test_prompt_with_punctuation_quotes_and_non_ascii(char_ckpt: Path, tmp_path: Path, make_cfg) -> None:
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT + "\n", encoding="utf-8")
    expected = make_cfg(
        [f"ckpt_path={char_ckpt}", f"prompt_file={prompt_file}", "max_new_tokens=5", "seed=0"], config_name="generate"
    )
    continuation = generate_samples(expected)[0]
    # as typed in a shell: "prompt='def f(x): return \'a, b\' \"é\"'"
    quoted = "prompt='" + PROMPT.replace("'", "\\'") + "'"
    outputs = {
        "quoted": _generate(char_ckpt, tmp_path, "quoted", quoted),
        "file": _generate(char_ckpt, tmp_path, "file", f"prompt_file={prompt_file}"),
        "stdin": _generate(char_ckpt, tmp_path, "stdin", "prompt_file=-", stdin=PROMPT + "\n"),
    }
    for how, out in outputs.items():
        assert out == PROMPT + continuation + "\n", how


def test_prompt_and_prompt_file_together_is_an_error(char_ckpt: Path, tmp_path: Path, make_cfg) -> None:
    (tmp_path / "p.txt").write_text("the")
    with pytest.raises(ConfigError, match="prompt or prompt_file, not both"):
        generate_samples(
            make_cfg(
                [f"ckpt_path={char_ckpt}", "prompt=the", f"prompt_file={tmp_path / 'p.txt'}"], config_name="generate"
            )
        )


def test_word_level_continuation_keeps_the_space_after_the_prompt(tmp_path: Path) -> None:
    text = "the city of the river is old . the city of the hills is new .\n" * 20
    tokenizer = train_word([text])
    cfg = compose_cfg(tmp_path, ["model.n_layer=1", "model.n_embd=16", "model.n_head=2"])
    info: dict[str, Any] = {"vocab_size": tokenizer.vocab_size, "block_size": 16, "chars_per_token": {}}
    task = build_task(cfg, type("Data", (), {"tokenizer": tokenizer, "data_info": info})())
    prompt = "the city of"
    for seed in range(3):
        continuation = task.generate_text(prompt, max_new_tokens=4, seed=seed)[0]
        assert continuation.startswith(" "), repr(continuation)
        ids = tokenizer.encode(prompt + continuation)
        assert tokenizer.decode(ids) == prompt + continuation
