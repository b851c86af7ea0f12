"""Tiny Shakespeare, character level: nanoGPT's configurations through lmlab-train.

Runs ``lmlab-train experiment=lm/shakespeare_char`` (CPU, default) or
``experiment=lm/shakespeare_char_gpu`` (``--gpu``) on a local copy of input.txt (first 90% train,
last 10% validation) and prints the best validation loss, wall time and tokens/s from the run's
metrics. ``--experiment`` (repeatable) runs other experiments one after the other on the same data,
side by side: the GPT-2-style decoder against the Llama-style one on the same budget is

    python scripts/bench_shakespeare_char.py --data ../shared/data/tiny_shakespeare/input.txt \
        --experiment lm/shakespeare_char --experiment lm/shakespeare_char_llama
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
    parser.add_argument("--experiment", action="append", help="experiment(s) to run, in order (repeatable)")
    args = parser.parse_args()

    experiments = args.experiment or ["lm/shakespeare_char_gpu" if args.gpu else "lm/shakespeare_char"]
    root = Path(args.root).resolve()
    results = [run_experiment(experiment, Path(args.data), root, args.overrides) for experiment in experiments]
    (root / "result.json").write_text(json.dumps(results, indent=2))
    for result in results:
        print(json.dumps({k: v for k, v in result.items() if k != "val_losses"}, indent=2))
    if len(results) > 1:
        print_side_by_side(results)


def print_side_by_side(results: list[dict]) -> None:
    """A Markdown table of the runs, tokens/s as a ratio to the first run's."""
    base = results[0]["median_tokens_per_sec"]
    rows = {
        "parameters": [f"{r['parameters']:,}" for r in results],
        "best validation loss": [f"{r['best_val_loss']:.3f}" for r in results],
        "median tokens/s": [f"{r['median_tokens_per_sec']:,.0f}" for r in results],
        "tokens/s ratio to the first": [f"{r['median_tokens_per_sec'] / base:.3f}" for r in results],
        "wall time (s)": [str(r["wall_time_s"]) for r in results],
    }
    print("| | " + " | ".join(r["experiment"] for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for label, values in rows.items():
        print(f"| {label} | " + " | ".join(values) + " |")


def run_experiment(experiment: str, data: Path, root: Path, overrides: list[str]) -> dict:
    """One ``lmlab-train`` run of ``experiment`` on ``data``, in ``root/<experiment>``: its figures."""
    run = root / experiment.replace("/", "_")
    command = [
        sys.executable,
        "-m",
        "lmlab.train",
        f"experiment={experiment}",
        "data=text_files",
        f"data.source.train_files={data.resolve()}",
        "data.source.val_fraction=0.1",
        "data.source.test_fraction=0.0",
        "test=false",
        "callbacks.samples=null",
        "print_config=false",
        f"hydra.run.dir={run}",
        f"paths.root_dir={root}",
        *overrides,
    ]
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start

    metrics = json.loads((run / "metrics.json").read_text())
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    tps = [float(r["perf/tokens_per_sec"]) for r in rows if r.get("perf/tokens_per_sec")]
    return {
        "experiment": experiment,
        "parameters": _parameters(Path(metrics["best_checkpoint"])),
        "best_val_loss": min(val),
        "final_val_loss": val[-1],
        "val_losses": val,
        "wall_time_s": round(wall, 1),
        "median_tokens_per_sec": sorted(tps)[len(tps) // 2] if tps else None,
        "best_checkpoint": metrics.get("best_checkpoint"),
    }


def _parameters(ckpt: Path) -> int:
    """Trainable parameters of the checkpoint's network, tied matrices counted once."""
    from lmlab.run.checkpoint import load_language_model

    model, _ = load_language_model(ckpt)
    return sum(p.numel() for p in model.net.parameters())


if __name__ == "__main__":
    main()
