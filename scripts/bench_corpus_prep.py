"""Preparing a large language-modeling corpus: lmlab against raw ``tokenizers.encode_batch``, side by side.

Writes synthetic corpora of ``--mb`` megabytes each by reshuffling the lines of a local text data set (WikiText-2's
train split by default; written under ``--root``, never into the project) and trains one byte-level BPE
tokenizer (``--vocab-size``) on the first of them. Then, for each corpus, each in a fresh process:

- **lmlab** (once per ``--num-proc``): ``LMDataModule(TextFiles(corpus))`` with that tokenizer prepares a fresh
  cache entry, as ``lmlab-train data=text_files`` does: a counting pass to carve the validation split (10%),
  then reading, tokenizing and writing both splits to token shards;
- **raw**: the same tokenizer encoding the same text with ``encode_batch``, 4 MB of lines at a time, each
  batch's ids written to one file as uint16: the floor a pipeline can reach;

and prints wall time, tokens/s and peak memory (the largest sum of the proportional set size of the process and
its children, which counts pages they share once, sampled every 0.2 s) of each, and lmlab's tokens/s as a ratio
of raw's measured in the same run:

    python scripts/bench_corpus_prep.py --mb 100 --mb 1000
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

CHUNK_CHARS = 4 << 20

LMLAB = """
import json, sys, time
from lmlab.data.lm import LMDataModule
from lmlab.data.text_sources import TextFiles
from lmlab.tokenizers import load_pretrained

corpus, tokenizer, cache, num_proc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
start = time.perf_counter()
dm = LMDataModule(TextFiles(corpus, val_fraction=0.1), load_pretrained(name_or_path=tokenizer), num_proc=num_proc,
                  cache_dir=cache)
dm.prepare_data()
seconds = time.perf_counter() - start
meta = json.loads((dm._cache / "meta.json").read_text())
print(json.dumps({"tokens": sum(s["tokens"] for s in meta["splits"].values()), "seconds": seconds}))
"""

RAW = """
import json, sys, time
import numpy as np
from tokenizers import Tokenizer

tokenizer = Tokenizer.from_file(sys.argv[1])
tokens, start = 0, time.perf_counter()
with open(sys.argv[2], encoding="utf-8") as text, open(sys.argv[3], "wb") as out:
    carry = ""
    while True:
        chunk = text.read(CHUNK)
        block = carry + chunk
        cut = block.rfind("\\n") + 1 if chunk else len(block)
        block, carry = block[:cut], block[cut:]
        if not block:
            break
        encodings = tokenizer.encode_batch(block.splitlines(keepends=True), add_special_tokens=False)
        ids = np.concatenate([np.asarray(e.ids, dtype=np.uint16) for e in encodings])
        out.write(ids.tobytes())
        tokens += len(ids)
print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - start}))
"""


def make_corpus(path: Path, megabytes: int, source: Path, seed: int = 0) -> Path:
    """``megabytes`` MB of the source's lines in random orders, one shuffle after another."""
    import pyarrow.parquet as pq

    if path.is_file() and path.stat().st_size >= megabytes * 10**6:
        return path
    lines = [line for line in pq.read_table(source, columns=["text"]).column("text").to_pylist() if line.strip()]
    rng, written = random.Random(seed), 0
    with path.open("w", encoding="utf-8") as out:
        while written < megabytes * 10**6:
            rng.shuffle(lines)
            for line in lines:
                out.write(line)
                written += len(line.encode("utf-8"))
                if written >= megabytes * 10**6:
                    break
    return path


def measured(command: list[str]) -> dict:
    """What ``command`` prints last (JSON), with its wall time and peak memory of its process tree."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, watched = [0], psutil.Process(proc.pid)

    def sample() -> None:
        while proc.poll() is None:
            try:
                tree = [watched, *watched.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_full_info().pss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "wall_s": time.perf_counter() - start, "peak_gb": peak[0] / 1e9}


def train_tokenizer(corpus: Path, vocab_size: int, out: Path) -> Path:
    """A byte-level BPE tokenizer trained by lmlab on the first 50M characters of ``corpus``, saved for both sides."""
    from lmlab.data.text_sources import TextFiles
    from lmlab.tokenizers import train_bpe

    if not out.is_file():
        tokenizer = train_bpe(
            TextFiles(str(corpus)).streams(["train"])["train"], vocab_size, train_max_chars=50_000_000
        )
        tokenizer.backend.save(str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, action="append", help="corpus size in megabytes (repeatable)")
    parser.add_argument("--num-proc", type=int, action="append", help="lmlab's data.num_proc (repeatable)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--source", default="../shared/data/wikitext-2/train.parquet")
    parser.add_argument("--root", default="bench_runs/corpus")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    sizes, procs = args.mb or [100], args.num_proc or [1, 2]
    corpora = {mb: make_corpus(root / f"corpus_{mb}mb.txt", mb, Path(args.source).resolve()) for mb in sizes}
    tokenizer = train_tokenizer(corpora[sizes[0]], args.vocab_size, root / f"bpe{args.vocab_size}.json")
    report = []
    for mb, corpus in corpora.items():
        ids_file, cache = root / "raw_ids.bin", root / "cache"
        raw = measured(
            [sys.executable, "-c", RAW.replace("CHUNK", str(CHUNK_CHARS)), str(tokenizer), str(corpus), str(ids_file)]
        )
        ids_file.unlink()
        row = {"corpus_mb": mb, "raw": _summary(raw)}
        for n in procs:
            shutil.rmtree(cache, ignore_errors=True)
            done = measured([sys.executable, "-c", LMLAB, str(corpus), str(tokenizer), str(cache), str(n)])
            summary = _summary(done)
            summary["tokens_per_s_vs_raw"] = round(summary["tokens_per_s"] / row["raw"]["tokens_per_s"], 3)
            row[f"lmlab_num_proc_{n}"] = summary
        shutil.rmtree(cache, ignore_errors=True)
        report.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(report, indent=2))


def _summary(result: dict) -> dict:
    return {
        "tokens": result["tokens"],
        "seconds": round(result["seconds"], 1),
        "wall_s": round(result["wall_s"], 1),
        "tokens_per_s": round(result["tokens"] / result["seconds"]),
        "peak_gb": round(result["peak_gb"], 3),
    }


if __name__ == "__main__":
    main()
