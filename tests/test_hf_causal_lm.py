"""model=hf_causal_lm: a pretrained Hugging Face causal LM fine-tuned on the LM task, on tiny randomly
initialised GPT-2, Llama and Qwen2 models saved into a folder with a tokenizer trained here (no download).

Fine-tuning lowers validation perplexity below the model's own (``train=false``) baseline; the checkpoint
loads and samples without the folder; generation through the model's cache equals recomputing the whole
text each step; lmlab-export writes the fine-tuned model back as its architecture; a tokenizer that does
not belong to the model and a context longer than its positions are refused, naming the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import QUIET, compose_cfg, save_tiny_causal_lm
from lmlab.errors import ConfigError
from lmlab.export import export
from lmlab.inference.generation import generate
from lmlab.run.checkpoint import load_language_model
from lmlab.tokenizers import train_bpe
from lmlab.train import train

# one worker runs this module's tests, which share its trained fixtures
pytestmark = pytest.mark.xdist_group("hf_causal_lm")

transformers = pytest.importorskip("transformers")

LINES = [f"the {a} cat sat on the {b} mat." for a in ("red", "big", "old") for b in ("blue", "flat")]
EOS, PAD = "<|endoftext|>", "<pad>"
TINY = {"hidden": 32, "layers": 2, "heads": 4, "positions": 64}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_corpus(tmp_path_factory.mktemp("hf_causal_lm"))


def make_corpus(root: Path) -> dict:
    """A learnable text in ``root``, and a tokenizer trained on it saved as a pretrained one (``tokenizer.json``)."""
    text = root / "learnable.txt"
    text.write_text("\n".join(LINES * 60) + "\n", encoding="utf-8")
    tokenizer = train_bpe([text.read_text()], vocab_size=300)
    folder = root / "tokenizer"
    folder.mkdir()
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    return {"root": root, "text": text, "tokenizer": folder, "vocab": tokenizer.vocab_size, "eos": tokenizer.eos_id}


def _overrides(corpus: dict, model: Path, *extra: str) -> list[str]:
    return [
        "data=text_files",
        f"data.source.train_files={corpus['text']}",
        "data.source.test_fraction=0.1",
        "data.block_size=32",
        "data.batch_size=8",
        "model=hf_causal_lm",
        f"model.name_or_path={model}",
        "tokenizer=pretrained",
        f"tokenizer.name_or_path={corpus['tokenizer']}",
        f"tokenizer.eos_token='{EOS}'",
        f"tokenizer.pad_token='{PAD}'",
        "trainer.max_steps=60",
        "trainer.val_check_interval=30",
        "trainer.limit_val_batches=4",
        "trainer.limit_test_batches=4",
        "optimizer.lr=3e-3",
        "callbacks.samples=null",
        *QUIET,
        *extra,
    ]


def _run(corpus: dict, model: Path, name: str, *extra: str) -> dict:
    run_dir = corpus["root"] / "runs" / name
    train(compose_cfg(corpus["root"], _overrides(corpus, model, *extra), run_dir=run_dir))
    return json.loads((run_dir / "metrics.json").read_text()) | {"run_dir": run_dir}


@pytest.fixture(scope="module")
def runs(corpus: dict) -> dict[str, dict]:
    """For each family: its baseline (``train=false``) and a fine-tuning run, on the same data."""
    found = {}
    for family, rows in (("gpt2", corpus["vocab"]), ("llama", corpus["vocab"]), ("qwen2", corpus["vocab"] + 20)):
        folder = save_tiny_causal_lm(corpus["root"] / "models" / family, family, rows, corpus["eos"])
        found[family] = {
            "folder": folder,
            "baseline": _run(corpus, folder, f"{family}_baseline", "train=false"),
            "tuned": _run(corpus, folder, f"{family}_tuned"),
        }
    return found


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_fine_tuning_lowers_perplexity_below_the_pretrained_baseline(family: str, runs: dict) -> None:
    baseline, tuned = runs[family]["baseline"]["metrics"], runs[family]["tuned"]["metrics"]
    assert {"val/ppl", "test/ppl"} <= baseline.keys(), "train=false reports the model as it is"
    assert baseline["val/ppl"] > 100, "an untrained model is near-uniform over the 300 tokens"
    assert tuned["val/ppl"] < 0.2 * baseline["val/ppl"] and tuned["test/ppl"] < 0.2 * baseline["test/ppl"]


def test_checkpoint_loads_and_samples_without_the_pretrained_folder(runs: dict, tmp_path: Path) -> None:
    run = runs["llama"]
    ckpt = run["tuned"]["run_dir"] / "checkpoints" / "last.ckpt"
    model, _ = load_language_model(ckpt)
    ids = torch.tensor([model.tokenizer.encode("the old cat sat on")])
    with torch.no_grad():
        before = model.net.eval()(ids)[0]
    moved = tmp_path / "moved"
    shutil.move(run["folder"], moved)
    try:
        again, _ = load_language_model(ckpt)
        with torch.no_grad():
            assert torch.equal(again.net.eval()(ids)[0], before)
        text = again.generate_text("the old cat", max_new_tokens=6, temperature=0.0)[0]
        assert text.strip(), "greedy sampling continues the prompt"
    finally:
        shutil.move(moved, run["folder"])


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_generation_through_the_models_cache_equals_recomputing(family: str, runs: dict) -> None:
    ckpt = runs[family]["tuned"]["run_dir"] / "checkpoints" / "last.ckpt"
    model, _ = load_language_model(ckpt)
    net = model.net.eval()
    prompt = torch.tensor([model.tokenizer.encode("the big cat")] * 2)
    with torch.no_grad():
        cached = generate(net, prompt, 10, temperature=0.0)
        recomputed = prompt
        for _ in range(10):
            logits = net(recomputed)[0]
            recomputed = torch.cat([recomputed, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, recomputed)
    assert net(prompt)[0].size(-1) == model.tokenizer.vocab_size, "logits cut to the tokenizer's vocabulary"


def test_export_writes_the_fine_tuned_model_as_its_architecture(runs: dict, tmp_path: Path) -> None:
    ckpt = runs["qwen2"]["tuned"]["run_dir"] / "checkpoints" / "last.ckpt"
    out = export(compose_cfg(tmp_path, [f"ckpt_path={ckpt}", f"out={tmp_path / 'hf'}"], config_name="export"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    ours, _ = load_language_model(ckpt)
    ids = torch.tensor([ours.tokenizer.encode("the red cat sat")])
    with torch.no_grad():
        expected = ours.net.eval()(ids)[0]
        assert (loaded(ids).logits[..., : expected.size(-1)] - expected).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("rows", "eos", "positions", "block", "says"),
    [
        (100, 0, 64, 32, "embeds only 100"),
        (None, 5, 64, 32, "ends text with id 5"),
        (None, 0, 16, 32, "data.block_size=32 is longer than the 16 positions"),
    ],
    ids=["vocabulary", "end_of_text", "context"],
)
def test_a_model_its_data_does_not_fit_is_refused_naming_the_fix(
    rows: int | None, eos: int, positions: int, block: int, says: str, corpus: dict, tmp_path: Path
) -> None:
    folder = save_tiny_causal_lm(tmp_path / "model", "llama", rows or corpus["vocab"], eos, positions)
    cfg = compose_cfg(tmp_path, _overrides(corpus, folder, f"data.block_size={block}"))
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert says in str(err.value)
    assert str(err.value).count("\n") == 0


def test_dropout_replaces_every_probability_the_models_config_declares(corpus: dict, tmp_path: Path) -> None:
    from lmlab.models.hf_causal_lm import PretrainedCausalLM

    folder = save_tiny_causal_lm(tmp_path / "gpt2", "gpt2", corpus["vocab"], corpus["eos"])
    own = PretrainedCausalLM(corpus["vocab"], 32, str(folder), corpus["eos"]).model.config
    assert own.resid_pdrop == own.attn_pdrop == own.embd_pdrop == 0.1, "GPT2Config's defaults"
    net = PretrainedCausalLM(corpus["vocab"], 32, str(folder), corpus["eos"], dropout=0.3)
    config = net.model.config
    assert config.resid_pdrop == config.attn_pdrop == config.embd_pdrop == 0.3
    probabilities = {m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)}
    assert probabilities == {0.3}, "the layers built from the config use it"


def test_a_missing_folder_names_the_key(corpus: dict, tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, _overrides(corpus, tmp_path / "absent"))
    with pytest.raises(ConfigError, match=r"model\.name_or_path: no folder at"):
        train(cfg)
