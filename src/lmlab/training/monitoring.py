"""Gradient monitoring: the gradient norms that show a run diverging or a layer not learning long before the
loss does, and optionally weight and gradient histograms. Only the logging steps read values back from the
device, so the steps between run as fast as without it."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import grad_norm, rank_zero_only


class GradientMonitor(L.Callback):
    """Every ``every_n_steps`` optimizer steps (``None``: never), logs the total gradient norm
    (``grad_2.0_norm_total`` for ``norm_type=2``) and each parameter's (``grad_2.0_norm/<name>``) to every logger,
    and with ``histograms`` each trainable parameter's weights and gradient (``weights/<name>``,
    ``gradients/<name>``) to TensorBoard and W&B.

    The norms are taken just before the optimizer step: after gradient accumulation, and under mixed precision
    after the gradients are unscaled. They are logged at the step of the batch they come from, as the training
    loss is, on the same steps as ``trainer.log_every_n_steps`` would pick. Under DDP the gradients are already
    averaged over processes; under FSDP the norms are those of the first process's shard.
    """

    def __init__(self, every_n_steps: int | None = None, norm_type: float = 2.0, histograms: bool = False) -> None:
        self.every_n_steps, self.norm_type, self.histograms = every_n_steps, norm_type, histograms

    @rank_zero_only
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if not self.every_n_steps or (step + 1) % self.every_n_steps or not trainer.loggers:
            return
        norms = {name: float(norm) for name, norm in grad_norm(pl_module, self.norm_type).items()}
        for logger in trainer.loggers:
            logger.log_metrics(norms, step=step)
        if self.histograms:
            self._log_histograms(trainer, pl_module, step)

    @staticmethod
    def _log_histograms(trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        values: dict[str, torch.Tensor] = {}
        for name, param in pl_module.named_parameters():
            if not param.requires_grad:
                continue
            values[f"weights/{name}"] = param.detach().float().cpu()
            if param.grad is not None:
                values[f"gradients/{name}"] = param.grad.detach().float().cpu()
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for tag, tensor in values.items():
                    logger.experiment.add_histogram(tag, tensor, global_step=step)
            elif isinstance(logger, WandbLogger):
                logger.log_metrics(_wandb_histograms(values), step=step)


def _wandb_histograms(values: dict[str, torch.Tensor]) -> dict[str, Any]:
    import wandb

    return {tag: wandb.Histogram(tensor.numpy()) for tag, tensor in values.items()}
