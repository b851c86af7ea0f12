"""The config tree ships inside the wheel, so a non-editable install works from any directory."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_carries_config_tree_and_composes(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip()[-300:]}")
    wheel = next((tmp_path / "dist").glob("lmlab-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    source_yaml = {f"lmlab/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert source_yaml <= names, sorted(source_yaml - names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from lmlab.config.schema import config_dir; from hydra import compose, initialize_config_dir;"
        "d = config_dir(); assert d.startswith(sys.argv[1]), d;"
        "initialize_config_dir(config_dir=d, version_base='1.3');"
        "cfg = compose('train', overrides=['model=lstm', 'experiment=lm/shakespeare_char']);"
        "print(cfg.model._target_, cfg.data.block_size)"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(site)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["lmlab.models.RecurrentLM", "64"]
