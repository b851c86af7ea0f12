"""``lmlab-generate ckpt_path=... prompt="..."``: sample text from a trained language model.

Any text can be the prompt: quoted for Hydra on the command line (``"prompt='def f(x): return x'"``),
or read from a file or stdin (``prompt_file=prompt.txt``, ``prompt_file=-``).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from lmlab.config.schema import check_devices, validate_config
from lmlab.errors import ConfigError
from lmlab.inference.inputs import read_input_text
from lmlab.run.checkpoint import check_matches, load_language_model
from lmlab.run.runtime import to_plain, user_errors


def prompt_text(cfg: DictConfig) -> str:
    """``prompt``, or the text of ``prompt_file`` (``-``: stdin), which takes any text without quoting."""
    if cfg.get("prompt_file") is None:
        return cfg.prompt
    if cfg.prompt:
        raise ConfigError("Give prompt or prompt_file, not both.")
    text = read_input_text(cfg.prompt_file, "prompt_file")
    return text[:-1] if text.endswith("\n") else text  # the newline that ends a file or an echo


def generate_samples(cfg: DictConfig, prompt: str | None = None) -> list[str]:
    """Samples continuing ``prompt`` (default: :func:`prompt_text`)."""
    validate_config(cfg, schema=None)
    check_devices(cfg)
    device = torch.device(cfg.device)
    model, run_cfg = load_language_model(cfg.ckpt_path, map_location=device)
    if not hasattr(model, "generate_text"):
        raise ConfigError(f"'{cfg.ckpt_path}' is not a language model checkpoint; lmlab-generate needs one.")
    if cfg.get("model") is not None:
        check_matches(run_cfg, to_plain(cfg.model), "model", cfg.ckpt_path)
    return model.generate_text(
        prompt_text(cfg) if prompt is None else prompt,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k or None,
        top_p=cfg.top_p,
        seed=cfg.seed,
        num_samples=cfg.num_samples,
        stop_at_eos=cfg.stop_at_eos,
    )


def run(cfg: DictConfig) -> None:
    with user_errors():
        prompt = prompt_text(cfg)
        samples = generate_samples(cfg, prompt)
    for i, text in enumerate(samples):
        if len(samples) > 1:
            print(f"----- sample {i + 1}")
        print(prompt + text)


if __name__ == "__main__":
    from lmlab.cli import generate

    generate()
