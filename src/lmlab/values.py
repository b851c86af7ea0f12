"""Declared types and ranges of config values, checked at start-up before any data is read.

Types come from the signatures of the classes and functions the config names (``optimizer.lr=abc``
is not a number for ``torch.optim.AdamW``); ranges are declared here, once, per class (and its
subclasses) and for the entry points' own keys, so ``trainer.val_check_interval=0`` or
``temperature=-1`` fails with the key, the value and what is allowed, not a traceback an hour later
(or a run that silently does something else).
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

from lmlab.errors import ConfigError
from lmlab.tokenizers import BPE_MIN_VOCAB, WORD_MIN_VOCAB


@dataclass(frozen=True)
class Range:
    """A number of ``kind`` within the given bounds; ``also`` lists special values (such as -1 for "no
    limit"); ``None`` passes (the key's own default decides)."""

    kind: type = float
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple[Any, ...] = ()

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is out of range, or ``None``."""
        if value is None or value in self.also and not isinstance(value, bool):
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be {self.describe()}"
        if self.kind is int and not (isinstance(value, int) or float(value).is_integer()):
            return f"must be {self.describe()}"
        ok = (
            math.isfinite(value)
            and (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        return None if ok else f"must be {self.describe()}"

    def describe(self) -> str:
        bounds = [
            f"{op} {_num(v)}"
            for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if v is not None
        ]
        text = f"{'an integer' if self.kind is int else 'a number'} {' and '.join(bounds)}".strip()
        if self.also:
            text += f" (or {', '.join(map(repr, self.also))})"
        return text


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


POSITIVE_INT = Range(int, ge=1)
COUNT = Range(int, ge=0)
FRACTION = Range(float, ge=0, lt=1)  # dropout, label smoothing, held-out shares
PROBABILITY = Range(float, ge=0, le=1)

#: the Transformer part settings of GPT, the Transformer classifier and the seq2seq Transformer
TRANSFORMER_PARTS: dict[str, Range] = {
    "n_kv_head": POSITIVE_INT,
    "mlp_hidden": POSITIVE_INT,
    "mlp_multiple_of": POSITIVE_INT,
    "rope_theta": Range(float, gt=0),
    "norm_eps": Range(float, gt=0),
}

#: ranges per class or function (by its defining module, so aliases and subclasses share them)
TARGET_RANGES: dict[str, dict[str, Range]] = {
    "torch.optim.optimizer.Optimizer": {
        "lr": Range(gt=0),
        "weight_decay": Range(ge=0),
        "momentum": Range(ge=0, lt=1),
        "eps": Range(gt=0),
    },
    "lightning.pytorch.trainer.trainer.Trainer": {
        "max_steps": Range(int, ge=1, also=(-1,)),
        "max_epochs": Range(int, ge=1, also=(-1,)),
        "min_steps": COUNT,
        "val_check_interval": Range(gt=0),
        "check_val_every_n_epoch": POSITIVE_INT,
        "limit_train_batches": Range(gt=0),
        "limit_val_batches": Range(ge=0),
        "limit_test_batches": Range(ge=0),
        "num_sanity_val_steps": Range(int, ge=0, also=(-1,)),
        "log_every_n_steps": POSITIVE_INT,
        "accumulate_grad_batches": POSITIVE_INT,
        "gradient_clip_val": Range(ge=0),
        "num_nodes": POSITIVE_INT,
    },
    "lmlab.data.base.TaskDataModule": {
        "batch_size": POSITIVE_INT,
        "eval_batch_size": POSITIVE_INT,
        "num_workers": COUNT,
    },
    "lmlab.data.lm.LanguageModelData": {"block_size": POSITIVE_INT},
    "lmlab.data.lm.LMDataModule": {"num_proc": POSITIVE_INT, "shard_tokens": POSITIVE_INT},
    "lmlab.data.instructions.InstructionDataModule": {
        "max_prompt_length": POSITIVE_INT,
        "bucket_batches": POSITIVE_INT,
    },
    "lmlab.data.classification.ClassificationDataModule": {"max_length": POSITIVE_INT, "bucket_batches": POSITIVE_INT},
    "lmlab.data.translation.TranslationDataModule": {
        "max_source_length": Range(int, ge=2),
        "max_target_length": Range(int, ge=2),
        "max_tokens": POSITIVE_INT,
        "bucket_batches": POSITIVE_INT,
    },
    "lmlab.data.text_sources.TextSource": {"val_fraction": FRACTION, "test_fraction": FRACTION},
    "lmlab.data.tables.TableSource": {"val_fraction": FRACTION, "test_fraction": FRACTION},
    "lmlab.tokenizers.train_bpe": {
        "vocab_size": Range(int, ge=BPE_MIN_VOCAB),
        "min_frequency": POSITIVE_INT,
        "train_max_chars": POSITIVE_INT,
    },
    "lmlab.tokenizers.train_word": {
        "vocab_size": Range(int, ge=WORD_MIN_VOCAB),
        "min_frequency": POSITIVE_INT,
        "train_max_chars": POSITIVE_INT,
    },
    "lmlab.models.gpt.GPT": {
        "block_size": POSITIVE_INT,
        "n_layer": POSITIVE_INT,
        "n_head": POSITIVE_INT,
        "n_embd": POSITIVE_INT,
        "dropout": FRACTION,
        **TRANSFORMER_PARTS,
    },
    "lmlab.models.rnn.RecurrentLM": {
        "n_embd": POSITIVE_INT,
        "hidden_size": POSITIVE_INT,
        "n_layer": POSITIVE_INT,
        "dropout": FRACTION,
    },
    "lmlab.models.classifiers.RNNClassifier": {
        "hidden_size": POSITIVE_INT,
        "n_layer": POSITIVE_INT,
        "dropout": FRACTION,
    },
    "lmlab.models.classifiers.TextCNN": {"n_filters": POSITIVE_INT, "dropout": FRACTION},
    "lmlab.models.classifiers.TransformerClassifier": {
        "n_layer": POSITIVE_INT,
        "n_head": POSITIVE_INT,
        "n_embd": POSITIVE_INT,
        "dropout": FRACTION,
        **TRANSFORMER_PARTS,
    },
    "lmlab.models.classifiers.BagOfNGrams": {"ngrams": POSITIVE_INT, "buckets": POSITIVE_INT, "dropout": FRACTION},
    "lmlab.models.classifiers.HFEncoderClassifier": {"dropout": FRACTION},
    "lmlab.models.hf_causal_lm.PretrainedCausalLM": {"dropout": FRACTION},
    "lmlab.models.from_checkpoint.CheckpointLM": {"dropout": FRACTION},
    "lmlab.models.seq2seq.RecurrentSeq2Seq": {
        "embedding_dim": POSITIVE_INT,
        "hidden_size": POSITIVE_INT,
        "encoder_layers": POSITIVE_INT,
        "decoder_layers": POSITIVE_INT,
        "dropout": FRACTION,
    },
    "lmlab.models.seq2seq.TransformerSeq2Seq": {
        "n_embd": POSITIVE_INT,
        "n_head": POSITIVE_INT,
        "encoder_layers": POSITIVE_INT,
        "decoder_layers": POSITIVE_INT,
        "dropout": FRACTION,
        "max_positions": POSITIVE_INT,
        **TRANSFORMER_PARTS,
    },
    "lmlab.schedulers.warmup_decay": {"warmup_steps": COUNT, "min_lr_ratio": PROBABILITY, "decay_steps": POSITIVE_INT},
    "lmlab.schedulers.plateau": {"factor": Range(gt=0, lt=1), "patience": COUNT, "min_lr": Range(ge=0)},
    "lmlab.tasks.base.TaskModule": {"finite_check_every_n_steps": COUNT},
    "lmlab.tasks.classification.ClassificationTask": {"label_smoothing": FRACTION},
    "lmlab.tasks.translation.TranslationTask": {"label_smoothing": FRACTION, "decode_every_n_epochs": COUNT},
    "lmlab.callbacks.GenerateSamples": {
        "max_new_tokens": POSITIVE_INT,
        "temperature": Range(ge=0),
        "top_k": COUNT,
        "top_p": Range(gt=0, le=1),
    },
    "lmlab.callbacks.PeriodicCheckpoint": {"every_minutes": Range(gt=0), "check_every_n_steps": POSITIVE_INT},
    "lightning.pytorch.callbacks.early_stopping.EarlyStopping": {"patience": COUNT, "min_delta": Range(ge=0)},
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint": {
        "save_top_k": Range(int, ge=-1),
        "every_n_train_steps": COUNT,
    },
}

#: ranges of the entry points' own top-level keys (lmlab-generate, -predict, -translate, -eval)
TOP_LEVEL_RANGES: dict[str, Range] = {
    "max_new_tokens": POSITIVE_INT,
    "temperature": Range(ge=0),
    "top_k": COUNT,
    "top_p": Range(gt=0, le=1),
    "num_samples": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "beam_size": POSITIVE_INT,
    "length_penalty": Range(),
    "max_length_ratio": Range(gt=0),
    "max_length_offset": COUNT,
    "seed": Range(int),
}


def check_top_level(cfg: Mapping[str, Any]) -> None:
    for key, rule in TOP_LEVEL_RANGES.items():
        if key in cfg:
            _report(key, cfg[key], rule.problem(cfg[key]))


def check_target_values(target: Any, values: Mapping[str, Any], path: str) -> None:
    """Check the plain values given to ``target`` against its signature's types and the declared ranges."""
    rules = _ranges_of(target)
    hints = _hints(target)
    for key, value in values.items():
        if isinstance(value, Mapping | list | tuple) or key.startswith("_"):
            continue
        full = f"{path}.{key}" if path else key
        if key in hints and not _matches(value, hints[key]):
            _report(full, value, f"must be {_describe(hints[key])}")
        if key in rules:
            _report(full, value, rules[key].problem(value))


def _report(key: str, value: Any, problem: str | None) -> None:
    if problem:
        raise ConfigError(f"Invalid value {key}={value!r}: it {problem}.")


def _ranges_of(target: Any) -> dict[str, Range]:
    chain = target.__mro__ if inspect.isclass(target) else (target,)
    rules: dict[str, Range] = {}
    for obj in reversed(chain):
        rules.update(TARGET_RANGES.get(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}", {}))
    return rules


def _hints(target: Any) -> dict[str, Any]:
    """Parameter annotations of ``target`` that resolve (others are not checked), the fields of a
    ``**kwargs: Unpack[SomeTypedDict]`` among them."""
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # annotations naming what cannot be resolved here: leave the types unchecked
        return {}
    return {**hints, **(typed_keywords(fn) or {})}


def typed_keywords(fn: Any) -> dict[str, Any] | None:
    """The keywords and types that ``fn``'s ``**kwargs: Unpack[SomeTypedDict]`` declares (PEP 692), ``None``
    when its ``**kwargs`` (if any) are not so typed."""
    var_keyword = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.VAR_KEYWORD]
    if not var_keyword:
        return None
    try:
        hint = typing.get_type_hints(fn).get(var_keyword[0])
    except Exception:  # unresolvable annotations: untyped, as if absent
        return None
    if typing.get_origin(hint) is not typing.Unpack:
        return None
    return typing.get_type_hints(typing.get_args(hint)[0])


def _options(hint: Any) -> list[Any]:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return [o for arg in typing.get_args(hint) for o in _options(arg)]
    return [hint]


def _matches(value: Any, hint: Any) -> bool:
    """Whether a config value can be what ``hint`` asks for; anything this cannot judge passes."""
    for option in _options(hint):
        if option is Any or isinstance(option, typing.TypeVar | str):
            return True
        origin = typing.get_origin(option)
        if origin is Literal:
            if value in typing.get_args(option):
                return True
            continue
        if origin is not None or not isinstance(option, type):
            return True  # containers, callables, generics: not judged here
        if _is_instance(value, option):
            return True
    return False


def _is_instance(value: Any, option: type) -> bool:
    if isinstance(value, bool):
        return option is bool
    if option is float:
        return isinstance(value, int | float)
    return isinstance(value, option)


def _describe(hint: Any) -> str:
    names, literals = [], []
    for option in _options(hint):
        if typing.get_origin(option) is Literal:
            literals += [repr(a) for a in typing.get_args(option)]
        elif option is type(None):
            names.append("null")
        else:
            names.append(
                {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
                    option, getattr(option, "__name__", str(option))
                )
            )
    if literals:
        names.insert(0, "one of " + ", ".join(dict.fromkeys(literals)))
    return " or ".join(dict.fromkeys(names))
