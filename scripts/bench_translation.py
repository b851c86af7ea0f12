"""Multi30k translation through lmlab-train, then beam-search decoding speed of the best checkpoint.

Each experiment runs as ``lmlab-train experiment=<name>`` on local parquet copies of Multi30k (train
29,000 pairs, validation 1,014, test = the 1,000-sentence 2016 Flickr set) in the chosen direction.
Prints, per experiment: test sacreBLEU and chrF (from the run's test stage, decoded with the
experiment's test beam), BLEU on lowercased text (sacreBLEU 13a tokenization, lowercase) for
comparison with published figures computed that way, wall time of the whole training command
(tokenizer training and caching included), median training target tokens/s, and the sentences/s of
a separate beam-search pass over the test set.

    python scripts/bench_translation.py --data ../shared/data/multi30k --direction de-en mt/multi30k_cpu
    python scripts/bench_translation.py --data ../shared/data/multi30k --direction en-de \\
        mt/multi30k_transformer mt/multi30k_gru_attention --override trainer=gpu --device cuda
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import sacrebleu
import torch

from lmlab.run.checkpoint import load_task


def train(experiment: str, args: argparse.Namespace, run_dir: Path, root: Path) -> float:
    data = Path(args.data).resolve()
    source, target = args.direction.split("-")
    command = [
        sys.executable,
        "-m",
        "lmlab.train",
        f"experiment={experiment}",
        "data=translation_files",
        f"data.source.train_files={data / 'train.parquet'}",
        f"data.source.val_files={data / 'validation.parquet'}",
        f"data.source.test_files={data / 'test.parquet'}",
        f"data.source_lang={source}",
        f"data.target_lang={target}",
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
    return time.perf_counter() - start


def decode_test_set(checkpoint: str, args: argparse.Namespace) -> tuple[list[str], list[str], float]:
    """Translations of the test sources with the checkpoint's test decoding, the references, and sentences/s."""
    source, target = args.direction.split("-")
    table = pq.read_table(Path(args.data) / "test.parquet").to_pydict()
    task, _ = load_task(checkpoint, map_location=torch.device(args.device))
    task.translate(table[source][: args.batch_size], batch_size=args.batch_size)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    hypotheses = task.translate(table[source], batch_size=args.batch_size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return hypotheses, table[target], len(hypotheses) / (time.perf_counter() - start)


def run(experiment: str, args: argparse.Namespace, root: Path) -> dict[str, object]:
    run_dir = root / f"{experiment.replace('/', '_')}_{args.direction}"
    wall = train(experiment, args, run_dir, root)
    result = json.loads((run_dir / "metrics.json").read_text())
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    rates = sorted(float(r["perf/tokens_per_sec"]) for r in rows if r.get("perf/tokens_per_sec"))
    hypotheses, references, speed = decode_test_set(result["best_checkpoint"], args)
    metrics = result["metrics"]
    return {
        "experiment": experiment,
        "direction": args.direction,
        "test_bleu": round(metrics["test/bleu"], 2),
        "test_chrf": round(metrics["test/chrf"], 2),
        "test_bleu_lowercase": round(sacrebleu.corpus_bleu(hypotheses, [references], lowercase=True).score, 2),
        "test_bleu_rescored": round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2),
        "best_val_bleu": round(max(float(r["val/bleu"]) for r in rows if r.get("val/bleu")), 2),
        "wall_time_s": round(wall, 1),
        "median_train_target_tokens_per_sec": round(rates[len(rates) // 2], 1) if rates else None,
        "beam_decode_sentences_per_sec": round(speed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder holding Multi30k's train/validation/test parquet")
    parser.add_argument("--direction", choices=["en-de", "de-en"], default="de-en")
    parser.add_argument("--root", default="bench_runs/translation", help="folder for logs and caches")
    parser.add_argument("--device", default="cpu", help="device for the decoding-speed pass")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per decoding batch")
    parser.add_argument("experiments", nargs="+", help="experiment names, e.g. mt/multi30k_cpu")
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
    (root / f"result_{args.direction}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
