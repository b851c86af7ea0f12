"""Every command in the fenced bash blocks of README.md and of the pages in docs/, run as written.

A section is a heading of one of these files (``docs/translation.md::Data``). Each section runs in a fresh,
empty directory, its commands in order, as a subprocess of ``bash`` with no ``paths.*`` or ``hydra.*``
overrides; sections are independent tests, so pytest-xdist runs them in parallel, and commands that use an
earlier command's run share a section. ``ROWS`` holds one row per command, and a row may add only two kinds
of thing, both visible there: limiting overrides (fewer steps, batches, trials or tokens) and, for a command
that reads a hub data set, the documented offline form of the same data option, reading a slice of its copy in
``../shared/data`` (``OFFLINE_ROWS`` rows of each split, in the same layout).
The placeholders the docs ask a user to fill in are filled the way the user would: ``<run>`` with the newest
run folder of that path, ``ckpt_path=...`` with the checkpoint the previous command of the section used. The
input files a section's commands name (``train.csv``, ``test.de``) are written into the directory first
(``INPUTS``), cut from the shared data sets. A command without a row, or a row without a command, fails the
test.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import EXCHANGES, SHARED_DATA, built_once, write_slices
from conftest import offline_data as _offline

REPO = Path(__file__).resolve().parents[1]
#: the user docs: the README and every page of docs/
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# -- the documented commands ------------------------------------------------------------------------------


def doc_sections(text: str) -> dict[str, list[str]]:
    """The commands of each heading's bash blocks: continuation lines joined, comments left out (other fenced
    blocks, whose lines may start with ``#``, are skipped whole)."""
    sections: dict[str, list[str]] = {}
    heading, fence, pending = "", None, ""
    for line in text.splitlines():
        if fence is None and line.strip().startswith("```"):
            fence = line.strip().removeprefix("```")
        elif fence is None and line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif fence is not None and line.strip() == "```":
            fence = None
        elif fence == "bash":
            line = pending + line.lstrip() if pending else line
            pending = ""
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1]
                continue
            command = re.sub(r"\s+#\s.*$", "", line).strip()
            if command and not command.startswith("#"):
                sections.setdefault(heading, []).append(command)
    return sections


def doc_name(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


#: ``file::heading`` -> the commands of that section, in order
SECTIONS: dict[str, list[str]] = {
    f"{doc_name(path)}::{heading}": commands
    for path in DOCS
    for heading, commands in doc_sections(path.read_text(encoding="utf-8")).items()
}

# -- the table: what each command gets added --------------------------------------------------------------

#: a few steps, two validations, two validation and test batches, short text samples
STEPS = (
    "trainer.max_steps=4 trainer.val_check_interval=2 trainer.limit_val_batches=2 trainer.limit_test_batches=2 "
    "callbacks.samples.max_new_tokens=5"
)
CLS_STEPS = STEPS.replace(" callbacks.samples.max_new_tokens=5", "")
#: translation also scores (and beam-decodes) fewer test sentences, with a smaller network
MT_STEPS = f"{CLS_STEPS} data.eval_batch_size=16"
SMALL_TRANSFORMER = "model.n_embd=64 model.n_head=2 model.encoder_layers=1 model.decoder_layers=1"
SMALL_RNN = "model.embedding_dim=32 model.hidden_size=64 model.encoder_layers=1 model.decoder_layers=1"
TRIALS = "hydra.sweeper.n_trials=2"


@dataclass(frozen=True)
class Row:
    """What one documented command gets: limiting overrides, the offline form of a hub data option, or the
    reason it cannot run here (``gpus``: how many CUDA devices it needs)."""

    add: str = ""
    offline: str | None = None
    skip: str | None = None
    gpus: int = 0


ROWS: dict[str, Row] = {
    # README.md::Two commands
    'pip install "torch==2.13.0" -e . && lmlab-train': Row(add=STEPS),
    'pip install "torch==2.13.0" -e ".[test]" && pytest -n auto': Row(skip="the test suite itself: .ci/run runs it"),
    # docs/training.md::Data
    "lmlab-train data=text_files data.source.train_files='corpus/*.txt' data.source.val_fraction=0.1": Row(add=STEPS),
    "lmlab-train data=text_files data.source.train_files=train.jsonl data.source.val_files=valid.jsonl "
    "data.source.text_column=body": Row(add=STEPS),
    "lmlab-train data=wikitext2 tokenizer=word model=lstm": Row(add=STEPS, offline="wikitext2"),
    # docs/training.md::Hub data sets offline
    "lmlab-train data=wikitext2 tokenizer=word model=lstm data.source.path=parquet data.source.name=null "
    "data.source.data_files='{train: train.parquet, validation: validation.parquet, test: test.parquet}'": Row(
        add=STEPS
    ),
    # docs/training.md::Corpora larger than memory
    "lmlab-train data=text_files data.source.train_files='corpus/**/*.txt' data.source.end_of_document=true "
    "tokenizer=bpe data.num_proc=2": Row(add=STEPS),
    "lmlab-train data=hub_text data.source.path=HuggingFaceFW/fineweb-edu data.source.name=sample-10BT "
    "data.source.streaming=true tokenizer=bpe": Row(add=STEPS, offline="hub_text"),
    # docs/training.md::Resume
    "lmlab-train ckpt_path=last": Row(add=STEPS.replace("max_steps=4", "max_steps=6")),
    "lmlab-train ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt": Row(
        add=STEPS.replace("max_steps=4", "max_steps=8")
    ),
    # docs/training.md::Multi-GPU and precision
    "lmlab-train trainer=gpu trainer.precision=bf16-mixed compile=true": Row(add=STEPS, gpus=1),
    "lmlab-train trainer=ddp trainer.devices=4": Row(add=STEPS, gpus=4),
    "lmlab-train trainer=fsdp trainer.devices=8 trainer.num_nodes=2": Row(
        skip="needs two nodes of eight GPUs each", gpus=16
    ),
    "lmlab-train trainer=ddp trainer.accelerator=cpu trainer.devices=2": Row(add=STEPS),
    # docs/language-models.md::Generating text
    "lmlab-train model=lstm tokenizer=bpe tokenizer.vocab_size=4096 optimizer.lr=1e-3 trainer.max_steps=2000": Row(
        add=STEPS
    ),
    "lmlab-eval ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt": Row(
        add="trainer.limit_val_batches=2 trainer.limit_test_batches=2"
    ),
    'lmlab-generate ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt prompt="The import statement" '
    "max_new_tokens=200 temperature=0.8 top_k=50 top_p=0.95 seed=0": Row(add="max_new_tokens=20"),
    "lmlab-generate ckpt_path=... \"prompt='def f(x): return x, \\'é\\''\"": Row(add="max_new_tokens=5"),
    "lmlab-generate ckpt_path=... prompt_file=prompt.txt": Row(add="max_new_tokens=5"),
    'echo "def f(x):" | lmlab-generate ckpt_path=... prompt_file=-': Row(add="max_new_tokens=5"),
    # docs/language-models.md::Llama-style decoders, export and chat
    "lmlab-train model=llama model.n_kv_head=1 trainer.max_steps=1000": Row(add=STEPS),
    "lmlab-export ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt out=hf_llama": Row(),
    'echo "What does the import statement do?" | lmlab-chat ckpt_path=... max_new_tokens=100': Row(
        add="max_new_tokens=5"
    ),
    "lmlab-train model=from_checkpoint tokenizer=from_checkpoint "
    "model.ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt model.lora.r=8 "
    "data=text_files data.source.train_files=other.txt": Row(add=STEPS),
    # docs/language-models.md::Instruction tuning
    "lmlab-train data=instructions data.source.train_files=pairs.jsonl tokenizer=char data.block_size=128": Row(
        add=STEPS
    ),
    'echo "hi" | lmlab-chat ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt temperature=0': Row(
        add="max_new_tokens=5"
    ),
    "lmlab-train experiment=lm/alpaca_qwen_lora trainer=gpu": Row(
        skip="downloads Qwen2.5-0.5B and Alpaca and needs a GPU (tests/test_config.py trains it offline, tiny)"
    ),
    # docs/classification.md::Train and predict
    "lmlab-train experiment=cls/imdb_lstm": Row(
        add=f"{CLS_STEPS} model.hidden_size=16 data.eval_batch_size=16", offline="imdb"
    ),
    "lmlab-predict ckpt_path=logs/imdb_lstm/runs/<run>/checkpoints/last.ckpt input=reviews.txt": Row(),
    "cat reviews.txt | lmlab-predict ckpt_path=... output=predictions.jsonl": Row(),
    # docs/classification.md::Models and data
    "lmlab-train task=classification model=textcnn data=sst2 tokenizer=word": Row(add=CLS_STEPS, offline="sst2"),
    "lmlab-train task=classification data=labeled_files data.source.train_files=train.csv "
    "data.source.test_files=test.csv data.source.columns.text=review data.source.columns.label=sentiment": Row(
        add=CLS_STEPS
    ),
    # docs/translation.md::Train, translate, average
    "lmlab-train experiment=mt/multi30k_transformer callbacks.model_checkpoint.save_top_k=5": Row(
        add=f"{MT_STEPS} {SMALL_TRANSFORMER}", offline="multi30k"
    ),
    "lmlab-translate ckpt_path=logs/multi30k_transformer/runs/<run>/checkpoints/last.ckpt input=test.de "
    "beam_size=5": Row(),
    "cat test.de | lmlab-translate ckpt_path=... length_penalty=0.6 > test.hyp": Row(),
    "lmlab-average logs/multi30k_transformer/runs/<run>/checkpoints/step_*.ckpt --out averaged.ckpt": Row(),
    # docs/translation.md::Models
    "lmlab-train task=translation model=gru_attention data=multi30k data.source_lang=en data.target_lang=de": Row(
        add=f"{MT_STEPS} {SMALL_RNN}", offline="multi30k"
    ),
    # docs/translation.md::Data
    "lmlab-train task=translation data=translation_files data.source.train_files=train.parquet "
    "data.source.val_files=valid.parquet data.source.test_files=test.parquet data.source_lang=de "
    "data.target_lang=en": Row(add=f"{MT_STEPS} {SMALL_TRANSFORMER}"),
    "lmlab-train task=translation data=aligned_text data.source.train.src=train.de data.source.train.tgt=train.en": Row(
        add=f"{MT_STEPS} {SMALL_TRANSFORMER}"
    ),
    # docs/sweeps.md::Grid, random and Optuna search
    "lmlab-train -m model=lstm,gru optimizer.lr=1e-3,3e-3": Row(add=STEPS),
    "lmlab-train hparams_search=lm_optuna hydra.sweeper.n_trials=20": Row(add=f"{STEPS} {TRIALS}"),
    "lmlab-train hparams_search=lm_random hydra.sweeper.n_trials=20": Row(add=f"{STEPS} {TRIALS}"),
    "lmlab-train hparams_search=lm_optuna hydra/sweeper/sampler=random": Row(add=f"{STEPS} {TRIALS}"),
    # docs/sweeps.md::Classifiers
    "lmlab-train -m task=classification model=bilstm,textcnn data=sst2": Row(add=CLS_STEPS, offline="sst2"),
    "lmlab-train hparams_search=cls_optuna data=sst2": Row(add=f"{CLS_STEPS} {TRIALS}", offline="sst2"),
    "lmlab-train hparams_search=cls_random model=textcnn data=sst2": Row(add=f"{CLS_STEPS} {TRIALS}", offline="sst2"),
    # docs/sweeps.md::Translation models
    "lmlab-train hparams_search=mt_optuna experiment=mt/multi30k_transformer": Row(
        add=f"{MT_STEPS} {SMALL_TRANSFORMER} {TRIALS}", offline="multi30k"
    ),
    # docs/sweeps.md::On SLURM, or as separate local processes
    "lmlab-train -m hydra/launcher=local optimizer.lr=1e-3,3e-3": Row(add=STEPS),
    "lmlab-train -m hydra/launcher=slurm hydra.launcher.partition=gpu trainer=ddp trainer.devices=4 "
    "trainer.num_nodes=2 optimizer.lr=1e-4,3e-4": Row(
        skip="needs a SLURM cluster (tests/test_launcher.py checks its job script)"
    ),
    # docs/logging.md::Weights & Biases
    "lmlab-train logger=wandb": Row(
        skip="logs in to W&B: needs an account and the network (the next command is its offline form)"
    ),
    "WANDB_MODE=offline lmlab-train logger=wandb": Row(add=STEPS),
    "wandb sync logs/train/runs/<run>/wandb/offline-run-*": Row(
        skip="uploads to W&B: needs an account and the network"
    ),
}

# -- what a section needs before its first command --------------------------------------------------------

#: a run for sections whose first command resumes or reads a checkpoint that another section made
BEFORE = {"docs/training.md::Resume": f"lmlab-train {STEPS}"}


def _shared_rows(name: str, columns: list[str], rows: int) -> list[dict[str, str]]:
    import pyarrow.parquet as pq

    if not SHARED_DATA.is_dir():
        pytest.skip("its input files are cut from ../shared/data, which is absent")
    table = pq.read_table(SHARED_DATA / name, columns=columns).slice(0, rows)
    return table.to_pylist()


def _write_table(path: Path, records: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.json  # noqa: F401
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(records)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        pyarrow.csv.write_csv(table, path)
    else:
        import json

        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def _wikitext(rows: int, split: str = "train") -> list[str]:
    return [r["text"] for r in _shared_rows(f"wikitext-2/{split}.parquet", ["text"], rows)]


def _prompt_file(cwd: Path) -> None:
    (cwd / "prompt.txt").write_text("def f(x):\n    return {'é': (x, \"a, b\")}\n", encoding="utf-8")


def _other_text(cwd: Path) -> None:
    (cwd / "other.txt").write_text("".join(_wikitext(400)), encoding="utf-8")


def _instruction_pairs(cwd: Path) -> None:
    _write_table(cwd / "pairs.jsonl", [{"prompt": p, "response": r} for p, r in EXCHANGES.items()] * 20)


def _text_files(cwd: Path) -> None:
    text = _wikitext(3000)
    (cwd / "corpus").mkdir()
    for i in range(3):
        (cwd / "corpus" / f"part{i}.txt").write_text("".join(text[i * 1000 : (i + 1) * 1000]), encoding="utf-8")
    _write_table(cwd / "train.jsonl", [{"body": t} for t in text[:2500]])
    _write_table(cwd / "valid.jsonl", [{"body": t} for t in text[2500:]])


def _hub_split_copies(cwd: Path) -> None:
    for split in ("train", "validation", "test"):
        _write_table(cwd / f"{split}.parquet", [{"text": t} for t in _wikitext(1000, split)])


def _corpus_folders(cwd: Path) -> None:
    text = _wikitext(4000)
    for i in range(4):
        folder = cwd / "corpus" / f"part{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.txt").write_text("".join(text[i * 1000 : (i + 1) * 1000]), encoding="utf-8")


def _reviews() -> list[dict[str, str]]:
    rows = _shared_rows("imdb/train.parquet", ["text", "label"], 25000)[::50]
    return [{"review": r["text"], "sentiment": ["negative", "positive"][r["label"]]} for r in rows]


def _reviews_to_predict(cwd: Path) -> None:
    (cwd / "reviews.txt").write_text("".join(r["review"][:300] + "\n" for r in _reviews()[:5]), encoding="utf-8")


def _labeled_tables(cwd: Path) -> None:
    named = _reviews()
    _write_table(cwd / "train.csv", named[:400])
    _write_table(cwd / "test.csv", named[400:])


def _pairs() -> list[dict[str, str]]:
    return _shared_rows("multi30k/train.parquet", ["de", "en"], 1200)


def _sources_to_translate(cwd: Path) -> None:
    (cwd / "test.de").write_text("".join(p["de"] + "\n" for p in _pairs()[1100:1110]), encoding="utf-8")


def _parallel_files(cwd: Path) -> None:
    pairs = _pairs()
    _write_table(cwd / "train.parquet", pairs[:1000])
    _write_table(cwd / "valid.parquet", pairs[1000:1100])
    _write_table(cwd / "test.parquet", pairs[1100:])
    for lang in ("de", "en"):
        (cwd / f"train.{lang}").write_text("".join(p[lang] + "\n" for p in pairs[:1000]), encoding="utf-8")


#: the files a section's commands name, written as a user would have them before its first command
INPUTS: dict[str, Callable[[Path], None]] = {
    "docs/training.md::Data": _text_files,
    "docs/training.md::Hub data sets offline": _hub_split_copies,
    "docs/training.md::Corpora larger than memory": _corpus_folders,
    "docs/language-models.md::Generating text": _prompt_file,
    "docs/language-models.md::Llama-style decoders, export and chat": _other_text,
    "docs/language-models.md::Instruction tuning": _instruction_pairs,
    "docs/classification.md::Train and predict": _reviews_to_predict,
    "docs/classification.md::Models and data": _labeled_tables,
    "docs/translation.md::Train, translate, average": _sources_to_translate,
    "docs/translation.md::Data": _parallel_files,
}


# -- running a section ------------------------------------------------------------------------------------


def _newest(cwd: Path, pattern: str) -> str:
    found = sorted(cwd.glob(pattern), key=lambda p: p.stat().st_mtime)
    assert found, f"nothing in {cwd} matches {pattern} for the placeholder"
    return found[-1].name


def fill_placeholders(command: str, cwd: Path, previous_ckpt: str | None) -> str:
    """``<run>``: the newest run folder of that path; ``ckpt_path=...``: the previous command's checkpoint."""
    for match in re.finditer(r"([^\s=]*)<run>", command):
        command = command.replace(f"{match.group(1)}<run>", match.group(1) + _newest(cwd, match.group(1) + "*"), 1)
    if "ckpt_path=..." in command:
        assert previous_ckpt, "ckpt_path=... follows no command with a checkpoint in its section"
        command = command.replace("ckpt_path=...", f"ckpt_path={previous_ckpt}")
    return command


#: the rows of each split of a hub data set that its offline form reads: its format, not its size, is under test
#: (WikiText lines are short, many empty: enough for a validation block of 1024 tokens)
OFFLINE_ROWS = {"wikitext-2": 12000, "imdb": 2000, "sst2": 2000, "multi30k": 2000}


@pytest.fixture(scope="session")
def offline_copies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Slices of the shared copies of the hub data sets, in their layout, written once per test run."""
    if not SHARED_DATA.is_dir():
        return SHARED_DATA  # the rows that read it are skipped
    return built_once(tmp_path_factory, "offline_copies", lambda root: write_slices(root, OFFLINE_ROWS))


def with_additions(command: str, row: Row, offline_root: Path) -> str:
    """The row's additions go after the lmlab command's own arguments (before a redirection)."""
    additions = " ".join(filter(None, [row.add, _offline(row.offline, offline_root) if row.offline else ""]))
    if not additions:
        return command
    head, redirect, tail = command.partition(" > ")
    return f"{head} {additions}{redirect}{tail}"


def environment() -> dict[str, str]:
    """The user's environment: this interpreter's console scripts first, nothing that points lmlab elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMLAB_", "PYTEST_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_command(command: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stderr[-4000:]}"
    assert "Traceback" not in done.stderr, f"{command}\n{done.stderr[-4000:]}"
    return done


def _without_install(command: str) -> str:
    """``pip install ... && lmlab-train``: the install is CI's own first step; the rest runs here."""
    install, _, rest = command.partition(" && ")
    pinned_torch = install.split()[2]
    assert f"pip install -q {pinned_torch} -e" in (REPO / ".ci" / "run").read_text(), f"{install}: not how CI installs"
    return rest


def _cannot_run(row: Row) -> str | None:
    if row.skip:
        return row.skip
    if row.gpus:
        import torch

        if torch.cuda.device_count() < row.gpus:
            return f"needs {row.gpus} CUDA GPU(s)"
    if row.offline and not SHARED_DATA.is_dir():
        return "its offline form reads ../shared/data, which is absent"
    return None


def documented_commands() -> list[tuple[str, str]]:
    """(section, command) for every command of a bash block, in the order of the docs."""
    return [(section, command) for section, commands in SECTIONS.items() for command in commands]


def test_every_documented_command_has_one_row() -> None:
    commands = [command for _, command in documented_commands()]
    missing = [c for c in commands if c not in ROWS]
    stale = [c for c in ROWS if c not in commands]
    assert not missing, f"documented commands without a row in ROWS: {missing}"
    assert not stale, f"rows for commands that neither the README nor docs/ has any more: {stale}"
    twice = {c for c in commands if commands.count(c) > 1}
    assert not twice, f"a documented command appears twice: {twice}"


#: a word the shell hands an lmlab command as a Hydra override: ``key=value``, ``+key=value``, ``group/option=x``
OVERRIDE = re.compile(r"[+~]{0,2}[A-Za-z_][\w./@-]*=")
#: what ends the words of one command in a command line
SHELL_OPERATORS = {"|", "||", "&", "&&", ";", ">", ">>", "<", "2>", "(", ")"}
#: a value the docs ask a reader to fill in (``<run>``, ``model=<name>``), not text to paste
PLACEHOLDER = re.compile(r"<([A-Za-z_][\w-]*)>")


def prose_commands(text: str) -> list[str]:
    """The commands a page's prose shows in inline code (`lmlab-train ... key=value`, a span wrapped over
    lines joined): a reader pastes them as they are."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans = (" ".join(match.group(1).split()) for match in re.finditer(r"`([^`]+)`", prose))
    return [span for span in spans if re.search(r"(^|\s)lmlab-\w+", span)]


def lmlab_overrides(command: str) -> list[str]:
    """The words an lmlab command of ``command`` gets as the shell splits them, quotes removed (``shlex`` quotes
    as POSIX shells do), up to the operator that ends it (a pipe, a redirection)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars="|&;<>()")
    lexer.whitespace_split = True
    words, inside = [], False
    for word in lexer:
        if word in SHELL_OPERATORS:
            inside = False
        elif word.startswith("lmlab-"):
            inside = True
        elif inside and OVERRIDE.match(word):
            words.append(word)
    return words


def test_every_documented_command_reads_as_bash_and_hydra_read_it() -> None:
    """What a reader pastes into bash, from the README or a page of docs/, its placeholders filled in: bash
    parses every command (an unquoted ``<|`` is a stray redirection and pipe), and every override it hands an
    lmlab command parses in Hydra's grammar (``'<|endoftext|>'`` loses its quotes to the shell; Hydra needs
    them, so the docs quote the whole override again)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    commands = documented_commands()
    for path in DOCS:
        commands += [(doc_name(path), c) for c in prose_commands(path.read_text(encoding="utf-8"))]
    assert ("README.md", "lmlab-export ckpt_path=... out=DIR") in commands, "inline commands are read too"
    assert any(where.startswith("docs/") for where, _ in commands), "the pages of docs/ are read too"
    pasted = [(where, PLACEHOLDER.sub(r"\1", command)) for where, command in commands]
    syntax = subprocess.run(["bash", "-n"], input="".join(c + "\n" for _, c in pasted), capture_output=True, text=True)
    line = re.search(r"line (\d+):", syntax.stderr)
    where, shown = pasted[int(line.group(1)) - 1] if line else ("the docs", "")
    assert syntax.returncode == 0, f"bash cannot parse {where}'s `{shown}`: {syntax.stderr.strip()}"
    parser = OverridesParser.create()
    for where, command in pasted:
        for word in lmlab_overrides(command):
            try:
                parser.parse_overrides([word])
            except Exception as err:  # Hydra's parser raises its own exception types
                reason = str(err).splitlines()[0]
                pytest.fail(f"{where}'s `{command}` hands Hydra `{word}`, which it cannot parse ({reason})")


def test_rows_add_only_limits_and_offline_data() -> None:
    limits = ("trainer.max_steps=", "trainer.val_check_interval=", "trainer.limit_", "hydra.sweeper.n_trials=")
    limits += ("max_new_tokens=", "callbacks.samples.max_new_tokens=", "data.eval_batch_size=")
    sizes = ("n_embd", "n_head", "n_layer", "encoder_layers", "decoder_layers", "embedding_dim", "hidden_size")
    limits += tuple(f"model.{size}=" for size in sizes)
    for command, row in ROWS.items():
        for addition in shlex.split(row.add):
            assert addition.startswith(limits), f"'{addition}' (for {command}) is not a limiting override"


@pytest.mark.slow
@pytest.mark.parametrize("section", list(SECTIONS))
def test_docs_section_runs_as_written(section: str, tmp_path: Path, offline_copies: Path) -> None:
    if section in INPUTS:
        INPUTS[section](tmp_path)
    if section in BEFORE:
        run_command(BEFORE[section], tmp_path)
    previous_ckpt, skipped = None, []
    for command in SECTIONS[section]:
        row = ROWS[command]
        reason = _cannot_run(row)
        if reason:
            skipped.append(f"{command}: {reason}")
            continue
        typed = _without_install(command) if command.startswith("pip install") else command
        typed = with_additions(fill_placeholders(typed, tmp_path, previous_ckpt), row, offline_copies)
        started = time.time()
        done = run_command(typed, tmp_path)
        previous_ckpt = re.search(r"ckpt_path=(\S+)", typed).group(1) if "ckpt_path=" in typed else previous_ckpt
        check_outcome(typed, done, tmp_path, started)
    if skipped and len(skipped) == len(SECTIONS[section]):
        pytest.skip("; ".join(skipped))


def check_outcome(typed: str, done: subprocess.CompletedProcess, cwd: Path, started: float) -> None:
    """What the docs say each kind of command leaves behind."""
    if "lmlab-train" in typed:  # a run (or every job of a sweep) saved its last checkpoint just now
        saved = [p for p in cwd.glob("logs/**/checkpoints/last.ckpt") if p.stat().st_mtime >= started]
        assert saved, f"{typed}: no checkpoint saved"
    if "lmlab-generate" in typed:
        assert done.stdout.strip(), f"{typed}: no text printed"
        if "prompt.txt" in typed:
            assert done.stdout.startswith((cwd / "prompt.txt").read_text(encoding="utf-8").rstrip("\n"))
        if "prompt='def f(x)" in typed:
            assert done.stdout.startswith("def f(x): return x, 'é'")
        if "echo" in typed:
            assert done.stdout.startswith("def f(x):")
    if "output=predictions.jsonl" in typed:
        assert len((cwd / "predictions.jsonl").read_text().splitlines()) == 5
    if "> test.hyp" in typed:
        assert len((cwd / "test.hyp").read_text(encoding="utf-8").splitlines()) == 10
    if "lmlab-average" in typed:
        assert (cwd / "averaged.ckpt").is_file()
    if "-m " in typed or "hparams_search=" in typed:
        assert list(cwd.glob("logs/*/multiruns/*/summary.csv")), f"{typed}: no sweep summary"
