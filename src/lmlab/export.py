"""``lmlab-export ckpt_path=... out=DIR``: a trained model's checkpoint as a Hugging Face folder.

``transformers`` loads the folder with ``AutoModelForCausalLM.from_pretrained(DIR)`` (a fine-tuned
encoder-decoder, ``model=hf_seq2seq``: ``AutoModelForSeq2SeqLM``) and ``AutoTokenizer.from_pretrained(DIR)``:
safetensors weights, the architecture's config, the generation config, the tokenizer files and a model card
(``README.md``) that records the training config, the data, the metrics and the command of the run.

lmlab's GPT maps onto two architectures, by its part choices: LayerNorm, GELU MLP and learned positions
are GPT-2's (``GPT2LMHeadModel``); RMSNorm, SwiGLU and rotary positions are Llama's (``LlamaForCausalLM``,
grouped-query attention included). A fine-tuned pretrained model (``model=hf_causal_lm``, ``hf_seq2seq``)
is written as the architecture it is, LoRA adapters merged. A fine-tuned encoder classifier (``model=hf_encoder``)
is written as its encoder (``AutoModel``, adapters merged, the labels in its config) and its head
(``classifier.safetensors``): ``transformers``' classification heads pool differently, so the model card shows
the few lines that compute the logits. Other combinations, and the recurrent models,
have no equivalent and are refused with what would map. The export checks itself: the exported model's
logits must equal lmlab's on the same ids (``check_atol``), and the exported tokenizer must give lmlab's ids,
before the folder is left in place.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from lmlab.config.schema import validate_config
from lmlab.data.chat_format import ChatFormat
from lmlab.errors import ChatTemplateError, ConfigError, ExportError
from lmlab.models.classifiers import HFEncoderClassifier
from lmlab.models.gpt import GPT
from lmlab.models.hf_causal_lm import PretrainedCausalLM
from lmlab.models.lora import merged
from lmlab.models.mlp import SwiGLU
from lmlab.models.seq2seq import PretrainedSeq2Seq
from lmlab.run.checkpoint import load_language_model
from lmlab.run.runtime import user_errors
from lmlab.run.safe_output import check_folder, replacing_folder
from lmlab.tokenizers import CharTokenizer, HFTokenizer, Tokenizer

log = logging.getLogger("lmlab")

#: what a refused chat template (:func:`checked_chat_template`) leaves the user to do
UNSAFE_TEMPLATE_FIX = (
    "lmlab-export hands no such template on, so it wrote nothing: train with a tokenizer folder whose chat template "
    "works (or that has none) to export the model."
)
#: the file of an exported classifier's head (its linear layer's weight and bias)
HEAD = "classifier.safetensors"

#: the part choices of GPT that each Hugging Face architecture has
FAMILIES = {
    "gpt2": {"norm": "layernorm", "mlp": "gelu", "position": "learned"},
    "llama": {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope"},
}


def gpt_choices(net: GPT) -> dict[str, Any]:
    """The part choices ``net`` was built with, read from its modules (so a network built in code exports too)."""
    block = net.blocks[0]
    attn = block.attn
    return {
        "norm": "rmsnorm" if isinstance(net.ln_f, nn.RMSNorm) else "layernorm",
        "mlp": "swiglu" if isinstance(block.mlp, SwiGLU) else "gelu",
        "position": net.position,
        "n_layer": len(net.blocks),
        "n_head": attn.n_head,
        "n_kv_head": attn.n_kv_head,
        "n_embd": net.wte.embedding_dim,
        "vocab_size": net.wte.num_embeddings,
        "mlp_hidden": block.mlp.output.in_features,
        "bias": attn.proj.bias is not None,
        "norm_eps": net.ln_f.eps,
        "tie_weights": net.lm_head.weight is net.wte.weight,
        "rope_theta": attn.rotary.theta if attn.rotary is not None else None,
    }


def family_of(net: nn.Module) -> str:
    """The Hugging Face architecture ``net`` maps onto; an :class:`ExportError` saying what maps if none."""
    if not isinstance(net, GPT):
        raise ExportError(
            f"{type(net).__name__} has no Hugging Face causal-LM equivalent: lmlab-export writes model=gpt "
            "(GPT-2's or Llama's parts), model=llama and model=hf_causal_lm checkpoints."
        )
    choices = gpt_choices(net)
    for family, parts in FAMILIES.items():
        if all(choices[key] == value for key, value in parts.items()):
            return family

    def spelled(parts: Mapping[str, Any]) -> str:
        return " ".join(f"model.{key}={value}" for key, value in parts.items())

    names = {"gpt2": "GPT-2", "llama": "Llama"}
    maps = "; ".join(f"{names[family]}: {spelled(parts)}" for family, parts in FAMILIES.items())
    given = spelled({key: choices[key] for key in FAMILIES["gpt2"]})
    raise ExportError(
        f"This GPT's parts ({given}) are no Hugging Face architecture's ({maps}). Train with one of these to export."
    )


def _special_ids(tokenizer: Tokenizer | None) -> dict[str, int | None]:
    eos = getattr(tokenizer, "eos_id", None)
    return {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": getattr(tokenizer, "pad_id", None)}


def hf_config(net: GPT, tokenizer: Tokenizer | None) -> Any:
    """The ``transformers`` config of ``net``'s architecture, with ``net``'s sizes and special token ids."""
    from transformers import GPT2Config, LlamaConfig

    c = gpt_choices(net)
    common = {"vocab_size": c["vocab_size"], "tie_word_embeddings": c["tie_weights"], **_special_ids(tokenizer)}
    if family_of(net) == "gpt2":
        return GPT2Config(
            n_positions=net.block_size,
            n_embd=c["n_embd"],
            n_layer=c["n_layer"],
            n_head=c["n_head"],
            n_inner=c["mlp_hidden"],
            activation_function="gelu",  # exact GELU, as torch's F.gelu (GPT-2's own is the tanh approximation)
            layer_norm_epsilon=c["norm_eps"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    return LlamaConfig(
        hidden_size=c["n_embd"],
        intermediate_size=c["mlp_hidden"],
        num_hidden_layers=c["n_layer"],
        num_attention_heads=c["n_head"],
        num_key_value_heads=c["n_kv_head"],
        head_dim=c["n_embd"] // c["n_head"],
        max_position_embeddings=net.block_size,
        rms_norm_eps=c["norm_eps"],
        rope_theta=c["rope_theta"],
        attention_bias=c["bias"],
        mlp_bias=c["bias"],
        hidden_act="silu",
        **common,
    )


def hf_model(net: nn.Module, tokenizer: Tokenizer | None) -> tuple[Any, str]:
    """``net`` as a ``transformers`` model and its architecture's name: a fine-tuned pretrained model is one
    already; lmlab's GPT is mapped onto GPT-2 or Llama."""
    if isinstance(net, PretrainedCausalLM):
        hf = merged(net.model)  # LoRA adapters folded into the weights they adapt
        return hf, str(hf.config.model_type)
    family = family_of(net)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(hf_config(net, tokenizer))
    missing, unexpected = hf.load_state_dict(hf_state_dict(net), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ExportError(f"The {family} layout does not fit: missing {missing}, unexpected {unexpected}.")
    return hf, family


def hf_state_dict(net: GPT) -> dict[str, torch.Tensor]:
    """``net``'s weights under the names (and, for GPT-2's ``Conv1D`` layers, the layout) of its architecture;
    a part without bias (``model.bias=false``) gets zeros where GPT-2 always has one."""
    family = family_of(net)
    out: dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor | None, like: torch.Tensor | None = None) -> None:
        if tensor is None and like is not None:
            tensor = torch.zeros(like.size(0) if like.dim() > 1 else like.numel(), dtype=like.dtype)
        if tensor is not None:
            out[name] = tensor.detach().clone().contiguous()

    if family == "gpt2":
        put("transformer.wte.weight", net.wte.weight)
        put("transformer.wpe.weight", net.wpe.weight)
        for i, block in enumerate(net.blocks):
            p = f"transformer.h.{i}."
            for ours, theirs in ((block.ln_1, "ln_1"), (block.ln_2, "ln_2")):
                put(p + theirs + ".weight", ours.weight)
                put(p + theirs + ".bias", ours.bias, ours.weight)
            for linear, theirs in (
                (block.attn.qkv, "attn.c_attn"),
                (block.attn.proj, "attn.c_proj"),
                (block.mlp.fc, "mlp.c_fc"),
                (block.mlp.proj, "mlp.c_proj"),
            ):
                put(p + theirs + ".weight", linear.weight.t())
                put(p + theirs + ".bias", linear.bias, linear.weight)
        put("transformer.ln_f.weight", net.ln_f.weight)
        put("transformer.ln_f.bias", net.ln_f.bias, net.ln_f.weight)
    else:
        put("model.embed_tokens.weight", net.wte.weight)
        for i, block in enumerate(net.blocks):
            p = f"model.layers.{i}."
            put(p + "input_layernorm.weight", block.ln_1.weight)
            put(p + "post_attention_layernorm.weight", block.ln_2.weight)
            attn = block.attn
            for part, theirs in zip(attn.qkv.weight.split(attn.sizes), ("q_proj", "k_proj", "v_proj"), strict=True):
                put(p + f"self_attn.{theirs}.weight", part)
            if attn.qkv.bias is not None:
                for part, theirs in zip(attn.qkv.bias.split(attn.sizes), ("q_proj", "k_proj", "v_proj"), strict=True):
                    put(p + f"self_attn.{theirs}.bias", part)
            put(p + "self_attn.o_proj.weight", attn.proj.weight)
            put(p + "self_attn.o_proj.bias", attn.proj.bias)
            for ours, theirs in (
                (block.mlp.gate, "gate_proj"),
                (block.mlp.up, "up_proj"),
                (block.mlp.down, "down_proj"),
            ):
                put(p + f"mlp.{theirs}.weight", ours.weight)
                put(p + f"mlp.{theirs}.bias", ours.bias)
        put("model.norm.weight", net.ln_f.weight)
    put("lm_head.weight", net.lm_head.weight)
    return out


def hf_backend(tokenizer: Tokenizer) -> Any:
    """A Hugging Face ``tokenizers`` backend that gives ``tokenizer``'s ids: the tokenizer's own for word,
    BPE and pretrained tokenizers; for characters, one vocabulary entry per character, each character its
    own piece, and the unknown symbol for characters outside the vocabulary."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFBackend

    if isinstance(tokenizer, HFTokenizer):
        return HFBackend.from_str(tokenizer.backend.to_str())
    if isinstance(tokenizer, CharTokenizer):
        unk = CharTokenizer.UNK if tokenizer.unk else None
        backend = HFBackend(models.WordLevel(vocab=dict(tokenizer.stoi), unk_token=unk))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        return backend
    raise ExportError(f"A {type(tokenizer).__name__} has no Hugging Face tokenizer equivalent.")


def _tokenizer_config(tokenizer: Tokenizer, block_size: int) -> dict[str, Any]:
    specials = {
        "eos_token": getattr(tokenizer, "eos_token", None),
        "pad_token": getattr(tokenizer, "pad_token", None),
        "unk_token": getattr(tokenizer, "unk_token", None)
        or (CharTokenizer.UNK if getattr(tokenizer, "unk", False) else None),
    }
    template = checked_chat_template(tokenizer)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,
        **{k: v for k, v in specials.items() if v is not None},
        **({"chat_template": template} if template is not None else {}),
    }


def checked_chat_template(tokenizer: Tokenizer) -> str | None:
    """The tokenizer's chat template, if any, once it compiles in Jinja's sandbox and writes a short conversation
    within the render limits (:meth:`lmlab.data.chat_format.ChatFormat.check`); a :class:`ChatTemplateError` otherwise.

    Such a template is refused, and the export writes nothing, rather than copied with a warning: the folder is
    made to be loaded elsewhere, by people who never see this run's log, and ``apply_chat_template`` renders a
    template in the sandbox but without limits. A broken one is refused too: it would fail in their hands.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    try:
        chat = ChatFormat.for_tokenizer(tokenizer)
        chat.check()
    except ChatTemplateError as err:
        raise ChatTemplateError(err.problem, UNSAFE_TEMPLATE_FIX) from None
    return chat.template


def write_tokenizer(tokenizer: Tokenizer, out: Path, block_size: int) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` for ``AutoTokenizer.from_pretrained(out)``."""
    hf_backend(tokenizer).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tokenizer, block_size), indent=2))


def sample_text(tokenizer: Tokenizer, n: int) -> str:
    """Text that reaches the first ``n`` vocabulary entries, for checking an exported tokenizer. The special
    tokens are left out: ``transformers`` reads their text (``</s>``) as the token itself, where the backend
    alone may split it, and text seldom holds them."""
    if isinstance(tokenizer, CharTokenizer):
        return "".join(tokenizer.chars[:n])
    specials = {getattr(tokenizer, f"{name}_id", None) for name in ("eos", "pad", "unk")}
    return tokenizer.decode([i for i in range(min(n, tokenizer.vocab_size)) if i not in specials])


def auto_class(folder: Path) -> str:
    """The ``transformers`` class that loads the exported ``folder``."""
    config = json.loads((folder / "config.json").read_text())
    if "lmlab_classifier" in config:
        return "AutoModel"
    return "AutoModelForSeq2SeqLM" if config.get("is_encoder_decoder", False) else "AutoModelForCausalLM"


# -- pretrained encoder classifiers ----------------------------------------------------------------------
def classifier_encoder(net: HFEncoderClassifier, labels: list[str]) -> Any:
    """The classifier's encoder, adapters folded in, its config naming the labels and how the head reads it (the
    head itself is :data:`HEAD`: ``transformers``' own classification heads pool differently)."""
    encoder = merged(net.encoder)
    encoder.config.id2label = dict(enumerate(labels))
    encoder.config.label2id = {label: i for i, label in enumerate(labels)}
    encoder.config.lmlab_classifier = {"pooling": net.pooling, "head": HEAD}
    return encoder


def reloaded_classifier(net: HFEncoderClassifier, encoder: nn.Module, folder: Path) -> HFEncoderClassifier:
    """``net`` rebuilt from what ``folder`` holds: the exported encoder and head."""
    from safetensors.torch import load_file

    reloaded = copy.deepcopy(net)
    reloaded.encoder = encoder
    reloaded.head.load_state_dict(load_file(folder / HEAD))
    return reloaded.eval()


def classifier_usage(pooling: str) -> list[str]:
    """How a user computes the classifier's logits from the exported folder."""
    pooled = (
        "pooled = hidden[:, 0]"
        if pooling == "cls"
        else 'mask = batch["attention_mask"].unsqueeze(-1)\npooled = (hidden * mask).sum(1) / mask.sum(1)'
    )
    return [
        "from safetensors.torch import load_file",
        "from transformers import AutoModel, AutoTokenizer",
        'encoder = AutoModel.from_pretrained("<this folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
        f'head = load_file("<this folder>/{HEAD}")',
        'batch = tokenizer(["a text to classify"], return_tensors="pt")',
        "hidden = encoder(**batch).last_hidden_state",
        *pooled.splitlines(),
        'logits = pooled @ head["weight"].T + head["bias"]',
        "label = encoder.config.id2label[int(logits.argmax(-1))]",
    ]


def model_card(
    ckpt_path: Path,
    family: str,
    run_config: Mapping[str, Any],
    check: Mapping[str, Any],
    auto: str,
    usage: list[str] | None = None,
) -> str:
    """``README.md`` of the folder: how to load it, and the run's command, metrics, data and config (from
    the run folder's ``metrics.json`` when the checkpoint is still in it)."""
    import yaml

    metrics_file = ckpt_path.parent.parent / "metrics.json"
    record = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    overrides = record.get("overrides")
    command = (
        "lmlab-train " + " ".join(overrides)
        if overrides is not None
        else "(not recorded: no metrics.json beside the run)"
    )
    metrics = record.get("metrics") or {}
    data = (run_config.get("data") or {}).get("source", run_config.get("data"))
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [lmlab, {_pipeline_tag(auto)}]",
        "---",
        f"# {family} {'text classifier' if usage else 'language model'} trained with lmlab",
        "",
        "```python",
        *(
            usage
            or [
                f"from transformers import {auto}, AutoTokenizer",
                f'model = {auto}.from_pretrained("<this folder>")',
                'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
            ]
        ),
        "```",
        "",
        f"Exported from `{ckpt_path.name}` by `lmlab-export`; on the same ids the exported model's logits differ "
        f"from lmlab's by at most {check['max_abs_diff']:.2e} (float32), and the tokenizer gives lmlab's ids.",
        "",
        "## Command",
        "",
        f"`{command}`",
        "",
        "## Metrics",
        "",
        *(
            [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()) if isinstance(v, int | float)]
            or ["(not recorded)"]
        ),
        "",
        "## Data",
        "",
        "```yaml",
        yaml.safe_dump(data, sort_keys=False).rstrip() if data else "(not recorded)",
        "```",
        "",
        "## Training config",
        "",
        "```yaml",
        yaml.safe_dump(dict(run_config), sort_keys=False).rstrip() if run_config else "(not recorded)",
        "```",
        "",
    ]
    if metrics:
        lines.insert(lines.index("## Metrics") + 2, "| metric | value |\n|---|---|")
    return "\n".join(lines)


def _pipeline_tag(auto: str) -> str:
    return {"AutoModel": "text-classification", "AutoModelForSeq2SeqLM": "text2text-generation"}.get(
        auto, "text-generation"
    )


def export(cfg: DictConfig) -> Path:
    """Write ``cfg.ckpt_path``'s model as a Hugging Face folder at ``cfg.out``, checked against lmlab."""
    validate_config(cfg, schema=None)
    out = check_folder(cfg.out, "out", cfg.overwrite)  # before the work, so a mistake costs nothing
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError("lmlab-export needs transformers: pip install transformers (or 'lmlab[hf]').") from None
    ckpt_path = Path(cfg.ckpt_path).expanduser()
    model, run_config = load_language_model(ckpt_path)
    net, tokenizer = getattr(model, "net", None), getattr(model, "tokenizer", None)
    if callable(getattr(net, "unwrapped", None)):
        net = net.unwrapped()  # started from another lmlab checkpoint: that network, its adapters folded in
    if isinstance(net, PretrainedSeq2Seq):
        tokenizer = getattr(tokenizer, "source", tokenizer)  # hf_seq2seq reads both sides with one vocabulary
        hf, family, context = merged(net.model), str(net.model.config.model_type), net.max_target_positions or 512
    elif isinstance(net, HFEncoderClassifier):
        hf, family, context = classifier_encoder(net, model.info["labels"]), str(net.encoder.config.model_type), 512
    elif hasattr(model, "generate_text") and net is not None:
        (hf, family), context = hf_model(net, tokenizer), net.block_size
    else:
        raise ExportError(
            f"'{ckpt_path}' is a {type(net).__name__} checkpoint: lmlab-export writes language models, "
            "pretrained encoder-decoders (model=hf_seq2seq) and pretrained encoder classifiers (model=hf_encoder)."
        )
    if tokenizer is None:
        raise ExportError(f"'{ckpt_path}' holds no tokenizer, so its folder could not encode text.")
    # written beside ``out`` and swapped in once checked: a failed export leaves no folder to mistake for one
    with replacing_folder(out, "out", cfg.overwrite, "lmlab-export", checkpoint=str(ckpt_path)) as staging:
        hf.save_pretrained(staging, safe_serialization=True)
        if isinstance(net, HFEncoderClassifier):
            from safetensors.torch import save_file

            save_file({k: v.detach().float().contiguous() for k, v in net.head.state_dict().items()}, staging / HEAD)
        write_tokenizer(tokenizer, staging, context)
        ids = check_tokenizer(tokenizer, staging)
        check = check_logits(net, staging, ids[:context] or [0], float(cfg.check_atol))
        usage = classifier_usage(net.pooling) if isinstance(net, HFEncoderClassifier) else None
        card = model_card(ckpt_path, family, run_config, check, auto_class(staging), usage)
        (staging / "README.md").write_text(card)
    log.info("exported %s as %s (max |logit difference| %.2e)", ckpt_path, family, check["max_abs_diff"])
    return out


def check_tokenizer(tokenizer: Tokenizer, folder: Path) -> list[int]:
    """The ids of a sample of the vocabulary, which ``folder``'s tokenizer, loaded as a user would, must give
    as lmlab's does; an :class:`ExportError` where it does not."""
    from transformers import AutoTokenizer

    text = sample_text(tokenizer, 256)
    ours = tokenizer.encode(text)
    theirs = AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False, verbose=False)["input_ids"]
    if theirs != ours:
        first = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs))
        )
        raise ExportError(f"The exported tokenizer gives other ids than lmlab's (first difference at token {first}).")
    return ours


def check_logits(net: nn.Module, folder: Path, ids: list[int], atol: float) -> dict[str, Any]:
    """Both models' float32 logits on ``ids`` (an encoder-decoder: ``ids`` as the source and as the target
    read so far), loaded from ``folder`` as a user would; an :class:`ExportError` past ``atol``."""
    import transformers

    seq2seq = isinstance(net, PretrainedSeq2Seq)
    auto = getattr(transformers, auto_class(folder))
    hf = auto.from_pretrained(folder, dtype=torch.float32).eval()
    batch = torch.tensor([ids])
    was_training = net.training
    net.eval()
    with torch.no_grad():
        if isinstance(net, HFEncoderClassifier):
            lengths = torch.tensor([len(ids)])
            expected = net.float()(batch, lengths)
            got = reloaded_classifier(net, hf, folder)(batch, lengths)
        elif seq2seq:
            expected = net.float()(batch, torch.tensor([len(ids)]), batch)
            start = torch.full_like(batch[:, :1], net.start_id)  # how the network begins every target
            got = hf(input_ids=batch, decoder_input_ids=torch.cat([start, batch[:, 1:]], dim=1)).logits
        else:
            expected = net.float()(batch)[0]
            got = hf(batch).logits
    net.train(was_training)
    got = got[..., : expected.size(-1)]  # a pretrained model's table may pad past the vocabulary
    diff = float((expected - got).abs().max())
    if not diff <= atol:
        raise ExportError(
            f"The exported model's logits differ from lmlab's by {diff:.3g} (check_atol={atol}): this transformers "
            "version computes the architecture differently. Nothing was written."
        )
    return {"max_abs_diff": diff, "tokens": len(ids)}


def run(cfg: DictConfig) -> None:
    with user_errors():
        out = export(cfg)
    print(f"exported: {out}")
    print(f'load it: {auto_class(out)}.from_pretrained("{out}"), AutoTokenizer.from_pretrained("{out}")')


if __name__ == "__main__":
    from lmlab.cli import export_model

    export_model()
