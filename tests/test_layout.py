"""The package's import graph runs one way. Read from the source alone (nothing is imported), level by level:

    0  errors.py, registry.py                                    the foundations every room uses
    1  tokenizers.py, models/, data/                             what a task is made of
    2  tasks/                                                    the LightningModules
    3  config/, run/, training/, inference/, evaluation/         the machinery around them
    4  the commands (train.py, evaluate.py, ...) and cli.py      every other module at the package's top

A module imports from its own level and those below it; imports inside functions and under ``TYPE_CHECKING``
count too, since a lazy import is a dependency all the same. One exception: tasks/ builds on parts of level 3
(``config.signatures.locate``, ``run.runtime.build_network``, the language model, decoding and metrics of
inference/ and evaluation/), none of which imports a task.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lmlab"
LEVELS = {
    "errors": 0,
    "registry": 0,
    "tokenizers": 1,
    "models": 1,
    "data": 1,
    "tasks": 2,
    "config": 3,
    "run": 3,
    "training": 3,
    "inference": 3,
    "evaluation": 3,
}
#: (importer's level, imported level) pairs allowed upwards
ALLOWED_UP = {(2, 3)}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _level(module: str) -> int:
    """The level of a module of lmlab (the package itself, which holds only its version: 0)."""
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    return LEVELS.get(parts[1], 4)


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """The lmlab modules that ``source`` (the module ``module``) imports, wherever in it, with their lines."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from lmlab import registry`` imports a module; ``from lmlab import __version__`` the package
            found += [
                (node.lineno, f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base)
                for alias in node.names
            ]
    return sorted({(line, name) for line, name in found if name == "lmlab" or name.startswith("lmlab.")})


def test_every_import_points_down() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50, f"src/lmlab not found at {PACKAGE}"
    upward = []
    for path in files:
        importer = _module_name(path)
        for line, imported in _imports(path.read_text(encoding="utf-8"), importer, path.name == "__init__.py"):
            levels = (_level(importer), _level(imported))
            if levels[1] > levels[0] and levels not in ALLOWED_UP:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported} (level {levels[1]})")
    assert not upward, "imports from a level above:\n" + "\n".join(upward)


def test_the_check_sees_lazy_and_type_only_imports() -> None:
    """Imports in a function and under ``TYPE_CHECKING``, and relative ones, are found: the check above can fail."""
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lmlab.tasks.base import TaskModule\n"
        "def f():\n    from lmlab import train\n    import lmlab.run.checkpoint\n    from ..config import schema\n"
    )
    found = _imports(source, "lmlab.models.lazy")
    assert found == [
        (3, "lmlab.tasks.base"),
        (5, "lmlab.train"),
        (6, "lmlab.run.checkpoint"),
        (7, "lmlab.config.schema"),
    ]
    assert [_level(name) for _, name in found] == [2, 4, 3, 3]


def test_the_readmes_layout_map_names_every_module() -> None:
    readme = (PACKAGE.parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Layout", 1)[1].split("```")[1]
    named = set(re.findall(r"[\w./]+", block))
    missing = []
    for path in sorted(PACKAGE.iterdir()):
        if path.name.startswith(("_", ".")):
            continue
        if path.is_dir():
            if f"{path.name}/" not in named:
                missing.append(f"{path.name}/")
            if LEVELS.get(path.name) == 3:  # the rooms list their modules by name
                missing += [
                    f"{path.name}/{m.stem}" for m in path.glob("*.py") if m.stem != "__init__" and m.stem not in named
                ]
        elif path.suffix == ".py" and path.name not in named:
            missing.append(path.name)
    assert not missing, f"README.md's Layout section does not name: {missing}"
