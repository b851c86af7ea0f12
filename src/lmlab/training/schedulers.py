"""Learning-rate schedules, each returning a Lightning ``lr_scheduler`` config dict.

The step-based schedules are :class:`~torch.optim.lr_scheduler.LambdaLR` over small picklable
multiplier objects, so their state in a checkpoint is plain numbers.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from lmlab.errors import ConfigError

#: ``scheduler.decay``: what follows the warmup
Decay = Literal["cosine", "linear", "inverse_sqrt", "constant"]
DECAYS: tuple[str, ...] = get_args(Decay)


class WarmupThenDecay:
    """LR multiplier: linear warmup from 0 to 1, then ``cosine``/``linear`` decay to ``min_lr_ratio``,
    ``inverse_sqrt`` decay (``sqrt(warmup_steps / step)``, the Transformer schedule of Vaswani et al.,
    floored at ``min_lr_ratio``), or ``constant``."""

    def __init__(self, warmup_steps: int, total_steps: int, decay: Decay, min_lr_ratio: float) -> None:
        if decay not in DECAYS:
            raise ConfigError(f"scheduler.decay must be one of {', '.join(DECAYS)}, got {decay!r}.")
        self.warmup_steps, self.total_steps = warmup_steps, max(total_steps, 1)
        self.decay, self.min_lr_ratio = decay, min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.decay == "constant":
            return 1.0
        if self.decay == "inverse_sqrt":
            return max(self.min_lr_ratio, math.sqrt(max(self.warmup_steps, 1) / max(step, 1)))
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


def warmup_decay(
    optimizer: Optimizer,
    total_steps: int,
    decay: Decay = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    decay_steps: int | None = None,
) -> dict[str, Any]:
    """Per-step schedule; ``decay_steps`` defaults to the run's total optimizer steps."""
    lam = WarmupThenDecay(warmup_steps, decay_steps or total_steps, decay, min_lr_ratio)
    return {"scheduler": LambdaLR(optimizer, lam), "interval": "step"}


def plateau(
    optimizer: Optimizer,
    total_steps: int,
    monitor: str = "val/loss",
    mode: str = "min",
    factor: float = 0.5,
    patience: int = 2,
    min_lr: float = 0.0,
) -> dict[str, Any]:
    """Reduce the LR when the monitored validation metric stops improving (checked after validation)."""
    del total_steps  # the same call shape as the step schedules
    sched = ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience, min_lr=min_lr)
    return {"scheduler": sched, "monitor": monitor, "interval": "epoch", "strict": True}
