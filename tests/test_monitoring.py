"""The gradient monitor logs, on its interval only, the gradient norms an independent replay of the same training
computes before each optimizer step."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader

from lmlab.training.monitoring import GradientMonitor

BATCHES = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(0))
LR = 0.1


class Regression(L.LightningModule):
    """Two linear layers fitting the inputs' sum: the gradients change from step to step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return loss_of(self.net, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def loss_of(net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return (net(batch).squeeze(-1) - batch.sum(-1)).pow(2).mean()


class Recorder(Logger):
    """Keeps what reaches ``log_metrics``, with its step."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))


def _fit(monitor: GradientMonitor) -> tuple[Regression, list[tuple[int | None, dict[str, float]]]]:
    torch.manual_seed(0)
    model, recorder = Regression(), Recorder()
    start = copy.deepcopy(model.net)
    trainer = L.Trainer(
        max_steps=len(BATCHES),
        logger=recorder,
        callbacks=[monitor],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    trainer.fit(model, DataLoader(list(BATCHES), batch_size=None))
    norms = [(step, m) for step, m in recorder.logged if any(key.startswith("grad_") for key in m)]
    return start, norms


def _replay(net: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Each step's gradients, by plain PyTorch: backward, read the gradients, step."""
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    grads = []
    for batch in BATCHES:
        optimizer.zero_grad()
        loss_of(net, batch).backward()
        grads.append({f"net.{name}": p.grad.clone() for name, p in net.named_parameters()})
        optimizer.step()
    return grads


@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_norms_at_the_interval_equal_a_replay(norm_type: float) -> None:
    start, logged = _fit(GradientMonitor(every_n_steps=2, norm_type=norm_type))
    grads = _replay(start)
    assert [step for step, _ in logged] == [1, 3, 5]  # the second, fourth and sixth step, as the loss is logged
    for step, metrics in logged:
        expected = {name: torch.linalg.vector_norm(g, ord=norm_type).item() for name, g in grads[step].items()}
        total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads[step].values()]), ord=norm_type)
        prefix = f"grad_{norm_type}_norm"
        assert metrics == pytest.approx(
            {**{f"{prefix}/{name}": value for name, value in expected.items()}, f"{prefix}_total": total.item()},
            rel=1e-5,
        )
    # finite, and different at each step: a norm of the wrong step would not match
    totals = [metrics[f"grad_{norm_type}_norm_total"] for _, metrics in logged]
    assert all(math.isfinite(total) for total in totals) and len({round(total, 3) for total in totals}) == 3


def test_nothing_is_logged_when_off() -> None:
    _, logged = _fit(GradientMonitor(every_n_steps=None, histograms=True))
    assert logged == []
