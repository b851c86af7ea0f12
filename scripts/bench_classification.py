"""IMDB and SST-2 text classification through lmlab-train, one experiment after another.

Each experiment runs as ``lmlab-train experiment=<name>`` on local parquet copies of the data
(IMDB: 25k train, of which 10% held out for validation, and the 25k test reviews; SST-2: train and
the 872-sentence validation split, which is then the reported split). Prints, per experiment, the
test (IMDB) or validation (SST-2) accuracy of the best checkpoint, the wall time of the whole
command (tokenizing included, on a cold cache) and the training examples/s.

    python scripts/bench_classification.py --data ../shared/data --dataset imdb cls/imdb_fasttext
    python scripts/bench_classification.py --data ../shared/data --dataset sst2 cls/sst2_textcnn --override trainer=gpu
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path


def data_overrides(data: Path, dataset: str) -> list[str]:
    """The documented offline form of ``data=imdb`` / ``data=sst2``: local files through ``data=labeled_files``."""
    if dataset == "imdb":
        return [
            "data=labeled_files",
            f"data.source.train_files={data / 'imdb/train.parquet'}",
            f"data.source.test_files={data / 'imdb/test.parquet'}",
            "data.source.val_fraction=0.1",
        ]
    return [
        "data=labeled_files",
        f"data.source.train_files={data / 'sst2/train.parquet'}",
        f"data.source.val_files={data / 'sst2/validation.parquet'}",
        "data.source.columns.text=sentence",
        "test=false",
    ]


def run(experiment: str, args: argparse.Namespace, root: Path) -> dict[str, object]:
    run_dir = root / experiment.replace("/", "_")
    command = [
        sys.executable,
        "-m",
        "lmlab.train",
        f"experiment={experiment}",
        *data_overrides(Path(args.data).resolve(), args.dataset),
        "print_config=false",
        "callbacks.rich_progress_bar=null",
        "++trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        f"paths.root_dir={root}",
        f"paths.cache_dir={run_dir}/cache",
        *args.overrides,
    ]
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    rates = sorted(float(r["perf/samples_per_sec"]) for r in rows if r.get("perf/samples_per_sec"))
    split = "test" if args.dataset == "imdb" else "val"
    best_val = max(float(r["val/acc"]) for r in rows if r.get("val/acc"))
    return {
        "experiment": experiment,
        "dataset": args.dataset,
        f"{split}_acc": metrics.get(f"{split}/acc") if split == "test" else best_val,
        "best_val_acc": best_val,
        "wall_time_s": round(wall, 1),
        "median_train_examples_per_sec": round(rates[len(rates) // 2], 1) if rates else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder holding imdb/ and sst2/ parquet files")
    parser.add_argument("--dataset", choices=["imdb", "sst2"], default="imdb")
    parser.add_argument("--root", default="bench_runs/classification", help="folder for logs and caches")
    parser.add_argument("experiments", nargs="+", help="experiment names, e.g. cls/imdb_fasttext")
    parser.add_argument(
        "--override",
        dest="overrides",
        action="append",
        default=[],
        help="a Hydra override for every run (repeatable), e.g. --override trainer=gpu",
    )
    args = parser.parse_args()
    root = Path(args.root).resolve()
    results = [run(name, args, root) for name in args.experiments]
    (root / f"result_{args.dataset}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
