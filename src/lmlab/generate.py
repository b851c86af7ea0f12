"""``lmlab-generate ckpt_path=... prompt="..."``: sample text from a trained language model."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from lmlab.checkpoint import check_matches, load_task
from lmlab.cli import lmlab_main
from lmlab.config import check_devices, validate_config
from lmlab.errors import ConfigError
from lmlab.runtime import to_plain, user_errors


def generate_samples(cfg: DictConfig) -> list[str]:
    validate_config(cfg, schema=None)
    check_devices(cfg)
    device = torch.device(cfg.device)
    task, run_cfg = load_task(cfg.ckpt_path, map_location=device)
    if not hasattr(task, "generate_text"):
        raise ConfigError(f"'{cfg.ckpt_path}' is not a language model checkpoint; lmlab-generate needs one.")
    if cfg.get("model") is not None:
        check_matches(run_cfg, to_plain(cfg.model), "model", cfg.ckpt_path)
    return task.generate_text(
        cfg.prompt, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
        top_p=cfg.top_p, seed=cfg.seed, num_samples=cfg.num_samples, stop_at_eos=cfg.stop_at_eos,
    )


@lmlab_main("generate")
def main(cfg: DictConfig) -> None:
    with user_errors():
        samples = generate_samples(cfg)
    for i, text in enumerate(samples):
        if len(samples) > 1:
            print(f"----- sample {i + 1}")
        print(cfg.prompt + text)


if __name__ == "__main__":
    main()
