"""What each ``_target_`` of a config accepts: its keyword names, the types of their values and the declared
ranges, read from the class or function and kept on disk.

Reading a signature means importing the target, and the targets a config names pull in torch and Lightning:
seconds on an idle machine, most of a minute on a busy one. The entry points check a config first from what
earlier runs recorded here (:func:`recorded`), before those imports, so a mistyped key or value is reported at
once; then, once the run has imported what it needs, every check runs again from the targets themselves
(:func:`signature`), which records what it read (:func:`save`). A record is used only while the source files it
was read from are unchanged, by the same Python.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmlab.config.values import Range, TypeSpec, ranges_of, type_specs, typed_keywords


@dataclass(frozen=True)
class Signature:
    """What a config node with this ``_target_`` may hold."""

    #: the keyword names the target takes; ``None``: any (its ``**kwargs`` go to another library)
    accepted: frozenset[str] | None
    #: the judgeable types of its parameters
    types: dict[str, TypeSpec]
    #: the declared ranges of its numeric parameters
    ranges: dict[str, Range]

    def to_json(self) -> dict[str, Any]:
        return {
            "accepted": None if self.accepted is None else sorted(self.accepted),
            "types": {key: list(spec) for key, spec in self.types.items()},
            "ranges": {key: {**asdict(rule), "kind": rule.kind.__name__} for key, rule in self.ranges.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Signature:
        kinds = {"int": int, "float": float}
        return cls(
            accepted=None if data["accepted"] is None else frozenset(data["accepted"]),
            types={
                key: tuple(tuple(o) if isinstance(o, list) else o for o in spec) for key, spec in data["types"].items()
            },
            ranges={
                key: Range(**{**rule, "kind": kinds[rule["kind"]], "also": tuple(rule["also"])})
                for key, rule in data["ranges"].items()
            },
        )


def locate(path: str) -> Any:
    """The object at a dotted path (``pkg.module.Class``, or ``pkg.module.Class.method``)."""
    module_name, _, attr = path.rpartition(".")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError:
        obj = locate(module_name)
    try:
        return getattr(obj, attr)
    except AttributeError:
        raise ImportError(path) from None


def accepted_keys(target: Any) -> set[str] | None:
    """Names the target accepts as keywords; ``None`` if it takes any.

    A class whose constructor takes ``**kwargs`` and subclasses one of lmlab's classes hands them to that base
    (as the data modules hand their loader settings to :class:`~lmlab.data.base.TaskDataModule`, and the
    tasks theirs to :class:`~lmlab.tasks.base.TaskModule`): it accepts the names of the constructors up its
    base classes, as far as the first without ``**kwargs``. ``**kwargs: Unpack[SomeTypedDict]`` accept that
    dict's fields (the Transformer networks' part choices). ``**kwargs`` that go to a class of another library
    (a Lightning strategy's, handed on to PyTorch) may be anything.
    """
    if inspect.isclass(target):
        constructors = [vars(k)["__init__"] for k in target.__mro__ if "__init__" in vars(k)]
    else:
        constructors = [target]
    keys: set[str] = set()
    for fn in constructors:
        if keys and not str(getattr(fn, "__module__", "")).startswith("lmlab."):
            return None
        params = inspect.signature(fn).parameters.values()
        keys |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        typed = typed_keywords(fn)
        if typed is not None or not any(p.kind is p.VAR_KEYWORD for p in params):
            return keys | set(typed or ())
    return None


#: the signatures read in this process, and the source files each was read from (path: modification time)
_read: dict[str, tuple[Signature, dict[str, int]]] = {}


def signature(target_name: str) -> Signature:
    """The signature of the target at ``target_name``, read from the target itself (an ``ImportError`` when it
    cannot be imported)."""
    if target_name not in _read:
        target = locate(target_name)
        keys = accepted_keys(target)
        found = Signature(None if keys is None else frozenset(keys), type_specs(target), ranges_of(target))
        _read[target_name] = (found, _source_files(target))
    return _read[target_name][0]


def recorded(target_name: str) -> Signature | None:
    """The signature an earlier run read for ``target_name``, if its source files are unchanged; else ``None``."""
    entry = _records().get(target_name)
    if entry is None or not _unchanged(entry["files"]):
        return None
    try:
        return Signature.from_json(entry["signature"])
    except (KeyError, TypeError, ValueError):
        return None


def save(also: Iterable[str] = ()) -> None:
    """Add the signatures read in this process, and those of the targets named in ``also``, to the records on
    disk (best effort: a target that cannot be imported is left out, a cache that cannot be written as it is)."""
    for name in also:
        with contextlib.suppress(Exception):
            signature(name)
    if not _read:
        return
    records = dict(_records())
    for name, (found, files) in _read.items():
        entry = {"signature": found.to_json(), "files": files}
        try:
            json.dumps(entry)
        except (TypeError, ValueError):  # a literal choice that JSON cannot hold: not recorded
            continue
        records[name] = entry
    path = cache_file()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".signatures", delete=False) as tmp:
            json.dump({"version": _version(), "records": records}, tmp)
        os.replace(tmp.name, path)
        _loaded.clear()


def cache_file() -> Path:
    """``$LMLAB_CACHE_HOME/signatures.json``, else under ``$XDG_CACHE_HOME`` or ``~/.cache`` (``lmlab/``)."""
    home = os.environ.get("LMLAB_CACHE_HOME")
    if home:
        return Path(home).expanduser() / "signatures.json"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "lmlab" / "signatures.json"


_loaded: dict[str, dict[str, Any]] = {}


def _records() -> dict[str, Any]:
    if not _loaded:
        try:
            data = json.loads(cache_file().read_text())
        except (OSError, ValueError):
            data = {}
        fresh = isinstance(data, dict) and data.get("version") == _version()
        _loaded["records"] = data.get("records", {}) if fresh else {}
    return _loaded["records"]


def _version() -> list[Any]:
    """Records hold for this Python and this copy of lmlab's own code (whose declarations they include)."""
    package = Path(__file__).resolve().parents[1]
    newest = max((p.stat().st_mtime_ns for p in package.rglob("*.py")), default=0)
    return [list(sys.version_info[:2]), str(package), newest]


def _source_files(target: Any) -> dict[str, int]:
    objects = target.__mro__ if inspect.isclass(target) else (target,)
    files = {}
    for obj in objects:
        module = sys.modules.get(getattr(obj, "__module__", "") or "")
        file = getattr(module, "__file__", None)
        if file and module.__name__ != "builtins":
            with contextlib.suppress(OSError):
                files[file] = os.stat(file).st_mtime_ns
    return files


def _unchanged(files: dict[str, int]) -> bool:
    try:
        return all(os.stat(path).st_mtime_ns == mtime for path, mtime in files.items())
    except OSError:
        return False
