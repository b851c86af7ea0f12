"""Shared fixtures: composing configs like the CLI does, small learnable text, the shared data sets."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from lmlab.config.schema import config_dir

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# the signatures the start-up checks record (lmlab.config.signatures) go to a folder of this test session, shared by its
# commands, not to the user's cache
_SIGNATURES = tempfile.mkdtemp(prefix="lmlab-signatures-")
atexit.register(shutil.rmtree, _SIGNATURES, ignore_errors=True)
os.environ.setdefault("LMLAB_CACHE_HOME", _SIGNATURES)
# One thread for torch here and in the commands the tests start: the networks are tiny, and tests run side by side
# (pytest -n auto, commands started together): threads that wait for each other on a shared core make a recurrent
# network's many small steps tens of times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Run in parallel, the tests of a module marked ``xdist_group`` (its tests share a trained module fixture) go
    to one worker, every other test to whichever worker is free, in the order collected. pytest-xdist's own
    ``--dist loadgroup`` reads the mark by rewriting node ids, which this pytest's node ids no longer allow."""
    from xdist.scheduler import LoadScopeScheduling

    tests = Path(__file__).parent
    grouped = {f"tests/{path.name}" for path in tests.glob("test_*.py") if "mark.xdist_group(" in path.read_text()}

    class ModulesSharingFixtures(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in grouped else nodeid

    config.option.loadscopereorder = False  # the order collected
    return ModulesSharingFixtures(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked slow first: run in parallel, the long ones start together at once rather than finishing
    the run alone at its end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``name`` that ``build`` fills once per test run, shared by every worker of a parallel run (the
    others wait for the one building it)."""
    from filelock import FileLock

    base = factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = root / "built_once" / name, root / "built_once" / f"{name}.done"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


# A training run in tests prints no progress bars, summaries or config and skips the sanity check.
QUIET = [
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.rich_progress_bar=null",
    "callbacks.text_progress=null",
    "callbacks.rich_model_summary=null",
    "print_config=false",
]
# Fast settings for a language-modeling run in tests: tiny model, few steps.
FAST = [
    "trainer.max_steps=20",
    "trainer.val_check_interval=10",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    *QUIET,
    "data.block_size=32",
    "data.batch_size=8",
    "model.n_layer=1",
]


#: the shared copy of each hub data option's data set: its folder under ``../shared/data`` and its splits' files
HUB_COPIES = {
    "wikitext2": ("wikitext-2", ["train", "validation", "test"]),
    "hub_text": ("wikitext-2", ["train"]),
    "imdb": ("imdb", ["train", "test"]),
    "sst2": ("sst2", ["train", "validation"]),
    "multi30k": ("multi30k", ["train", "validation", "test"]),
}


def offline_data(option: str, root: Path = SHARED_DATA, splits: Sequence[str] | None = None) -> str:
    """The documented offline form of a hub data option (overrides, quoted for a shell), reading the copies of its
    splits (or of ``splits``) under ``root``: the shared data, or a folder laid out the same way."""
    folder, names = HUB_COPIES[option]
    names = list(splits or names)
    files = ", ".join(f"{name}: {root.resolve() / folder / name}.parquet" for name in names)
    return f"data.source.path=parquet data.source.name=null 'data.source.data_files={{{files}}}'"


def write_slices(root: Path, rows: Mapping[str, int]) -> None:
    """Under ``root``, in the layout of ``../shared/data``, ``rows[folder]`` rows of each split of every hub data
    option's shared copy (:data:`HUB_COPIES`), spread over the split so that every label is there: what the offline
    form of a hub data option reads where a test needs its format, not its size."""
    import pyarrow.parquet as pq

    for folder, name in {(folder, name) for folder, names in HUB_COPIES.values() for name in names}:
        (root / folder).mkdir(parents=True, exist_ok=True)
        table = pq.read_table(SHARED_DATA / folder / f"{name}.parquet")
        pq.write_table(spread_rows(table, rows[folder]), root / folder / f"{name}.parquet")


def spread_rows(table: Any, rows: int) -> Any:
    """``rows`` rows of an Arrow table, spread evenly over it (a split sorted by label keeps every label)."""
    step = max(len(table) // rows, 1)
    return table.take(list(range(0, len(table), step))[:rows])


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present beside this checkout")
    return SHARED_DATA.resolve()


@pytest.fixture
def learnable_text(tmp_path: Path) -> Path:
    """A small text with strong regularities that any of the models can learn in a few steps."""
    lines = [f"the {a} cat sat on the {b} mat." for a in ("red", "big", "old") for b in ("blue", "flat")]
    path = tmp_path / "learnable.txt"
    path.write_text("\n".join(lines * 120) + "\n", encoding="utf-8")
    return path


def compose_cfg(
    root: Path, overrides: Sequence[str] = (), config_name: str = "train", run_dir: Path | None = None
) -> DictConfig:
    """Compose a config as the CLI would, with Hydra's runtime set so ``${hydra:...}`` resolves, and every
    output (logs, cache) under ``root``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            config_name=config_name, overrides=[f"paths.root_dir={root}", *overrides], return_hydra_config=True
        )
    out = Path(run_dir or root / "run")
    out.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.runtime.cwd = str(root)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """:func:`compose_cfg` under this test's ``tmp_path``."""

    def _make(overrides: Sequence[str] = (), config_name: str = "train", run_dir: Path | None = None) -> DictConfig:
        return compose_cfg(tmp_path, overrides, config_name, run_dir)

    yield _make
    GlobalHydra.instance().clear()


#: the words that give away each label of :func:`write_labeled`'s texts
CUES = {
    "food": ["soup", "bread", "cheese"],
    "sports": ["goal", "match", "race"],
    "tech": ["chip", "code", "laptop"],
    "weather": ["rain", "snow"],
    "neg": ["awful", "boring"],
    "pos": ["great", "lovely"],
}


def write_labeled(path: Path, n: int, seed: int, labels: tuple[str, ...] = ("food", "sports", "tech")) -> Path:
    """A JSON-lines file of texts whose label is given away by one cue word among random filler words."""
    import json
    import random

    filler = "the a of and to in it is was for on with as at by this that from".split()
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = [rng.choice(filler) for _ in range(rng.randint(3, 30))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(CUES[label]))
        rows.append(json.dumps({"text": " ".join(words), "label": label}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def labeled_dir(tmp_path: Path) -> Path:
    """train/val/test JSON-lines files of a small, learnable three-class text classification set."""
    folder = tmp_path / "labeled"
    folder.mkdir()
    for split, n, seed in (("train", 600, 0), ("val", 90, 1), ("test", 90, 2)):
        write_labeled(folder / f"{split}.jsonl", n, seed)
    return folder


def cls_overrides(folder: Path, *extra: str) -> list[str]:
    """A fast offline classification run on :func:`labeled_dir`'s files."""
    return [
        "task=classification",
        "data=labeled_files",
        f"data.source.train_files={folder / 'train.jsonl'}",
        f"data.source.val_files={folder / 'val.jsonl'}",
        f"data.source.test_files={folder / 'test.jsonl'}",
        "data.batch_size=16",
        "data.max_length=40",
        "trainer.max_steps=60",
        "trainer.val_check_interval=30",
        *QUIET,
        "optimizer.lr=3e-3",
        "scheduler.warmup_steps=5",
        *extra,
    ]


#: a toy "English -> German" lexicon: translating a sentence maps each word and reverses the order
LEXICON = {
    "one": "eins",
    "two": "zwei",
    "three": "drei",
    "four": "vier",
    "five": "fuenf",
    "six": "sechs",
    "red": "rot",
    "blue": "blau",
    "cat": "katze",
    "dog": "hund",
}


def toy_translation(sentence: str) -> str:
    return " ".join(LEXICON[w] for w in reversed(sentence.split()))


def save_tiny_seq2seq(folder: Path, family: str = "t5", vocab_size: int = 32, words: Sequence[str] = ()) -> Path:
    """A randomly initialised Hugging Face encoder-decoder saved as a pretrained folder (padding id 0, end id 1),
    with a word-level tokenizer.json over ``words`` (after ``<pad> </s> <unk>``) when given: a stand-in for a
    hub model that works offline. ``t5``: relative positions, decoding starts from the padding id; ``bart``:
    learned positions, decoding starts from the end id."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import AutoModelForSeq2SeqLM, BartConfig, T5Config

    ids = {"pad_token_id": 0, "eos_token_id": 1}
    if family == "t5":
        config = T5Config(
            vocab_size=vocab_size,
            d_model=64,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            d_kv=16,
            dropout_rate=0.0,
            decoder_start_token_id=0,
            **ids,
        )
    else:
        config = BartConfig(
            vocab_size=vocab_size,
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            bos_token_id=2,
            decoder_start_token_id=1,
            forced_eos_token_id=None,
            **ids,
        )
    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(folder)
    if words:
        vocab = {token: i for i, token in enumerate(["<pad>", "</s>", "<unk>", *words])}
        tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
        tokenizer.pre_tokenizer = Whitespace()
        tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@functools.cache
def toy_seq2seq_folder(family: str = "t5", vocab_size: int = 32, toy_words: bool = True) -> Path:
    """:func:`save_tiny_seq2seq`, by default with a tokenizer over the toy lexicon's words; built once per
    session in a temporary folder."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    folder = Path(tempfile.mkdtemp(prefix=f"lmlab-tiny-{family}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    words = sorted({*LEXICON, *LEXICON.values()}) if toy_words else ()
    return save_tiny_seq2seq(folder, family, vocab_size, words)


def save_tiny_causal_lm(folder: Path, family: str, vocab_size: int, eos_id: int, positions: int = 64) -> Path:
    """A randomly initialised ``family`` causal LM (``gpt2``, ``llama``, ``qwen2``) with ``vocab_size`` embedding
    rows, saved as a hub model is."""
    import torch
    import transformers

    sizes = {"vocab_size": vocab_size, "eos_token_id": eos_id, "bos_token_id": eos_id}
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=positions, **sizes)
    else:
        config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
        config = config_class(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=positions,
            tie_word_embeddings=family == "qwen2",
            **sizes,
        )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@functools.cache
def tiny_lm_checkpoint() -> Path:
    """The checkpoint of an untrained one-layer GPT (context 16) with a character tokenizer of 13 ids (``a``-``l``
    and the unknown symbol): the start of a ``model=from_checkpoint`` run; built once per session."""
    import torch

    from lmlab.tasks.lm import LanguageModelingTask
    from lmlab.tokenizers import tokenizer_from_state

    folder = Path(tempfile.mkdtemp(prefix="lmlab-tiny-lm-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    tokenizer = tokenizer_from_state({"kind": "char", "chars": list("abcdefghijkl"), "unk": True})
    info = {"vocab_size": tokenizer.vocab_size, "block_size": 16, "tokenizer_fingerprint": tokenizer.fingerprint()}
    model = {"_target_": "lmlab.models.GPT", "n_layer": 1, "n_head": 2, "n_embd": 16}
    task = LanguageModelingTask(model=model, data_info=info, tokenizer_state=tokenizer.state())
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, folder / "tiny_gpt.ckpt")
    return folder / "tiny_gpt.ckpt"


#: a chat template in the form Hugging Face tokenizers save them
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@functools.cache
def toy_chat_lm_folder() -> Path:
    """A tiny Qwen2 with a BPE tokenizer over :data:`EXCHANGES` (end token ``<|endoftext|>``) and
    :data:`CHAT_TEMPLATE` beside it, as a pretrained chat model is saved; built once per session."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    from lmlab.tokenizers import train_bpe

    folder = Path(tempfile.mkdtemp(prefix="lmlab-tiny-chat-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    tokenizer = train_bpe([f"{p} {r}\n" for p, r in EXCHANGES.items()] * 50, vocab_size=300)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return save_tiny_causal_lm(folder, "qwen2", tokenizer.vocab_size, tokenizer.eos_id)


def pretrained_seq2seq_overrides() -> list[str]:
    """Overrides that fine-tune :func:`toy_seq2seq_folder`'s model with its own tokenizer."""
    folder = toy_seq2seq_folder()
    return [
        "model=hf_seq2seq",
        f"model.name_or_path={folder}",
        "tokenizer=pretrained",
        f"tokenizer.name_or_path={folder}",
        "tokenizer.eos_token='</s>'",
        "tokenizer.pad_token='<pad>'",
        "tokenizer.unk_token='<unk>'",
    ]


#: prompt/response pairs a tiny model learns to answer (instruction tuning)
EXCHANGES = {"hi": "hello there", "bye": "see you", "who are you?": "a tiny model"}


def write_exchanges(path: Path, repeats: int = 1, **columns: str) -> Path:
    """The exchanges as JSON lines, under the column names ``columns`` gives (prompt and response by default)."""
    import json

    names = {"prompt": "prompt", "response": "response", **columns}
    rows = [{names["prompt"]: p, names["response"]: r} for p, r in EXCHANGES.items()] * repeats
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_pairs(path: Path, n: int, seed: int, min_words: int = 2, max_words: int = 6) -> Path:
    """A JSON-lines file of sentence pairs (columns ``en``, ``de``) of the toy transduction above."""
    import json
    import random

    rng = random.Random(seed)
    words = sorted(LEXICON)
    rows = []
    for _ in range(n):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words)))
        rows.append(json.dumps({"en": sentence, "de": toy_translation(sentence)}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def write_pair_splits(folder: Path) -> Path:
    """train/val/test JSON-lines files of the toy translation task in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 2000, 0), ("val", 60, 1), ("test", 60, 2)):
        write_pairs(folder / f"{split}.jsonl", n, seed)
    return folder


@pytest.fixture
def pairs_dir(tmp_path: Path) -> Path:
    return write_pair_splits(tmp_path / "pairs")


def mt_overrides(folder: Path, *extra: str) -> list[str]:
    """A fast offline translation run on :func:`pairs_dir`'s files with a tiny Transformer."""
    return [
        "task=translation",
        "data=translation_files",
        f"data.source.train_files={folder / 'train.jsonl'}",
        f"data.source.val_files={folder / 'val.jsonl'}",
        f"data.source.test_files={folder / 'test.jsonl'}",
        "data.max_tokens=512",
        "data.max_source_length=24",
        "data.max_target_length=24",
        "tokenizer.vocab_size=400",  # whole words: byte-level BPE keeps 258 ids for bytes and specials
        "trainer.max_steps=40",
        "trainer.val_check_interval=20",
        *QUIET,
        "optimizer.lr=3e-3",
        "scheduler=cosine",
        "scheduler.warmup_steps=10",
        *extra,
    ]


# -- console scripts: each command starts a fresh interpreter (seconds of imports), so independent commands
# run at the same time.
class Command:
    """A console command started in ``cwd`` as a user would type it; output goes to files beside it, and its
    input comes from the file ``stdin`` (none: this process's)."""

    def __init__(
        self, args: list[str], cwd: Path, name: str, env: dict[str, str] | None = None, stdin: Path | None = None
    ) -> None:
        base = {k: v for k, v in os.environ.items() if k != "LMLAB_ROOT"}
        env = {
            **base,
            "WANDB_MODE": "offline",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "COLUMNS": "200",
            **(env or {}),
        }
        self.cwd, self.out_path, self.err_path = cwd, cwd / f"{name}.stdout", cwd / f"{name}.stderr"
        with (
            self.out_path.open("w") as out,
            self.err_path.open("w") as err,
            stdin.open() if stdin else contextlib.nullcontext() as given,
        ):
            self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=given, stdout=out, stderr=err, text=True)
        self.returncode: int | None = None

    def wait(self, timeout: float = 300) -> Command:
        if self.returncode is None:
            try:
                self.returncode = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
            self.stdout, self.stderr = self.out_path.read_text(), self.err_path.read_text()
        return self


def script(name: str) -> str:
    """The path of a console script installed beside this interpreter (or on PATH)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or pytest.fail(f"console script {name} not found"))
