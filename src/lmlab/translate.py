"""``lmlab-translate ckpt_path=... input=src.txt beam_size=5``: translate each line of a file (or stdin).

Writes one line per input line (a blank input line gives a blank output line, so the output stays
aligned with the input). Sentences are encoded exactly as the checkpoint's training sources were and
decoded in length-sorted batches; decoding settings not given are the checkpoint's test decoding.
"""

from __future__ import annotations

import dataclasses

import torch
from omegaconf import DictConfig

from lmlab.checkpoint import load_task
from lmlab.config import check_devices, validate_config
from lmlab.errors import ConfigError
from lmlab.runtime import user_errors
from lmlab.tasks.translation import Decoding
from lmlab.textio import open_output, read_input_lines

DECODING_KEYS = ("beam_size", "length_penalty", "max_length_ratio", "max_length_offset")


def translate(cfg: DictConfig) -> list[str]:
    validate_config(cfg, schema=None)
    check_devices(cfg)
    task, _ = load_task(cfg.ckpt_path, map_location=torch.device(cfg.device))
    if not hasattr(task, "translate"):
        raise ConfigError(f"'{cfg.ckpt_path}' is not a translation checkpoint; lmlab-translate needs one.")
    given = {key: cfg[key] for key in DECODING_KEYS if cfg.get(key) is not None}
    settings = Decoding.from_config({**dataclasses.asdict(task.decoding["test"]), **given}, "lmlab-translate")
    return task.translate(read_input_lines(cfg.input), settings, batch_size=cfg.batch_size)


def run(cfg: DictConfig) -> None:
    with user_errors():
        lines = translate(cfg)
    with open_output(cfg.output) as out:
        for line in lines:
            out.write(line + "\n")


if __name__ == "__main__":
    from lmlab.cli import translate

    translate()
