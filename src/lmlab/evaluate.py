"""``lmlab-eval ckpt_path=...``: re-evaluate a checkpoint on its validation and test splits.

Everything needed (network, tokenizer, data settings) comes from the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from lmlab.checkpoint import check_matches, load_task
from lmlab.cli import lmlab_main
from lmlab.config import check_devices, validate_config
from lmlab.errors import ConfigError
from lmlab.runtime import instantiate, to_plain, user_errors

_STAGES = {"validation", "test"}


def evaluate(cfg: DictConfig) -> dict[str, float]:
    validate_config(cfg, schema=None)
    check_devices(cfg)
    unknown = set(cfg.splits) - _STAGES
    if unknown:
        raise ConfigError(f"splits: unknown split(s) {sorted(unknown)}; use validation and/or test.")
    task, run_cfg = load_task(cfg.ckpt_path)
    if cfg.get("model") is not None:
        check_matches(run_cfg, to_plain(cfg.model), "model", cfg.ckpt_path)
    data_cfg = cfg.data if cfg.get("data") is not None else OmegaConf.create(run_cfg["data"])
    datamodule = instantiate(data_cfg, **task.datamodule_kwargs())
    datamodule.prepare_data()
    datamodule.setup("validate")
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_model_summary=False)
    metrics: dict[str, float] = {}
    for split in cfg.splits:
        run = trainer.validate if split == "validation" else trainer.test
        loader = datamodule.val_dataloader() if split == "validation" else datamodule.test_dataloader()
        for result in run(task, dataloaders=loader, verbose=False):
            metrics.update({k: float(v) for k, v in result.items()})
    if trainer.is_global_zero:
        for key in sorted(metrics):
            print(f"{key}: {metrics[key]:.4f}")
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"ckpt_path": str(cfg.ckpt_path), "metrics": metrics}, indent=2))
    return metrics


@lmlab_main("eval")
def main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
