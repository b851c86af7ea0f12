"""``model=from_checkpoint``: a language model lmlab trained, fine-tuned on other data, with LoRA adapters
(through peft) or whole. A character GPT pretrained on one text is adapted to another: validation perplexity
on the new text falls below the checkpoint's own, its weights stay as they were, the run's checkpoints hold
the adapters only and load (for sampling and export) from the base checkpoint; a tokenizer or a context that
does not fit the checkpoint is refused, naming the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import QUIET, compose_cfg
from lmlab.errors import ConfigError
from lmlab.run.checkpoint import load_language_model
from lmlab.train import train

# one worker runs this module's tests, which share its trained fixtures
pytestmark = pytest.mark.xdist_group("from_checkpoint")

pytest.importorskip("peft")

PRETRAIN = "the red cat sat on the blue mat.\nthe big cat ran to the old mat.\n" * 150
TUNE = "a dog lay on a flat rug.\na dog ate a red bone.\n" * 150
LORA = ["model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0"]


def _run(root: Path, name: str, text: Path, *extra: str) -> dict:
    run_dir = root / name
    overrides = [
        "data=text_files",
        f"data.source.train_files={text}",
        "data.source.test_fraction=0.0",
        "test=false",
        "data.block_size=32",
        "data.batch_size=16",
        "trainer.val_check_interval=50",
        "trainer.limit_val_batches=4",
        "optimizer.lr=3e-3",
        "callbacks.samples=null",
        *QUIET,
        *extra,
    ]
    train(compose_cfg(root, overrides, run_dir=run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    return {"ppl": metrics["val/ppl"], "ckpt": run_dir / "checkpoints" / "last.ckpt"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("from_checkpoint")
    pretrain, tune = root / "pretrain.txt", root / "tune.txt"
    pretrain.write_text(PRETRAIN, encoding="utf-8")
    tune.write_text(TUNE, encoding="utf-8")
    model = ["tokenizer=char", "model.n_layer=2", "model.n_head=2", "model.n_embd=32"]
    base = _run(root, "base", pretrain, *model, "trainer.max_steps=150")
    start = ["model=from_checkpoint", "tokenizer=from_checkpoint", f"model.ckpt_path={base['ckpt']}"]
    return {
        "root": root,
        "tune": tune,
        "base": base,
        "start": start,
        "before": _run(root, "before", tune, *start, "train=false"),
        "lora": _run(root, "lora", tune, *start, *LORA, "trainer.max_steps=100"),
        "whole": _run(root, "whole", tune, *start, "trainer.max_steps=100"),
    }


def test_adapters_and_whole_fine_tuning_lower_the_checkpoints_perplexity_on_new_text(runs: dict) -> None:
    assert runs["lora"]["ppl"] < 0.8 * runs["before"]["ppl"], (runs["lora"], runs["before"])
    assert runs["whole"]["ppl"] < runs["lora"]["ppl"], "every weight learns more than rank-4 updates"


def test_the_checkpoint_holds_the_adapters_and_samples_and_exports_from_the_base(runs: dict, tmp_path: Path) -> None:
    tuned = torch.load(runs["lora"]["ckpt"], weights_only=True)
    assert tuned["state_dict"] and all("lora_" in key for key in tuned["state_dict"])
    assert len(torch.load(runs["whole"]["ckpt"], weights_only=True)["state_dict"]) > len(tuned["state_dict"])
    model, _ = load_language_model(runs["lora"]["ckpt"])
    base, _ = load_language_model(runs["base"]["ckpt"])
    adapted = model.net.net.get_base_model()
    for name, tensor in base.net.state_dict().items():
        key = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        found = adapted.state_dict().get(key, adapted.state_dict().get(name))
        assert torch.equal(found, tensor), f"{name} changed"
    assert len(model.generate_text("a dog", max_new_tokens=8, temperature=0.0)[0]) == 8, "one character a token"
    pytest.importorskip("transformers")
    from lmlab.export import export

    out = export(compose_cfg(tmp_path, [f"ckpt_path={runs['lora']['ckpt']}", f"out={tmp_path / 'hf'}"], "export"))
    assert (out / "model.safetensors").is_file(), "written as GPT-2, adapters folded in and checked"


def test_a_tokenizer_or_context_that_does_not_fit_the_checkpoint_is_refused(runs: dict) -> None:
    other_tokenizer = [o for o in runs["start"] if not o.startswith("tokenizer=")] + ["tokenizer=bpe"]
    with pytest.raises(ConfigError, match="not the one .* was trained with. Read the checkpoint's ids: tokenizer=from"):
        _run(runs["root"], "other_tokenizer", runs["tune"], *other_tokenizer, "train=false", "tokenizer.vocab_size=300")
    with pytest.raises(ConfigError, match="data.block_size=64 is longer than the 32 tokens"):
        _run(runs["root"], "long", runs["tune"], *runs["start"], "train=false", "data.block_size=64")


def test_dropout_replaces_every_probability_of_the_checkpoints_network() -> None:
    from conftest import tiny_lm_checkpoint
    from lmlab.run.from_checkpoint import CheckpointLM

    net = CheckpointLM(13, 16, str(tiny_lm_checkpoint()), dropout=0.3)
    layers = [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    read_by_attention = [m.dropout for m in net.modules() if isinstance(getattr(m, "dropout", None), float)]
    assert layers and read_by_attention and set(layers) == set(read_by_attention) == {0.3}
