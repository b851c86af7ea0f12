"""Nothing a user names is lost or left half-written.

``lmlab-export`` replaces only an earlier export (its marker file), with ``overwrite=true``, never the working
folder or one above it, the home or root folder, a symbolic link or a folder holding anything else, and swaps the
new export in only when it is complete. ``lmlab-average --out`` replaces only an earlier average, and it and
``lmlab-predict output=`` write whole files or nothing. A full disk while a checkpoint or an export is written is
one line that says what to do, and leaves no temporary file and no ``interrupted.ckpt``. A prompt longer than the
model's context is cropped with a one-line warning.

A full disk is real: the temporary file a write goes through is made a link to ``/dev/full``, on which every
write fails with ENOSPC, so torch's, safetensors' and tokenizers' own writers fail as they do on a full disk.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import QUIET, Command, compose_cfg, script
from lmlab import average
from lmlab.errors import ConfigError, DiskFullError
from lmlab.run.checkpoint import load_language_model
from lmlab.run.safe_output import MARKER, check_folder, temporary_name

# one worker runs this module's tests, which share its trained fixtures
pytestmark = pytest.mark.xdist_group("safe_output")

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
#: a character GPT with a context of 32 tokens (data.block_size), whose parts export as GPT-2
GPT = FIXTURES / "lm_gpt.ckpt"
#: a character LSTM: no context limit
LSTM = FIXTURES / "lm_lstm.ckpt"
#: text of the checkpoints' character vocabulary, a token a character
SENTENCE = "the red cat sat on the blue mat. "
FULL = Path("/dev/full")

needs_dev_full = pytest.mark.skipif(not FULL.exists(), reason="no /dev/full to make a disk full")

#: trains a few steps of a tiny GPT whose step-4 checkpoint lands on a full disk, through lmlab-train's own
#: entry point (the console script's), in a process that makes the checkpoint's temporary file first (so the
#: checkpoint folder exists before the run, which Lightning would warn about)
FULL_DISK_TRAINING = """
import sys, warnings
from pathlib import Path
from lmlab.run.safe_output import temporary_name
folder = Path("run/checkpoints")
folder.mkdir(parents=True)
temporary_name(folder / "step_000004.ckpt").symlink_to("/dev/full")
warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
sys.argv = ["lmlab-train", *sys.argv[1:]]
from lmlab.cli import train
train()
"""


def _leftovers(folder: Path) -> list[str]:
    """Temporaries (hidden, named after a process) in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and "~" in p.name)


@pytest.fixture(scope="module")
def commands(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Command]:
    """The commands run as a user types them, started together (each spends seconds importing)."""
    started = {}
    # lmlab-export out=.. overwrite=true from a subfolder of a folder holding a file
    parent = tmp_path_factory.mktemp("parent")
    (parent / "keep.txt").write_text("mine")
    (parent / "sub").mkdir()
    (parent / "sub" / "own.txt").write_text("mine too")
    started["export"] = Command(
        [script("lmlab-export"), f"ckpt_path={GPT}", "out=..", "overwrite=true"], parent / "sub", "export"
    )
    # a step checkpoint on a full disk
    if FULL.exists():
        train = tmp_path_factory.mktemp("train")
        (train / "text.txt").write_text(SENTENCE * 200)
        args = [
            "data=text_files",
            "data.source.train_files=text.txt",
            "tokenizer=char",
            "data.block_size=16",
            "data.batch_size=4",
            "model.n_layer=1",
            "model.n_head=2",
            "model.n_embd=16",
            "trainer.max_steps=6",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "test=false",
            "callbacks.model_checkpoint.save_top_k=-1",
            "callbacks.samples=null",
            "hydra.run.dir=run",
            *QUIET,
        ]
        started["train"] = Command([sys.executable, "-c", FULL_DISK_TRAINING, *args], train, "train")
    # prompts longer than the context: predict (two of three lines), generate, chat
    crop = tmp_path_factory.mktemp("crop")
    (crop / "prompts.txt").write_text(f"the cat\n{SENTENCE * 2}\n{SENTENCE * 3}\n")
    (crop / "predictions.jsonl").write_text("an earlier output\n")
    (crop / "prompt.txt").write_text(SENTENCE * 2)
    (crop / "message.txt").write_text(SENTENCE)
    sampling = [f"ckpt_path={GPT}", "max_new_tokens=4", "seed=0"]
    started["predict"] = Command(
        [script("lmlab-predict"), *sampling, "input=prompts.txt", "output=predictions.jsonl"], crop, "predict"
    )
    started["generate"] = Command([script("lmlab-generate"), *sampling, "prompt_file=prompt.txt"], crop, "generate")
    chat = [script("lmlab-chat"), f"ckpt_path={GPT}", "max_new_tokens=8", "seed=0"]
    started["chat"] = Command(["bash", "-c", f"{' '.join(chat)} < message.txt"], crop, "chat")
    return started


def _warnings(stderr: str) -> list[str]:
    """The warnings a command logged: on stderr, so stdout carries its output alone."""
    return [line.split(" - ", 1)[1] for line in stderr.splitlines() if "[WARNING]" in line]


# -- lmlab-export ------------------------------------------------------------------------------------------
def test_export_from_a_subfolder_never_replaces_the_parent_folder(commands: dict[str, Command]) -> None:
    done = commands["export"].wait()
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        "error: out: '..' is a folder that holds the working folder, which lmlab never replaces. "
        "Name a new folder instead."
    ], done.stderr[-3000:]
    parent = done.cwd.parent
    assert (parent / "keep.txt").read_text() == "mine" and (done.cwd / "own.txt").read_text() == "mine too"
    assert _leftovers(parent) == [] and _leftovers(parent.parent) == []


def test_the_working_home_and_root_folders_are_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, work = tmp_path / "home", tmp_path / "home" / "work"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for target, why in {
        ".": "the working folder",
        str(work): "the working folder",
        str(tmp_path): "a folder that holds the working folder",
        "~": "the home folder",
        "/": "the root folder",
    }.items():
        with pytest.raises(ConfigError, match=f"^out: '{re.escape(target)}' is {why}, which lmlab never replaces"):
            check_folder(target, "out", overwrite=True)
    assert check_folder("new", "out", overwrite=False) == Path("new"), "a new folder inside it is fine"


def _export(out: Path | str, *extra: str) -> Path:
    from lmlab.export import export

    return export(compose_cfg(Path.cwd(), [f"ckpt_path={GPT}", f"out={out}", *extra], config_name="export"))


def test_a_symbolic_link_is_refused_naming_the_real_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    real = tmp_path / "real"
    real.mkdir()
    (real / "notes.txt").write_text("mine")
    Path("link").symlink_to(real)
    with pytest.raises(ConfigError) as refused:
        _export("link", "overwrite=true")
    assert str(refused.value) == (
        f"out: 'link' is a symbolic link to '{real}', which lmlab does not replace. Name the real path instead: "
        f"out={real}"
    )
    assert Path("link").is_symlink() and (real / "notes.txt").read_text() == "mine"
    assert _leftovers(tmp_path) == [], "nothing written beside it"


def test_a_folder_lmlab_did_not_write_is_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"^out: 'out' holds files lmlab did not write \(notes.txt\), so it is never"):
        _export("out", "overwrite=true")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


@needs_dev_full
def test_an_export_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmlab.export

    monkeypatch.chdir(tmp_path)
    out = _export("out")
    record = json.loads((out / MARKER).read_text())
    assert record["written_by"] == "lmlab-export" and record["checkpoint"] == str(GPT)
    assert sorted(record["files"]) == sorted(p.name for p in out.iterdir() if p.name != MARKER)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(record["files"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(ConfigError, match="^out: 'out' holds an earlier output of lmlab-export. Set overwrite=true"):
        _export("out")

    # the disk fills while the tokenizer is written (by the tokenizers library, in Rust)
    write_tokenizer = lmlab.export.write_tokenizer

    def on_a_full_disk(tokenizer, folder: Path, block_size: int) -> None:
        (folder / "tokenizer.json").symlink_to(FULL)
        write_tokenizer(tokenizer, folder, block_size)

    monkeypatch.setattr(lmlab.export, "write_tokenizer", on_a_full_disk)
    with pytest.raises(DiskFullError) as full:
        _export("out", "overwrite=true")
    assert re.fullmatch(
        rf"no space left on /\S* while writing {re.escape(str(out.resolve()))}; nothing was written: free space and "
        r"run it again\.",
        str(full.value),
    ), str(full.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the earlier export is kept as it was"
    assert _leftovers(tmp_path) == []

    monkeypatch.setattr(lmlab.export, "write_tokenizer", write_tokenizer)
    inode = out.stat().st_ino
    _export("out", "overwrite=true")
    assert out.stat().st_ino != inode and (out / "config.json").is_file() and _leftovers(tmp_path) == []

    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"also holds files it did not write \(notes.txt\), so it is not replaced"):
        _export("out", "overwrite=true")
    assert (out / "notes.txt").read_text() == "mine"


# -- a full disk during training ---------------------------------------------------------------------------
@needs_dev_full
def test_a_full_disk_during_training_is_one_line_naming_the_checkpoint_to_resume_from(
    commands: dict[str, Command],
) -> None:
    done = commands["train"].wait()
    folder = done.cwd / "run" / "checkpoints"
    assert done.returncode == 1, done.stderr[-3000:]
    assert len(done.stderr.splitlines()) == 1, done.stderr[-3000:]
    said = re.fullmatch(
        rf"error: no space left on /\S* while writing {re.escape(str(folder.resolve() / 'step_000004.ckpt'))}; the "
        r"last complete checkpoint is (\S+); free space and resume with: lmlab-train ckpt_path=\1 "
        r"\(the run continues with its own config\)\.",
        done.stderr.strip(),
    )
    assert said, done.stderr
    assert torch.load(said.group(1), weights_only=True)["global_step"] == 2
    # no interrupted.ckpt (its save would fail too) and no temporary file
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step_000002.ckpt"]


# -- lmlab-average --out -------------------------------------------------------------------------------------
def _average(out: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str | None:
    """Run lmlab-average on the GPT checkpoint twice into ``out``: its error line, or None."""
    monkeypatch.setattr(sys, "argv", ["lmlab-average", str(GPT), str(GPT), "--out", str(out)])
    capsys.readouterr()
    try:
        average.main()
    except SystemExit as stopped:
        assert stopped.code == 1
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]
    return None


@needs_dev_full
def test_average_replaces_only_an_earlier_average_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    notes, training = tmp_path / "notes.txt", tmp_path / "last.ckpt"
    notes.write_text("mine")
    training.write_bytes(GPT.read_bytes())
    for other in (notes, training):
        said = _average(other, monkeypatch, capsys)
        assert said == (
            f"error: --out: '{other}' exists and is not an earlier lmlab-average output, so it is not replaced. "
            "Name another file, or remove it yourself."
        )
    assert notes.read_text() == "mine" and training.read_bytes() == GPT.read_bytes()

    out = tmp_path / "averaged.ckpt"
    assert _average(out, monkeypatch, capsys) is None
    assert torch.load(out, weights_only=True)["lmlab"]["averaged_from"] == [str(GPT), str(GPT)]
    written = out.read_bytes()
    temporary_name(out).symlink_to(FULL)
    said = _average(out, monkeypatch, capsys)
    assert said is not None and re.fullmatch(
        rf"error: no space left on /\S* while writing {re.escape(str(out))}; nothing was written: free space and run "
        r"it again\.",
        said,
    ), said
    assert out.read_bytes() == written and _leftovers(tmp_path) == []
    assert _average(out, monkeypatch, capsys) is None, "an earlier average is replaced"


# -- lmlab-predict output= -----------------------------------------------------------------------------------
@needs_dev_full
def test_a_prediction_file_is_written_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmlab import predict

    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text("the cat\n")
    Path("predictions.jsonl").write_text("an earlier output\n")
    temporary_name(tmp_path / "predictions.jsonl").symlink_to(FULL)
    cfg = compose_cfg(
        tmp_path,
        [f"ckpt_path={GPT}", "input=prompts.txt", "output=predictions.jsonl", "max_new_tokens=2"],
        config_name="predict",
    )
    with pytest.raises(SystemExit) as stopped:
        predict.run(cfg)
    assert stopped.value.code == 1
    said = capsys.readouterr().err.strip()
    assert re.fullmatch(
        rf"error: no space left on /\S* while writing {re.escape(str(tmp_path / 'predictions.jsonl'))}; nothing was "
        r"written: free space and run it again\.",
        said,
    ), said
    assert Path("predictions.jsonl").read_text() == "an earlier output\n" and _leftovers(tmp_path) == []


# -- prompts longer than the context -----------------------------------------------------------------------
def test_predict_crops_long_prompts_with_one_warning_and_replaces_its_output(commands: dict[str, Command]) -> None:
    done = commands["predict"].wait()
    assert done.returncode == 0, done.stderr[-3000:]
    assert _warnings(done.stderr) == [
        f"2 of 3 prompts are longer than the model's context (data.block_size=32): of each, only the last 32 tokens "
        f"are read (the longest has {len(SENTENCE * 3)})."
    ], done.stderr
    records = [json.loads(line) for line in (done.cwd / "predictions.jsonl").read_text().splitlines()]
    assert [record["line"] for record in records] == [1, 2, 3] and _leftovers(done.cwd) == []


def test_generate_crops_a_long_prompt_with_a_warning(commands: dict[str, Command]) -> None:
    done = commands["generate"].wait()
    assert done.returncode == 0, done.stderr[-3000:]
    assert _warnings(done.stderr) == [
        f"The prompt has {len(SENTENCE * 2)} tokens, more than the model's context (data.block_size=32): only its "
        "last 32 are read."
    ], done.stderr
    assert SENTENCE * 2 in done.stdout, "the whole prompt is printed before its continuation"


def test_chat_crops_a_message_that_alone_does_not_fit(commands: dict[str, Command]) -> None:
    done = commands["chat"].wait()
    assert done.returncode == 0, done.stderr[-3000:]
    warned = _warnings(done.stderr)
    assert len(warned) == 1, done.stderr
    said = re.fullmatch(
        r"The message takes (\d+) tokens, more than the 24 that the model's context \(data.block_size=32\) leaves "
        r"beside a reply of 8: only its last 24 are read\.",
        warned[0],
    )
    assert said and int(said.group(1)) > len(SENTENCE.strip()), warned


def test_a_recurrent_model_reads_any_prompt_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    model, _ = load_language_model(LSTM)
    assert model.context is None
    model.generate_text(SENTENCE * 3, max_new_tokens=2, seed=0)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
