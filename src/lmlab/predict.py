"""``lmlab-predict ckpt_path=... input=texts.txt``: classify each line of a file (or of stdin).

Writes one JSON object per non-blank input line: ``{"line": n, "label": ..., "probs": {label: p}}``.
Texts are encoded exactly as the checkpoint's training data was (tokenizer, truncation length,
special tokens) and run in length-sorted batches.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import hydra
import torch
from omegaconf import DictConfig

from lmlab.checkpoint import load_task
from lmlab.config import config_dir, validate_config
from lmlab.data.files import read_text_file
from lmlab.errors import ConfigError, DataError
from lmlab.runtime import user_errors

log = logging.getLogger("lmlab")


def read_texts(source: str | None) -> list[tuple[int, str]]:
    """``(line number, text)`` of every non-blank line of a file, or of stdin for ``None``/``-``."""
    if source in (None, "-"):
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError as err:
            raise DataError(f"stdin is not valid UTF-8 ({err.reason} at byte {err.start}).") from None
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"input: no file at '{path}'. Give a text file with one text per line, or '-' for stdin.")
        text = read_text_file(path)
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1)]
    texts = [(n, line) for n, line in lines if line.strip()]
    blank = len(lines) - len(texts)
    if blank:
        log.warning("Skipped %d blank input line(s); each output line carries its input line number.", blank)
    if not texts:
        raise DataError(f"input: {source or 'stdin'} has no text to classify.")
    return texts


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    validate_config(cfg, schema=None)
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {cfg.batch_size}.")
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


@contextmanager
def _open_output(target: str | None) -> Iterator[TextIO]:
    """stdout for ``None``/``-``, else the file (its folder made if needed)."""
    if target in (None, "-"):
        yield sys.stdout
        return
    path = Path(target).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        yield out


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def main(cfg: DictConfig) -> None:
    with user_errors():
        records = predict(cfg)
    with _open_output(cfg.output) as out:
        write_jsonl(records, out)


if __name__ == "__main__":
    main()
