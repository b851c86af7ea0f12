"""``lmlab-predict ckpt_path=... input=texts.txt``: what a checkpoint's task makes of each line of a file (or stdin).

The checkpoint says its task, and the task says what it makes of a text:

- a **classifier**: one JSON object per non-blank line, ``{"line": n, "label": ..., "probs": {label: p}}``;
- a **language model**: one JSON object per non-blank line, ``{"line": n, "samples": [continuation, ...]}``
  (each line a prompt; the options of ``lmlab-generate``);
- a **translation model**: one output line per input line, a blank line for a blank line (the options of
  ``lmlab-translate``).

Texts are encoded exactly as the checkpoint's training data was. An option the task does not take is an error
naming the options it takes. ``lmlab-generate`` and ``lmlab-translate`` are the same inference with their own
input conventions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, TextIO

import torch
from omegaconf import DictConfig

from lmlab.config.schema import check_devices, validate_config
from lmlab.errors import ConfigError
from lmlab.inference.inputs import read_input_lines
from lmlab.run.checkpoint import load_language_model
from lmlab.run.runtime import user_errors
from lmlab.run.safe_output import check_output, open_output

log = logging.getLogger("lmlab")

#: every option of the tasks' inference that predict.yaml carries (null: the task's default)
OPTIONS = (
    "batch_size",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "num_samples",
    "stop_at_eos",
    "beam_size",
    "length_penalty",
    "max_length_ratio",
    "max_length_offset",
)


def load_predictor(ckpt_path: str, device: str) -> Any:
    """What infers for the checkpoint's task: a language model is loaded without Lightning (fast), any other
    task as its LightningModule."""
    return load_language_model(ckpt_path, map_location=torch.device(device))[0]


def task_options(predictor: Any, cfg: DictConfig, keys: Sequence[str] = OPTIONS) -> dict[str, Any]:
    """The options given (not null) among ``keys``; one the task does not take is an error."""
    given = {key: cfg[key] for key in keys if cfg.get(key) is not None}
    taken = predictor.infer_options
    foreign = sorted(set(given) - set(taken))
    if foreign:
        raise ConfigError(
            f"{foreign[0]}: this checkpoint's task ({type(predictor).__name__}) takes no such option; "
            f"it takes {', '.join(taken)}."
        )
    return given


def predict(cfg: DictConfig) -> list[Any]:
    """The outputs for ``cfg.input``: a line of text each for an aligned task, else a record each, with its line."""
    validate_config(cfg, schema=None)
    check_devices(cfg)
    check_output(cfg.output)  # before the work, so a mistake costs nothing
    predictor = load_predictor(cfg.ckpt_path, cfg.device)
    options = task_options(predictor, cfg)
    lines = read_input_lines(cfg.input)
    if predictor.aligned_output:
        return predictor.infer(lines, **options)
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if len(numbered) < len(lines):
        log.warning(
            "Skipped %d blank input line(s); each output line carries its input line number.",
            len(lines) - len(numbered),
        )
    records = predictor.infer([text for _, text in numbered], **options)
    return [{"line": n, **record} for (n, _), record in zip(numbered, records, strict=True)]


def write_lines(outputs: Sequence[Any], out: TextIO) -> None:
    """One line per output: text as it is, a record as JSON."""
    for output in outputs:
        out.write((output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)) + "\n")


def run(cfg: DictConfig) -> None:
    with user_errors():
        outputs = predict(cfg)
        with open_output(cfg.output) as out:  # a file is written whole or not at all
            write_lines(outputs, out)


if __name__ == "__main__":
    from lmlab.cli import predict as main

    main()
