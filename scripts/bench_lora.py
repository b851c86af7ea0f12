"""LoRA against full fine-tuning of a 124M-class causal LM: peak GPU memory and tokens/s, through lmlab-train.

Saves a GPT-2-small-sized model (12 layers, 768 dims, 50,257 embedding rows; random weights, so nothing is
downloaded: memory and speed do not depend on the values) and a byte-level BPE tokenizer trained on the
text, then fine-tunes it twice on the same text with the same settings: every weight (``model.lora.r=0``),
and rank-``--rank`` adapters on every linear layer (``c_attn``, ``c_proj``, ``c_fc``). Prints, per run, the
trainable parameters, the median ``perf/tokens_per_sec``, the peak ``perf/max_memory_gib`` (on a GPU) and the
ratios LoRA / full. On one GPU:

    python scripts/bench_lora.py --text ../shared/data/wikitext-2/train.parquet trainer=gpu

``--tiny`` shrinks the model (2 layers, 64 dims) to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True, help="training text: a .txt file, or a .parquet/.jsonl with 'text'")
    parser.add_argument("--root", default="bench_runs/lora", help="folder for the model, logs and cache")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-dim model, to check the script")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs (e.g. trainer=gpu)")
    args = parser.parse_args()

    root = Path(args.root).resolve()
    folder = save_model(root / "model", Path(args.text), args.tiny)
    runs = {
        "full": run(root, "full", folder, Path(args.text), args.steps, ["model.lora.r=0", *args.overrides]),
        f"lora r={args.rank}": run(
            root,
            "lora",
            folder,
            Path(args.text),
            args.steps,
            [
                f"model.lora.r={args.rank}",
                f"model.lora.alpha={2 * args.rank}",
                "model.lora.dropout=0.0",
                "model.lora.target_modules=[c_attn,c_proj,c_fc]",
                *args.overrides,
            ],
        ),
    }
    (root / "result.json").write_text(json.dumps(runs, indent=2))
    full, lora = runs.values()
    print("| | " + " | ".join(runs) + " | LoRA / full |")
    print("|---|---|---|---|")
    for key, label in (
        ("trainable", "trainable parameters"),
        ("tokens_per_sec", "median tokens/s"),
        ("max_memory_gib", "peak GPU memory (GiB)"),
    ):
        a, b = full[key], lora[key]
        ratio = f"{b / a:.3f}" if a and b else "-"
        print(f"| {label} | {_fmt(a)} | {_fmt(b)} | {ratio} |")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def save_model(folder: Path, text: Path, tiny: bool) -> Path:
    """A randomly initialised GPT-2-sized model and a BPE tokenizer of its text, saved as a hub model is."""
    import transformers

    from lmlab.data.text_sources import TextFiles
    from lmlab.tokenizers import train_bpe

    if (folder / "config.json").is_file():
        return folder
    train = TextFiles(str(text), val_fraction=0.0, test_fraction=0.0).load(["train"])["train"]
    tokenizer = train_bpe([train], vocab_size=8192)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    sizes = {"n_layer": 2, "n_embd": 64, "n_head": 2} if tiny else {"n_layer": 12, "n_embd": 768, "n_head": 12}
    config = transformers.GPT2Config(vocab_size=50257, n_positions=1024, eos_token_id=tokenizer.eos_id, **sizes)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def run(root: Path, name: str, folder: Path, text: Path, steps: int, extra: list[str]) -> dict:
    """One fine-tuning run; its trainable parameters, median tokens/s and peak GPU memory."""
    out = root / name
    command = [
        sys.executable,
        "-m",
        "lmlab.train",
        "model=hf_causal_lm",
        f"model.name_or_path={folder}",
        "tokenizer=pretrained",
        f"tokenizer.name_or_path={folder}",
        "data=text_files",
        f"data.source.train_files={text.resolve()}",
        "data.source.val_fraction=0.01",
        "data.block_size=512",
        "data.batch_size=8",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.limit_val_batches=2",
        "test=false",
        "callbacks.samples=null",
        "print_config=false",
        f"hydra.run.dir={out}",
        f"paths.root_dir={root}",
        *extra,
    ]
    print(" ".join(command), flush=True)
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    rates = [float(r["perf/tokens_per_sec"]) for r in rows if r.get("perf/tokens_per_sec")]
    memory = [float(r["perf/max_memory_gib"]) for r in rows if r.get("perf/max_memory_gib")]
    counted = re.search(r"parameters: ([\d,]+) trainable of ([\d,]+)", done.stdout + done.stderr)
    return {
        "trainable": int(counted.group(1).replace(",", "")) if counted else None,
        "total": int(counted.group(2).replace(",", "")) if counted else None,
        "tokens_per_sec": sorted(rates)[len(rates) // 2] if rates else None,
        "max_memory_gib": max(memory) if memory else None,
    }


if __name__ == "__main__":
    main()
