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
from typing import TYPE_CHECKING, Any, Literal, Union

from lmlab.errors import ConfigError
from lmlab.tokenizers import BPE_MIN_VOCAB, WORD_MIN_VOCAB

if TYPE_CHECKING:
    from lmlab.config.signatures import Signature


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
    "lmlab.run.from_checkpoint.CheckpointLM": {"dropout": FRACTION},
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
    "lmlab.training.schedulers.warmup_decay": {
        "warmup_steps": COUNT,
        "min_lr_ratio": PROBABILITY,
        "decay_steps": POSITIVE_INT,
    },
    "lmlab.training.schedulers.plateau": {"factor": Range(gt=0, lt=1), "patience": COUNT, "min_lr": Range(ge=0)},
    "lmlab.tasks.base.TaskModule": {"finite_check_every_n_steps": COUNT},
    "lmlab.tasks.classification.ClassificationTask": {"label_smoothing": FRACTION},
    "lmlab.tasks.translation.TranslationTask": {"label_smoothing": FRACTION, "decode_every_n_epochs": COUNT},
    "lmlab.training.callbacks.GenerateSamples": {
        "max_new_tokens": POSITIVE_INT,
        "temperature": Range(ge=0),
        "top_k": COUNT,
        "top_p": Range(gt=0, le=1),
    },
    "lmlab.training.callbacks.PeriodicCheckpoint": {"every_minutes": Range(gt=0), "check_every_n_steps": POSITIVE_INT},
    "lmlab.training.progress.TextProgress": {"every_n_steps": POSITIVE_INT, "every_seconds": Range(gt=0)},
    "lmlab.training.monitoring.GradientMonitor": {"every_n_steps": POSITIVE_INT, "norm_type": Range(gt=0)},
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


def check_target_values(signature: Signature, values: Mapping[str, Any], path: str) -> None:
    """Check the plain values given to a target against its signature's types and the declared ranges."""
    for key, value in values.items():
        if isinstance(value, Mapping | list | tuple) or key.startswith("_"):
            continue
        full = f"{path}.{key}" if path else key
        if key in signature.types and not spec_matches(value, signature.types[key]):
            _report(full, value, f"must be {describe_spec(signature.types[key])}")
        if key in signature.ranges:
            _report(full, value, signature.ranges[key].problem(value))


def _report(key: str, value: Any, problem: str | None) -> None:
    if problem:
        raise ConfigError(f"Invalid value {key}={value!r}: it {problem}.")


def ranges_of(target: Any) -> dict[str, Range]:
    """The ranges declared for ``target`` and the classes it derives from (its own declarations win)."""
    chain = target.__mro__ if inspect.isclass(target) else (target,)
    rules: dict[str, Range] = {}
    for obj in reversed(chain):
        rules.update(TARGET_RANGES.get(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}", {}))
    return rules


def type_specs(target: Any) -> dict[str, TypeSpec]:
    """The judgeable types of ``target``'s parameters whose annotations resolve (others are not checked), the
    fields of a ``**kwargs: Unpack[SomeTypedDict]`` among them."""
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # annotations naming what cannot be resolved here: leave the types unchecked
        return {}
    hints = {**hints, **(typed_keywords(fn) or {})}
    specs = {name: type_spec(hint) for name, hint in hints.items() if name != "return"}
    return {name: spec for name, spec in specs.items() if spec is not None}


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


#: what a config value can be checked against: the plain types a YAML value takes, and literal choices
TypeOption = str | tuple[Any, ...]
#: the options a parameter accepts: each a plain type's name (``int``, ``float``, ``str``, ``bool``, ``null``) or
#: ``("literal", value, ...)``; ``None`` (no spec) where any value may fit (containers, callables, generics)
TypeSpec = tuple[TypeOption, ...]
_PLAIN = {int: "int", float: "float", str: "str", bool: "bool", type(None): "null"}


def _options(hint: Any) -> list[Any]:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return [o for arg in typing.get_args(hint) for o in _options(arg)]
    return [hint]


def type_spec(hint: Any) -> TypeSpec | None:
    """``hint`` as plain options a config value is checked against (a form that can be saved as JSON), or
    ``None`` when some option cannot be judged from a config value (then every value passes)."""
    spec: list[TypeOption] = []
    for option in _options(hint):
        if typing.get_origin(option) is Literal:
            spec.append(("literal", *typing.get_args(option)))
        elif option in _PLAIN:
            spec.append(_PLAIN[option])
        elif isinstance(option, type) and typing.get_origin(option) is None and option not in (Any, object):
            spec.append(option.__name__)  # a class no config value is (a Tensor, a Path): named in the message
        else:
            return None  # Any, a TypeVar, a container, a callable: not judged here
    return tuple(spec)


def spec_matches(value: Any, spec: TypeSpec) -> bool:
    """Whether a config value can be what ``spec`` asks for."""
    for option in spec:
        if isinstance(option, tuple):
            if value in option[1:]:
                return True
        elif _is_plain(value, option):
            return True
    return False


def _is_plain(value: Any, option: str) -> bool:
    if isinstance(value, bool):
        return option == "bool"
    if option == "float":
        return isinstance(value, int | float)
    plain = {"int": int, "str": str, "null": type(None)}.get(option)
    if plain is None:  # a class: a str names a path (``Path``) or a value the class parses, so it passes
        return option == "Path" and isinstance(value, str)
    return isinstance(value, plain)


def describe_spec(spec: TypeSpec) -> str:
    names, literals = [], []
    for option in spec:
        if isinstance(option, tuple):
            literals += [repr(a) for a in option[1:]]
        else:
            names.append(
                {
                    "int": "an integer",
                    "float": "a number",
                    "str": "a string",
                    "bool": "true or false",
                    "null": "null",
                }.get(option, option)
            )
    if literals:
        names.insert(0, "one of " + ", ".join(dict.fromkeys(literals)))
    return " or ".join(dict.fromkeys(names))
