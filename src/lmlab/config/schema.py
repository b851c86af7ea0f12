"""Where the config tree lives, and the start-up checks that catch config typos early.

Two checks run before any work starts:

* the top level of the composed config is merged into :class:`TrainSchema`, so an unknown
  top-level key or a wrongly typed value fails at once;
* every node with a ``_target_`` is checked against the signature of the class or function it
  names, so ``model.n_layr=4`` fails with the list of valid keys instead of an hour later.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmlab import registry
from lmlab.config.signatures import Signature, accepted_keys, locate, signature
from lmlab.errors import ConfigError

if TYPE_CHECKING:
    from hydra._internal.config_repository import ConfigRepository

_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def config_dir() -> str:
    """The ``conf/`` tree: packaged inside a wheel, or at the repository root for a clone."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "conf", package.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise ConfigError(f"lmlab's config tree was not found next to {package}; reinstall the package.")


@dataclass
class TrainSchema:
    """The keys allowed at the top level of a training config."""

    task_name: str = "train"
    tags: list[str] = field(default_factory=list)
    seed: int | None = 1337
    train: bool = True
    test: bool = True
    compile: bool = False
    ckpt_path: str | None = None
    optimized_metric: str | None = None
    print_config: bool = True
    task: Any = None
    data: Any = None
    tokenizer: Any = None
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    trainer: Any = None
    callbacks: Any = None
    logger: Any = None
    paths: Any = None


def validate_config(cfg: DictConfig, schema: type | None = TrainSchema, before_imports: bool = False) -> None:
    """Fail fast on unknown keys, missing values and bad values anywhere in ``cfg``.

    ``before_imports``: check what can be checked without importing the config's targets (the entry points do
    this first, before torch and Lightning load): every target whose signature was recorded by an earlier run
    (:mod:`lmlab.config.signatures`), but not which task a model or data option belongs to. Otherwise every check runs
    on the targets themselves, and their signatures are recorded for the next run.
    """
    from lmlab.config import signatures
    from lmlab.config.values import check_top_level

    if schema is not None:
        try:
            OmegaConf.merge(OmegaConf.structured(schema), cfg)
        except OmegaConfBaseException as err:
            # err.msg also holds "full_key: ..." and "object_type=..." lines: keep one line, name the key
            reason = str(err.msg).splitlines()[0] if err.msg else type(err).__name__
            raise ConfigError(
                f"Invalid config key '{err.full_key}': {reason}. Check the key's spelling and type."
            ) from None
        if not before_imports:
            check_task_data(cfg)
            check_task_model(cfg)
    check_missing(cfg)
    try:
        check_targets(cfg, signature_of=signatures.recorded if before_imports else signature)
    finally:
        if not before_imports:  # every target's, also when a value was refused: the next run refuses it sooner
            signatures.save(_targets(cfg))
    check_top_level(cfg)


def _targets(node: Any) -> list[str]:
    """The ``_target_`` names anywhere below ``node``."""
    if isinstance(node, ListConfig):
        return [name for item in node for name in _targets(item)]
    if not isinstance(node, DictConfig):
        return []
    found = [str(node._get_node("_target_")._value())] if "_target_" in node else []
    for key in node.keys():
        if key not in _HYDRA_KEYS:
            found += _targets(node._get_node(key))
    return found


def check_task_data(cfg: DictConfig) -> None:
    """The data option must build the data module the task reads (``TaskModule.data_module``)."""
    wanted, given = _located(cfg, "task.module._target_", "data_module"), _located(cfg, "data._target_")
    if not isinstance(wanted, type) or not isinstance(given, type) or issubclass(given, wanted):
        return
    task_target, data_target = OmegaConf.select(cfg, "task.module._target_"), OmegaConf.select(cfg, "data._target_")
    options = [name for name, target in data_options().items() if _is_subclass_of(target, wanted)]
    raise ConfigError(
        f"data={_choice('data') or data_target} is data for another task: task={_choice('task') or task_target} "
        f"reads {wanted.__name__} data. Pick one of data={'|'.join(options)}."
    )


def check_task_model(cfg: DictConfig) -> None:
    """A model that another task lists (``task.models``), or a network of another kind than the task trains
    (``TaskModule.network``: a language model, a classifier, an encoder-decoder), is refused before any work,
    naming the task's model options."""
    model, listed = _choice("model"), list(OmegaConf.select(cfg, "task.models") or [])
    task = _choice("task") or OmegaConf.select(cfg, "task.module._target_")
    pick = f"Pick one of model={'|'.join(listed)}"
    if model and model not in listed:
        owners = [name for name, models in task_models().items() if model in models]
        if owners:
            raise ConfigError(f"model={model} is a model for task={owners[0]}, not task={task}. {pick}.")
    task_cls, data_cls = _located(cfg, "task.module._target_"), _located(cfg, "task.module._target_", "data_module")
    if isinstance(task_cls, type) and hasattr(data_cls, "info_type"):
        data_cls.info_type.check_inputs(task_cls.network_inputs, task_cls.__name__)
    wanted, given = _located(cfg, "task.module._target_", "network"), _located(cfg, "model._target_")
    if not (isinstance(wanted, type) and isinstance(given, type)):
        return
    if not issubclass(given, wanted):
        raise ConfigError(
            f"model={model or given.__name__} is not a {wanted.__name__}, the kind of network task={task} trains "
            f"({wanted.__module__}). {pick}, or give a network that subclasses {wanted.__name__}."
        )
    accepted = accepted_keys(given)
    missing = [name for name in getattr(wanted, "required_inputs", ()) if accepted is not None and name not in accepted]
    if missing:
        raise ConfigError(
            f"model={model or given.__name__}: {given.__name__}'s constructor takes no {', '.join(missing)}, which "
            f"every {wanted.__name__} is built from (task={task} passes it from the data). Name the parameter so."
        )


def _located(cfg: DictConfig, key: str, attribute: str | None = None) -> Any:
    """The object the ``_target_`` at ``key`` names (or its ``attribute``, a dotted path too); ``None`` when it
    cannot be imported, which :func:`check_targets` reports."""
    target = OmegaConf.select(cfg, key)
    if not target:
        return None
    try:
        obj = locate(str(target))
        return locate(str(getattr(obj, attribute))) if attribute else obj
    except (ImportError, AttributeError):
        return None


def _is_subclass_of(target: str, base: type) -> bool:
    """Whether the class at the dotted path ``target`` subclasses ``base`` (not when it cannot be imported)."""
    try:
        obj = locate(target)
    except (ImportError, AttributeError):
        return False
    return isinstance(obj, type) and issubclass(obj, base)


def task_models(config_sources: Any = None) -> dict[str, list[str]]:
    """Each ``task`` option of the run's search path (lmlab's ``conf/task`` and a plugin's) and the model
    options it lists under ``task.models``. ``config_sources``: a composed config's
    ``hydra.runtime.config_sources``, for callers outside the running app (shell completion)."""
    repo = _config_repository(config_sources)
    listed = {}
    for name in repo.get_group_options("task"):
        loaded = repo.load_config(f"task/{name}")
        if loaded is not None:
            listed[name] = list(OmegaConf.select(loaded.config, "task.models") or [])
    return listed


def data_options() -> dict[str, str]:
    """Each ``data`` option of the run's search path (lmlab's ``conf/data`` and a plugin's) and the
    ``_target_`` it builds, following its defaults list."""
    return group_targets("data")


def group_targets(group: str) -> dict[str, str]:
    """Each option of ``group`` on the run's search path and the ``_target_`` it builds: its own, or that of
    the first config its defaults list names (``model=llama`` is ``model=gpt`` with other parts)."""
    from hydra.core.default_element import ConfigDefault

    repo = _config_repository()

    def target_of(name: str) -> str | None:
        loaded = repo.load_config(f"{group}/{name}")
        if loaded is None:
            return None
        if "_target_" in loaded.config:
            return str(loaded.config._target_)
        parents = [d.path for d in loaded.defaults_list if isinstance(d, ConfigDefault) and not d.is_self()]
        return target_of(str(parents[0])) if parents else None

    return {name: target for name in repo.get_group_options(group) if (target := target_of(name))}


def _config_repository(config_sources: Any = None) -> ConfigRepository:
    """Hydra's repository of the folders the running app reads configs from, in its order (the first folder
    holding an option is the one composed): lmlab's ``conf/`` and those that ``hydra.searchpath`` (a plugin's,
    on the command line or in a primary config) or a search-path plugin adds; or those of ``config_sources``
    (a composed config's ``hydra.runtime.config_sources``). Outside a Hydra app, ``conf/`` alone."""
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.plugins import Plugins

    Plugins.instance()  # discovering Hydra's plugins registers the kinds of folder (file://, pkg://)
    search_path = ConfigSearchPathImpl()
    if config_sources is None and HydraConfig.initialized():
        config_sources = HydraConfig.get().runtime.config_sources
    if config_sources is not None:
        for source in config_sources:
            search_path.append(source.provider, f"{source.schema}://{source.path}")
    else:
        search_path.append("lmlab", f"file://{config_dir()}")
    return ConfigRepository(search_path)


def _choice(group: str) -> str | None:
    """The option picked for a config group in the running Hydra app, if any."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def check_targets(node: Any, path: str = "", signature_of: Callable[[str], Signature | None] = signature) -> None:
    """Check every ``_target_`` node below ``node`` against its target's signature (``signature_of``: read from
    the target itself, or as recorded, which may know nothing of a target: then only its children are checked)."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_targets(item, f"{path}[{i}]", signature_of)
        return
    if not isinstance(node, DictConfig):
        return
    keys = [str(k) for k in node.keys()]
    if "_target_" in keys:
        target_name = str(node._get_node("_target_")._value())
        try:
            found = signature_of(target_name)
        except ImportError:
            moved = registry.current(target_name)
            fix = f"It has moved: write '{moved}'." if moved != target_name else "Check its spelling."
            raise ConfigError(f"'{path}._target_' names '{target_name}', which cannot be imported. {fix}") from None
        if found is not None:
            _check_node(node, keys, path, target_name, found)
    for key in keys:
        if key in _HYDRA_KEYS:
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig | ListConfig):
            check_targets(child, _join(path, key), signature_of)


def _check_node(node: DictConfig, keys: list[str], path: str, target_name: str, found: Signature) -> None:
    from lmlab.config.values import check_target_values

    if found.accepted is not None:
        for key in keys:
            if key in _HYDRA_KEYS or key in found.accepted:
                continue
            close = difflib.get_close_matches(key, sorted(found.accepted), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"Unknown config key '{_join(path, key)}' for {target_name}.{hint} "
                f"Valid keys: {', '.join(sorted(found.accepted))}."
            )
    check_target_values(found, _plain_values(node, keys), path)


def _plain_values(node: DictConfig, keys: list[str]) -> dict[str, Any]:
    """The node's set, resolvable scalar values (missing ``???`` ones are reported by :func:`check_missing`)."""
    values = {}
    for key in keys:
        if key in _HYDRA_KEYS or OmegaConf.is_missing(node, key):
            continue
        try:
            value = node[key]
        except OmegaConfBaseException:
            continue
        if not isinstance(value, DictConfig | ListConfig):
            values[key] = value
    return values


def check_missing(cfg: DictConfig) -> None:
    """Every ``???`` value must be given: name the first one and how to give it."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        others = f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise ConfigError(f"{missing[0]} is required: add {missing[0]}=<value> to the command{others}.")


def check_devices(cfg: DictConfig) -> None:
    """An accelerator or device that this machine does not have fails at once, not inside Lightning."""
    import torch

    wanted = [
        (key, str(value))
        for key in ("trainer.accelerator", "device")
        if (value := OmegaConf.select(cfg, key)) is not None
    ]
    for key, value in wanted:
        kind = value.split(":")[0].lower()
        if kind in {"gpu", "cuda"} and not torch.cuda.is_available():
            fix = "trainer=cpu" if key == "trainer.accelerator" else "device=cpu"
            raise ConfigError(
                f"{key}={value}, but torch finds no CUDA GPU on this machine (torch {torch.__version__}). "
                f"Use {fix}, or install a CUDA build of torch on a machine with a GPU."
            )
        if kind == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(f"{key}={value}, but Apple's MPS backend is not available here. Use cpu instead.")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _root_dir() -> str:
    """``LMLAB_ROOT``, else the directory lmlab was launched from. Unlike ``${hydra:runtime.cwd}`` this
    resolves before Hydra's runtime is set, as the sweep folder of a multirun needs."""
    return str(Path(os.environ.get("LMLAB_ROOT") or os.getcwd()).expanduser().resolve())


#: groups a user sets keys of (paths.root_dir=...) rather than picks an option of
_KEYS_ONLY_GROUPS = {"hydra", "paths"}
#: groups whose options are sets of pieces that are options too (callbacks=default holds early_stopping)
_SETS_OF_PIECES = {"callbacks"}


#: a folder of this name inside a config group holds the bases that the group's options build on
#: (``conf/data/base/translation.yaml``, in the defaults list of ``data=multi30k``): not options to pick
BASE_FOLDER = "base"


def is_base(option: str) -> bool:
    """``base/translation`` (an option's name within its group) is a base that options build on."""
    return BASE_FOLDER in option.split("/")[:-1]


def user_options(config_name: str) -> str:
    """``group: option, ...`` for each group of ``config_name`` (``train``, ``eval``, ...), listing only the
    options a user picks, from every folder of the run's search path (a plugin's options too): not the pieces
    the callback sets are made of, nor the bases options build on (``data: base/lm``, and ``trainer: default``
    under ``trainer: cpu``)."""
    from hydra.core.default_element import GroupDefault

    repo = _config_repository()
    primary = repo.load_config(config_name)
    defaults = primary.defaults_list if primary else []
    chosen = {str(d.group): d.value for d in defaults if isinstance(d, GroupDefault)}
    lines = []
    for group, choice in chosen.items():
        if group in _KEYS_ONLY_GROUPS:
            continue
        options = []
        for name in _options_of(repo, group):
            piece = group in _SETS_OF_PIECES and _is_piece(repo, f"{group}/{name}")
            base = is_base(name) or (name == "default" and choice != "default")
            if not (piece or base):
                options.append(name)
        lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


def group_options(group: str) -> list[str]:
    """The options a user picks in ``group`` (``experiment: lm/shakespeare_char, ...``), from every folder of the
    run's search path: not the bases options build on."""
    return [name for name in _options_of(_config_repository(), group) if not is_base(name)]


def _options_of(repo: ConfigRepository, group: str) -> list[str]:
    """Every option of ``group``, those in its folders too (``experiment: lm/shakespeare_char``)."""
    from hydra.core.object_type import ObjectType

    nested = [
        f"{folder}/{name}"
        for folder in repo.get_group_options(group, ObjectType.GROUP)
        for name in _options_of(repo, f"{group}/{folder}")
    ]
    return sorted([*repo.get_group_options(group), *nested])


def _is_piece(repo: ConfigRepository, path: str) -> bool:
    """``callbacks/early_stopping`` holds only the key it is named after, and no defaults list: a piece that
    the callback sets are made of."""
    loaded = repo.load_config(path)
    return loaded is not None and not loaded.defaults_list and list(loaded.config) == [path.rsplit("/", 1)[-1]]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("lmlab_root"):
        OmegaConf.register_new_resolver("lmlab_root", _root_dir)
    if not OmegaConf.has_resolver("lmlab_options"):
        OmegaConf.register_new_resolver("lmlab_options", user_options)


register_resolvers()
