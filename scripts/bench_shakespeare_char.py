"""Tiny Shakespeare, character level: nanoGPT's configurations through lmlab-train.

Runs ``lmlab-train experiment=lm/shakespeare_char`` (CPU, default) or
``experiment=lm/shakespeare_char_gpu`` (``--gpu``) on a local copy of input.txt (first 90% train,
last 10% validation) and prints the best validation loss, wall time and tokens/s from the run's
metrics.

    python scripts/bench_shakespeare_char.py --data ../shared/data/tiny_shakespeare/input.txt
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="path to tiny_shakespeare input.txt")
    parser.add_argument("--gpu", action="store_true", help="the 6-layer GPU configuration (bf16)")
    parser.add_argument("--root", default="bench_runs", help="folder for logs and cache")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()

    experiment = "lm/shakespeare_char_gpu" if args.gpu else "lm/shakespeare_char"
    root = Path(args.root).resolve()
    command = [
        sys.executable,
        "-m",
        "lmlab.train",
        f"experiment={experiment}",
        "data=text_files",
        f"data.source.train_files={Path(args.data).resolve()}",
        "data.source.val_fraction=0.1",
        "data.source.test_fraction=0.0",
        "test=false",
        "callbacks.samples=null",
        "print_config=false",
        f"hydra.run.dir={root}/run",
        f"paths.root_dir={root}",
        *args.overrides,
    ]
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start

    run = root / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    tps = [float(r["perf/tokens_per_sec"]) for r in rows if r.get("perf/tokens_per_sec")]
    result = {
        "experiment": experiment,
        "best_val_loss": min(val),
        "final_val_loss": val[-1],
        "val_losses": val,
        "wall_time_s": round(wall, 1),
        "median_tokens_per_sec": sorted(tps)[len(tps) // 2] if tps else None,
        "best_checkpoint": metrics.get("best_checkpoint"),
    }
    (root / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "val_losses"}, indent=2))


if __name__ == "__main__":
    main()
