"""``lmlab-predict ckpt_path=... input=texts.txt``: classify each line of a file (or of stdin).

Writes one JSON object per non-blank input line: ``{"line": n, "label": ..., "probs": {label: p}}``.
Texts are encoded exactly as the checkpoint's training data was (tokenizer, truncation length,
special tokens) and run in length-sorted batches.
"""

from __future__ import annotations

import json
import logging
from typing import Any, TextIO

import torch
from omegaconf import DictConfig

from lmlab.checkpoint import load_task
from lmlab.config import check_devices, validate_config
from lmlab.errors import ConfigError
from lmlab.runtime import user_errors
from lmlab.textio import open_output, read_input_lines

log = logging.getLogger("lmlab")


def read_texts(source: str | None) -> list[tuple[int, str]]:
    """``(line number, text)`` of every non-blank line of a file, or of stdin for ``None``/``-``."""
    lines = list(enumerate(read_input_lines(source), start=1))
    texts = [(n, line) for n, line in lines if line.strip()]
    blank = len(lines) - len(texts)
    if blank:
        log.warning("Skipped %d blank input line(s); each output line carries its input line number.", blank)
    return texts


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    validate_config(cfg, schema=None)
    check_devices(cfg)
    task, _ = load_task(cfg.ckpt_path, map_location=torch.device(cfg.device))
    if not hasattr(task, "predict_proba"):
        raise ConfigError(f"'{cfg.ckpt_path}' is not a text-classification checkpoint; lmlab-predict needs one.")
    numbered = read_texts(cfg.input)
    probs = task.predict_proba([text for _, text in numbered], batch_size=cfg.batch_size)
    labels = task.labels
    return [
        {"line": n, "label": labels[int(row.argmax())], "probs": dict(zip(labels, row.tolist(), strict=True))}
        for (n, _), row in zip(numbered, probs, strict=True)
    ]


def write_jsonl(records: list[dict[str, Any]], out: TextIO) -> None:
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")


def run(cfg: DictConfig) -> None:
    with user_errors():
        records = predict(cfg)
    with open_output(cfg.output) as out:
        write_jsonl(records, out)


if __name__ == "__main__":
    from lmlab.cli import predict

    predict()
