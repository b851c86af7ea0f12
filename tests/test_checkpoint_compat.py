"""Checkpoints written by earlier versions still load and give the same outputs.

``tests/fixtures/checkpoints`` holds one small checkpoint per task and model family, built by
``scripts/make_checkpoint_fixtures.py`` at the commit its ``.expected.json`` names, with what the entry points and
the network gave then. Each is loaded here by the commands users run, from a fresh directory; its training files
are named at the path they had when it was built, which need not exist: scoring reads only the file scored.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import script
from lmlab.run.checkpoint import load_task

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
NAMES = sorted(path.name.removesuffix(".ckpt") for path in FIXTURES.glob("*.ckpt"))


def _expected(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.expected.json").read_text())


def test_every_task_has_a_fixture() -> None:
    assert {name.split("_", 1)[0] for name in NAMES} == {"lm", "cls", "mt"}


@pytest.mark.parametrize("name", NAMES)
def test_network_gives_the_recorded_logits(name: str) -> None:
    task, _ = load_task(FIXTURES / f"{name}.ckpt")
    recorded = torch.load(FIXTURES / f"{name}.logits.pt", weights_only=True)
    with torch.no_grad():
        out = task.net.eval()(*recorded["inputs"])
    logits = out[0] if name.startswith("lm_") else out
    assert logits.shape == recorded["logits"].shape
    assert torch.allclose(logits, recorded["logits"], rtol=0, atol=1e-6), (logits - recorded["logits"]).abs().max()


def _run(args: list[str], cwd: Path, name: str, stdin: str | None = None) -> str:
    """The stdout of a command run in ``cwd``, fed ``stdin``."""
    env = {k: v for k, v in os.environ.items() if k != "LMLAB_ROOT"}
    done = subprocess.run(args, cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_entry_points_give_the_recorded_outputs(name: str, tmp_path: Path) -> None:
    expected, ckpt = _expected(name), f"ckpt_path={FIXTURES / name}.ckpt"
    test_file = FIXTURES / "data" / expected["eval_test_file"]
    _run([script("lmlab-eval"), ckpt, f"data.source.test_files={test_file}", "splits=[test]"], tmp_path, "eval")
    (metrics_file,) = tmp_path.glob("logs/eval/**/metrics.json")
    scored = json.loads(metrics_file.read_text())["metrics"]
    for key, value in expected["eval"].items():
        if key.startswith("test/"):
            assert math.isclose(scored[key], value, rel_tol=1e-5, abs_tol=1e-6), (key, scored[key], value)
    if "generate" in expected:
        for kind in ("generate", "sample"):
            out = _run([script("lmlab-generate"), ckpt, *expected[kind]["args"]], tmp_path, kind)
            assert out == expected[kind]["stdout"]
    if "predict" in expected:
        out = _run([script("lmlab-predict"), ckpt], tmp_path, "predict", stdin=expected["predict"]["stdin"])
        got = [json.loads(line) for line in out.splitlines()]
        want = [json.loads(line) for line in expected["predict"]["stdout"].splitlines()]
        assert [r["label"] for r in got] == [r["label"] for r in want]
        for g, w in zip(got, want, strict=True):
            assert g["probs"] == pytest.approx(w["probs"], abs=1e-6)
    if "translate" in expected:
        stdin = expected["translate"]["stdin"]
        greedy = _run([script("lmlab-translate"), ckpt, "beam_size=1"], tmp_path, "greedy", stdin=stdin)
        assert greedy == expected["translate"]["greedy"]
        assert _run([script("lmlab-translate"), ckpt], tmp_path, "beam", stdin=stdin) == expected["translate"]["beam"]
