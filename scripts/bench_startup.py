"""Start-up times of the console scripts, beside ``python -c "import lightning"`` on the same machine.

    python scripts/bench_startup.py                       # the lmlab installed beside this interpreter
    python scripts/bench_startup.py --bin /other/venv/bin # another install (say, an older version)

Each command runs ``--repeat`` times from a fresh folder; the median wall time is reported. Commands:
``--help``, ``--cfg job``, shell completion of ``model=``, a one-step training run (start-up, data, one
step, the closing validation), and ``lmlab-generate`` of 20 tokens on that run's checkpoint.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ONE_STEP = [
    "model.n_layer=1",
    "data.block_size=16",
    "data.batch_size=4",
    "trainer.max_steps=1",
    "trainer.limit_val_batches=1",
    "test=false",
    "print_config=false",
]


def wall(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    began = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    elapsed = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", type=Path, default=Path(sys.executable).parent, help="folder of the console scripts")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    python, train, generate = (str(args.bin / name) for name in ("python", "lmlab-train", "lmlab-generate"))
    work = Path(tempfile.mkdtemp(prefix="lmlab-startup-"))
    wall([train, *ONE_STEP], work)  # warm the data cache and the file system cache, and make a checkpoint
    ckpt = next(work.glob("logs/train/runs/*/checkpoints/last.ckpt"))
    commands = {
        'python -c "import lightning"': ([python, "-c", "import lightning"], None),
        "lmlab-train --help": ([train, "--help"], None),
        "lmlab-train --cfg job": ([train, "--cfg", "job"], None),
        "completion of model= (one TAB)": (
            [train, "-sc", "query=bash"],
            {"COMP_LINE": "lmlab-train model=", "COMP_POINT": "18"},
        ),
        "lmlab-train, one step": ([train, *ONE_STEP], None),
        "lmlab-generate, 20 tokens": ([generate, f"ckpt_path={ckpt}", "max_new_tokens=20", "seed=0"], None),
    }
    print(f"{'command':36s} median wall (s) over {args.repeat} runs   all runs")
    for name, (command, env) in commands.items():
        times = [wall(command, work, env) for _ in range(args.repeat)]
        print(
            f"{name:36s} {statistics.median(times):8.2f}                  " + " ".join(f"{t:.2f}" for t in times),
            flush=True,
        )


if __name__ == "__main__":
    main()
