"""``lmlab-translate ckpt_path=... input=src.txt beam_size=5``: translate each line of a file (or stdin).

Writes one line per input line (a blank input line gives a blank output line, so the output stays
aligned with the input). Sentences are encoded exactly as the checkpoint's training sources were and
decoded in length-sorted batches; decoding settings not given are the checkpoint's test decoding. It is
``lmlab-predict`` for translation checkpoints.
"""

from __future__ import annotations

from omegaconf import DictConfig

from lmlab.config.schema import check_devices, validate_config
from lmlab.errors import ConfigError
from lmlab.inference.inputs import read_input_lines
from lmlab.predict import task_options, write_lines
from lmlab.run.checkpoint import load_task
from lmlab.run.runtime import user_errors
from lmlab.run.safe_output import check_output, open_output

DECODING_KEYS = ("batch_size", "beam_size", "length_penalty", "max_length_ratio", "max_length_offset")


def translate(cfg: DictConfig) -> list[str]:
    validate_config(cfg, schema=None)
    check_devices(cfg)
    check_output(cfg.output)  # before the work, so a mistake costs nothing
    task, _ = load_task(cfg.ckpt_path, map_location=cfg.device)
    if not task.aligned_output:
        raise ConfigError(f"'{cfg.ckpt_path}' is not a translation checkpoint; lmlab-translate needs one.")
    return task.infer(read_input_lines(cfg.input), **task_options(task, cfg, DECODING_KEYS))


def run(cfg: DictConfig) -> None:
    with user_errors():
        lines = translate(cfg)
        with open_output(cfg.output) as out:  # a file is written whole or not at all
            write_lines(lines, out)


if __name__ == "__main__":
    from lmlab.cli import translate as main

    main()
