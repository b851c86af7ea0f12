"""Console entry points: Hydra's main, with the errors Hydra reports itself turned into one clear line.

The console scripts start here, and this module imports nothing heavy: ``--help``, ``--cfg``, ``--info``
and shell completion compose the config without importing torch or Lightning, which the entry point's
module (``lmlab.train`` and the others) imports only when a run starts.

Hydra prints composition errors with its own wording; for a key that does not exist it suggests adding it
with ``+``, which is the wrong fix for a typo. Here such errors name the key and the closest valid key, a
run folder that cannot be written names the folder and the fix, and every error ends the process with
status 1 and no traceback. ``HYDRA_FULL_ERROR=1`` still shows full tracebacks.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import functools
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from lmlab.config.schema import TrainSchema, config_dir
from lmlab.errors import LmlabError

if TYPE_CHECKING:
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

#: marks that lmlab (not the user) set HYDRA_FULL_ERROR, so child processes report errors the same way
_OURS = "LMLAB_HYDRA_ERRORS"


def lmlab_main(
    config_name: str, overlays: tuple[str, ...] = (), continues_runs: bool = False
) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """Decorator for an entry point's task function, in place of ``hydra.main``.

    ``overlays`` names groups whose keys may be set without choosing an option (``lmlab-eval`` takes
    ``data.source.test_files=...`` on top of the checkpoint's own data settings): unless the group is
    chosen, such overrides are passed to Hydra as ``++key=value``, which adds the key. ``continues_runs``: a
    ``ckpt_path`` of a run continues that run, in its folder and with its config (:mod:`lmlab.run.continuation`).
    """

    def wrap(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        hydra_main = hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(task)

        @functools.wraps(task)
        def run() -> Any:
            sys.argv[1:] = _as_overlays(sys.argv[1:], overlays)
            if {"-sc", "--shell-completion"} & set(sys.argv[1:]):
                _complete_what_users_pick()
            with hydra_errors():
                if continues_runs:
                    sys.argv[1:] = _continue_the_run(sys.argv[1:], config_name)
                while True:
                    try:
                        return hydra_main()
                    except ConfigCompositionException as err:
                        added = _as_argument_of_an_open_node(err)
                        if added is None:
                            raise

        return run

    return wrap


def _as_overlays(args: list[str], groups: tuple[str, ...]) -> list[str]:
    chosen = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}
    out = []
    for arg in args:
        group = arg.split(".", 1)[0]
        if group in groups and group not in chosen and "=" in arg and not arg.startswith(("+", "~", "-")):
            arg = "++" + arg
        out.append(arg)
    return out


def _continue_the_run(args: list[str], config_name: str) -> list[str]:
    """``args`` that continue the run their ``ckpt_path`` belongs to; ``args`` as they are where the config does
    not compose (Hydra then reports why)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmlab.run import continuation

    def composed(overrides: list[str]) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)

    try:
        return continuation.continue_the_run(args, composed)
    except (HydraException, OmegaConfBaseException):
        return args
    finally:
        GlobalHydra.instance().clear()


#: nodes that take every argument of their target, not only the keys their YAML writes: ``trainer.max_time=...``
#: is any ``lightning.Trainer`` argument, checked against its signature when the run starts
_OPEN_NODES = ("trainer",)


def _as_argument_of_an_open_node(err: ConfigCompositionException) -> str | None:
    """For an override that Hydra refused because its YAML has no such key, in an open node: the command line with
    that override written as ``++key=value`` (which adds the key), and the override; ``None`` for any other error."""
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None) if isinstance(cause, ConfigAttributeError | ConfigKeyError) else None
    if not full_key or full_key.split(".", 1)[0] not in _OPEN_NODES:
        return None
    for i, arg in enumerate(sys.argv[1:], start=1):
        if arg.split("=", 1)[0] == full_key:
            sys.argv[i] = "++" + arg
            return arg
    return None


def _complete_what_users_pick() -> None:
    """Shell completion offers the options a user picks. Hydra's own completion offers ``data/base=`` (a folder
    of ``conf/data`` is a group to Hydra) and then each base as an option of it, and every option of a group;
    here it offers no bases, and for ``model=`` the models of the task the line composes (``task=``, or the
    task an ``experiment=`` picks, or the default) and the options no task lists (a user's own)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.object_type import ObjectType

    from lmlab.config.schema import BASE_FOLDER, is_base

    list_options = ConfigLoaderImpl.get_group_options

    def get_group_options(
        self: ConfigLoaderImpl,
        group_name: str,
        results_filter: ObjectType | None = ObjectType.CONFIG,
        config_name: str | None = None,
        overrides: list[str] | None = None,
    ) -> list[str]:
        if is_base(f"{group_name}/"):  # data/base, or a folder inside it
            return []
        options = list_options(self, group_name, results_filter, config_name, overrides)
        if group_name and results_filter == ObjectType.GROUP:
            return [option for option in options if option != BASE_FOLDER]
        if group_name == "model" and results_filter == ObjectType.CONFIG:
            return _models_of_the_task(self, options, config_name, overrides)
        return options

    ConfigLoaderImpl.get_group_options = get_group_options  # type: ignore[method-assign]


def _models_of_the_task(
    loader: ConfigLoaderImpl, options: list[str], config_name: str | None, overrides: list[str] | None
) -> list[str]:
    """Of the ``model`` options, those the composed task lists under ``task.models`` and those no task lists;
    all of them while the line does not compose yet."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from lmlab.config.schema import task_models

    try:
        # a sweep's values do not change its task: compose the line without them
        parsed = OverridesParser.create().parse_overrides(list(overrides or []))
        single = [override.input_line for override in parsed if not override.is_sweep_override()]
        composed = loader.load_configuration(config_name, single, RunMode.RUN)
    except HydraException:
        return options
    listed = OmegaConf.select(composed, "task.models")
    if not listed:
        return options
    sources = OmegaConf.select(composed, "hydra.runtime.config_sources")
    claimed = {model for models in task_models(sources).values() for model in models}
    return [option for option in options if option in listed or option not in claimed]


@contextlib.contextmanager
def hydra_errors() -> Iterator[None]:
    user_wants_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1" and os.environ.get(_OURS) != "1"
    if not user_wants_tracebacks:
        # Hydra then raises what it would print; the message is composed here
        os.environ["HYDRA_FULL_ERROR"] = os.environ[_OURS] = "1"
    try:
        yield
    except Exception as err:
        message = None if user_wants_tracebacks else explain(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


def explain(err: BaseException) -> str | None:
    """The one-line message for an error Hydra reports (``None``: not one of those, keep the traceback)."""
    cause = err.__cause__
    if isinstance(err, LmlabError):
        return str(err)
    if isinstance(err, ConfigCompositionException) and isinstance(cause, ConfigAttributeError | ConfigKeyError):
        unknown = _unknown_key(err, cause)
        if unknown:
            return unknown
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return (
            f"cannot write '{err.filename}' ({err.strerror}). Run from a folder you can write to, or set "
            "LMLAB_ROOT=/a/writable/folder (or paths.root_dir=...)."
        )
    if isinstance(err, OverrideParseException):
        reason = str(err).strip().splitlines()[0]
        key, _, value = err.override.partition("=")
        quoted = f'{key}="{value}"' if "'" in value else f"{key}='{value}'"
        return (
            f"cannot read the override '{err.override}' ({reason}). Quote a value that holds spaces, punctuation "
            f"or non-ASCII characters: {quoted} (typed in a shell, inside a second pair of quotes)."
        )
    if type(err).__name__ == "UncompletedJobError" and type(err).__module__.startswith("submitit"):
        return _failed_job(str(err))
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        return _missing_option(err)
    if isinstance(err, HydraException | OmegaConfBaseException):
        text = str(err).strip()
        if isinstance(cause, OmegaConfBaseException) and str(cause) not in text:
            text += f" ({' '.join(str(cause).split())})"
        return text
    return None


def _missing_option(err: MissingConfigException) -> str:
    """``model=gtp``, ``experiment=shakespeare_char``: the option does not exist. Name the closest options (an
    option in a folder of the group by its own name too: ``lm/shakespeare_char``) and list them all, without
    Hydra's search path."""
    from lmlab.config.schema import group_options

    missing = str(err.missing_cfg_file)
    typed = [arg.lstrip("+~").split("=", 1)[0] for arg in sys.argv[1:] if "=" in arg]
    group = next((g for g in typed if missing.startswith(g + "/")), missing.rpartition("/")[0])
    name = missing[len(group) + 1 :]
    head = str(err).split("\n")[0].strip()
    options = group_options(group) or list(err.options or [])
    if not options:
        return head
    same_name = [option for option in options if option.rpartition("/")[2] == name]
    close = same_name or difflib.get_close_matches(name, options, n=2, cutoff=0.6)
    suggestion = f" Did you mean {' or '.join(f'{group}={option}' for option in close)}?" if close else ""
    return f"{head}.{suggestion} Available options: {', '.join(options)}."


def _failed_job(text: str) -> str:
    """A sweep job of the submitit launcher failed: submitit's error holds the job's whole output; the job's
    own one-line error (or how it ended) and where its log is are what the sweep reports."""
    said = [line for line in text.splitlines() if line.startswith(("error: ", "stopped: "))]
    job = re.search(r"with path (\S+)_result\.pkl", text)
    state = re.search(r"\(state: (\w+)\)", text)
    reason = (
        said[-1].split(": ", 1)[1]
        if said
        else f"it ended without a result ({state.group(1) if state else 'state unknown'})"
    )
    return f"a sweep job failed: {reason}" + (f" (its log: {job.group(1)}_log.err)" if job else "")


def _unknown_key(err: BaseException, cause: OmegaConfBaseException) -> str | None:
    """``model.n_layr=4``: the key does not exist; name the closest one that does."""
    parent, key, full_key = cause.parent_node, cause.key, cause.full_key
    if not isinstance(parent, DictConfig) or key is None or not full_key:
        return None
    value = re.search(r"use \+\S+?=(.*)$", str(err))
    given = value.group(1) if value else "..."
    prefix = full_key.rpartition(".")[0]
    valid = sorted(str(k) for k in parent.keys() if not str(k).startswith("_"))
    close = difflib.get_close_matches(str(key), valid, n=1)
    # a key of a group given without its group (lr=1e-3 for optimizer.lr)
    elsewhere = [] if close else _keys_named(parent._get_root(), str(key))
    place = f"'{prefix}'" if prefix else "the config"
    named = [_join(prefix, close[0])] if close else elsewhere[:3]
    suggestion = f" Did you mean {' or '.join(f'{name}={given}' for name in named)}?" if named else ""
    return (
        f"{full_key} is not a key of {place}.{suggestion} Valid keys: {', '.join(valid)}. "
        f"(To add a new key on purpose, write +{full_key}={given}.)"
    )


def _keys_named(node: Any, key: str, path: str = "") -> list[str]:
    """The full names of the keys called ``key`` below ``node`` (Hydra's own settings left out)."""
    if not isinstance(node, DictConfig):
        return []
    found = []
    for name in node.keys():
        full = _join(path, str(name))
        if full == "hydra":
            continue
        if name == key:
            found.append(full)
        found += _keys_named(node._get_node(name), key, full)
    return found


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _console(
    config_name: str,
    module: str,
    overlays: tuple[str, ...] = (),
    schema: type | None = None,
    reads_data: bool = False,
    continues_runs: bool = False,
) -> Callable[[], Any]:
    """The console script of ``module``'s ``run(cfg)``, imported when the run starts, once the config passed the
    checks that need no heavy import (:mod:`lmlab.config.prechecks`; ``schema``: the top-level keys the command takes,
    ``reads_data``: the command reads every data file the config names)."""

    def run(cfg: DictConfig) -> Any:
        from lmlab.config.prechecks import check_before_imports
        from lmlab.run.runtime import user_errors

        with _run_folder_kept_only_if_used():
            with user_errors():
                check_before_imports(cfg, schema, reads_data)
            return importlib.import_module(module).run(cfg)

    run.__module__ = module  # Hydra names the job (and its log file) after the task function's module
    return lmlab_main(config_name, overlays, continues_runs)(run)


@contextlib.contextmanager
def _run_folder_kept_only_if_used() -> Iterator[None]:
    """A command that fails before it wrote anything of its own leaves no run folder behind: only Hydra's files
    (``.hydra/``, the log) and the printed config would be in it. One that fails later (a training run that
    diverged) keeps its folder, marked failed in ``metrics.json``. A DDP worker leaves the folder to rank 0."""
    try:
        yield
    except BaseException as err:
        if not (isinstance(err, SystemExit) and err.code in (0, None)):
            _clean_up_failed_run(err)
        raise


#: what a run folder holds before the command wrote anything: Hydra's config and log, the printed config
_STARTUP_FILES = {".hydra", "config_tree.yaml"}


def _clean_up_failed_run(err: BaseException) -> None:
    import json
    import shutil

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lmlab.run.runtime import UserErrorExit

    if not HydraConfig.initialized() or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir)
    if not folder.is_dir():
        return
    written = {p.name for p in folder.iterdir()} - _STARTUP_FILES - {f"{hydra_cfg.job.name}.log"}
    if not written and hydra_cfg.mode == RunMode.RUN:
        shutil.rmtree(folder, ignore_errors=True)
        _remove_empty_parents(folder, Path.cwd())
        return
    record = folder / "metrics.json"
    if not record.exists():
        reason = str(err.error) if isinstance(err, UserErrorExit) else f"{type(err).__name__}: {err}"
        record.write_text(json.dumps({"status": "failed", "error": reason}, indent=2))


def _remove_empty_parents(folder: Path, root: Path) -> None:
    """The folders above ``folder`` up to ``root`` (``logs/train/runs``) that the run's creation left empty."""
    for parent in folder.resolve().parents:
        if parent == root.resolve() or root.resolve() not in parent.parents:
            return
        try:
            parent.rmdir()  # only an empty folder
        except OSError:
            return


train = _console("train", "lmlab.train", schema=TrainSchema, reads_data=True, continues_runs=True)
evaluate = _console("eval", "lmlab.evaluate", overlays=("data",))
generate = _console("generate", "lmlab.generate")
predict = _console("predict", "lmlab.predict")
translate = _console("translate", "lmlab.translate")
export_model = _console("export", "lmlab.export")
chat = _console("chat", "lmlab.chat")
