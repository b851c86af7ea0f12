"""LoRA through peft on the pretrained models (``model.lora.r > 0``), on tiny randomly initialised models
saved into a folder (no download).

Fine-tuning adapters lowers validation perplexity while the pretrained weights stay bit-for-bit as they
were; the trainable parameters are exactly the adapters' closed form (``r * (fan_in + fan_out)`` per adapted
layer) and the run reports them; the checkpoint rebuilds the adapted model; lmlab-export folds the adapters
into the weights and the merged model gives the adapted model's logits; target modules that match nothing
are refused with the layer names that exist."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import compose_cfg, save_tiny_causal_lm
from lmlab.errors import CheckpointMismatchError, ConfigError
from lmlab.export import export
from lmlab.models.classifiers import HFEncoderClassifier
from lmlab.models.hf_causal_lm import PretrainedCausalLM
from lmlab.models.lora import parameter_counts
from lmlab.run.checkpoint import load_language_model
from lmlab.train import train
from test_hf_causal_lm import _overrides, make_corpus

# one worker runs this module's tests, which share its trained fixtures
pytestmark = pytest.mark.xdist_group("lora")

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ALL_LINEAR = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
LORA = ["model.lora.r=8", "model.lora.alpha=16", "model.lora.dropout=0.0", f"model.lora.target_modules={ALL_LINEAR}"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama, its baseline, and a LoRA fine-tuning run of it."""
    corpus = make_corpus(tmp_path_factory.mktemp("lora"))
    root = corpus["root"]
    folder = save_tiny_causal_lm(root / "llama", "llama", corpus["vocab"], corpus["eos"])
    found = {"corpus": corpus, "folder": folder, "vocab": corpus["vocab"], "eos": corpus["eos"]}
    for name, extra in (("baseline", ["train=false"]), ("lora", [*LORA, "optimizer.lr=1e-2"])):
        run_dir = root / "runs" / name
        train(compose_cfg(root, _overrides(corpus, folder, *extra), run_dir=run_dir))
        found[name] = json.loads((run_dir / "metrics.json").read_text())["metrics"]
        found[f"{name}_ckpt"] = run_dir / "checkpoints" / "last.ckpt"
    return found


def test_adapters_lower_perplexity_and_leave_the_pretrained_weights_as_they_were(tuned: dict) -> None:
    # frozen random embeddings bound what adapters alone can learn: full fine-tuning goes below 0.2x
    assert tuned["lora"]["val/ppl"] < 0.7 * tuned["baseline"]["val/ppl"], (tuned["lora"], tuned["baseline"])
    model, _ = load_language_model(tuned["lora_ckpt"])
    pretrained = transformers.AutoModelForCausalLM.from_pretrained(tuned["folder"]).state_dict()
    adapted = model.net.model.get_base_model()
    changed = 0
    for name, tensor in adapted.state_dict().items():
        if "lora_" in name:
            changed += int(name.endswith("lora_B.default.weight") and bool(tensor.abs().sum() > 0))
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(tensor, pretrained[original]), f"{original} changed"
    assert changed == 7 * 2, "every adapter (the seven linear layers of both blocks) learned"


def test_a_checkpoint_holds_the_adapters_and_reads_the_pretrained_weights_again(tuned: dict, tmp_path: Path) -> None:
    adapters_only = torch.load(tuned["lora_ckpt"], weights_only=True)
    assert adapters_only["state_dict"] and all("lora_" in key for key in adapters_only["state_dict"])
    assert "hf_config" not in adapters_only["hyper_parameters"]["model"], "the architecture comes from the folder"
    # the same run keeping the whole model: the same weights, and the pretrained ones besides
    corpus, root = tuned["corpus"], tmp_path
    extra = [*LORA, "optimizer.lr=1e-2", "model.lora.save_base_weights=true"]
    train(compose_cfg(root, _overrides(corpus, tuned["folder"], *extra), run_dir=root / "whole"))
    whole = root / "whole" / "checkpoints" / "last.ckpt"
    kept = set(torch.load(whole, weights_only=True)["state_dict"])
    left_out = kept - set(adapters_only["state_dict"])
    assert left_out and len(left_out) == adapters_only["lmlab"]["base_left_out"]["tensors"]
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        logits = [load_language_model(path)[0].net.eval()(ids)[0] for path in (tuned["lora_ckpt"], whole)]
    assert torch.allclose(logits[0], logits[1], atol=1e-6)


def test_adapters_are_refused_on_other_pretrained_weights(tuned: dict, tmp_path: Path) -> None:
    corpus = tuned["corpus"]
    folder = shutil.copytree(tuned["folder"], tmp_path / "llama")
    run_dir = tmp_path / "run"
    train(compose_cfg(tmp_path, _overrides(corpus, folder, *LORA, "trainer.max_steps=4"), run_dir=run_dir))
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    torch.manual_seed(1)
    other = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(folder))
    other.save_pretrained(folder)
    message = f"trained on other pretrained weights than those of model.name_or_path='{folder}'"
    with pytest.raises(CheckpointMismatchError, match=message):
        load_language_model(checkpoint)


def test_a_lora_run_resumes_from_its_adapters(tuned: dict, tmp_path: Path) -> None:
    corpus, folder = tuned["corpus"], tuned["folder"]
    first = tmp_path / "first"
    train(compose_cfg(tmp_path, _overrides(corpus, folder, *LORA, "trainer.max_steps=6"), run_dir=first))
    checkpoint = first / "checkpoints" / "last.ckpt"
    resumed = tmp_path / "resumed"
    extra = [*LORA, "trainer.max_steps=10", f"ckpt_path={checkpoint}"]
    train(compose_cfg(tmp_path, _overrides(corpus, folder, *extra), run_dir=resumed))
    again = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert again["global_step"] == 10 and all("lora_" in key for key in again["state_dict"])


def test_trainable_parameters_are_the_adapters_closed_form(tuned: dict) -> None:
    net = PretrainedCausalLM(tuned["vocab"], 32, str(tuned["folder"]), tuned["eos"], lora={"r": 4})
    trainable, total = parameter_counts(net)
    hidden, kv, layers = 32, 16, 2  # q: 32 -> 32, v: 32 -> 2 heads of 8; peft's default targets for Llama
    assert trainable == layers * 4 * ((hidden + hidden) + (hidden + kv))
    plain = PretrainedCausalLM(tuned["vocab"], 32, str(tuned["folder"]), tuned["eos"])
    assert total == sum(p.numel() for p in plain.parameters()) + trainable


def test_merged_export_gives_the_adapted_models_logits(tuned: dict, tmp_path: Path) -> None:
    model, _ = load_language_model(tuned["lora_ckpt"])
    ids = torch.tensor([model.tokenizer.encode("the old cat sat on the")])
    with torch.no_grad():
        adapted = model.net.eval()(ids)[0]
    out = export(compose_cfg(tmp_path, [f"ckpt_path={tuned['lora_ckpt']}", f"out={tmp_path / 'hf'}"], "export"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name in loaded.state_dict()), "the adapters are folded in"
    with torch.no_grad():
        assert (loaded(ids).logits[..., : adapted.size(-1)] - adapted).abs().max() < 1e-4


def test_target_modules_that_match_nothing_name_the_layers_that_exist(tuned: dict) -> None:
    with pytest.raises(ConfigError) as err:
        PretrainedCausalLM(tuned["vocab"], 32, str(tuned["folder"]), lora={"r": 4, "target_modules": ["qkv"]})
    message = str(err.value)
    assert "model.lora.target_modules=['qkv'] matches no layer of model=hf_causal_lm" in message
    assert "q_proj, up_proj, v_proj" in message and "\n" not in message


def test_an_encoder_classifier_adapts_its_encoder_and_trains_its_head(tmp_path: Path) -> None:
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    transformers.AutoModel.from_config(config).save_pretrained(tmp_path / "bert")
    net = HFEncoderClassifier(3, str(tmp_path / "bert"), lora={"r": 2})
    trainable, _ = parameter_counts(net)
    head = 32 * 3 + 3
    assert trainable == head + 2 * 2 * 2 * (32 + 32), "query and value of both layers, and the head"
    assert all(not p.requires_grad for n, p in net.named_parameters() if "lora_" not in n and "head" not in n)
