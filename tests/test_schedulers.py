"""Learning-rate schedules: warmup, then each decay against its closed form."""

from __future__ import annotations

import math

import pytest

from lmlab.errors import ConfigError
from lmlab.training.schedulers import WarmupThenDecay


def test_warmup_rises_linearly_to_the_full_rate() -> None:
    schedule = WarmupThenDecay(warmup_steps=9, total_steps=100, decay="cosine", min_lr_ratio=0.1)
    assert [schedule(s) for s in range(9)] == pytest.approx([(s + 1) / 10 for s in range(9)])
    assert schedule(9) == pytest.approx(1.0)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_decay_follows_its_closed_form_down_to_the_floor(decay: str) -> None:
    warmup, total, floor = 10, 110, 0.1
    schedule = WarmupThenDecay(warmup_steps=warmup, total_steps=total, decay=decay, min_lr_ratio=floor)
    for step in (10, 35, 60, 85, 110, 500):
        progress = min((step - warmup) / (total - warmup), 1.0)
        shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress}.get(decay)
        expected = 1.0 if shape is None else floor + (1 - floor) * shape
        assert schedule(step) == pytest.approx(expected), step
    if decay != "constant":
        assert schedule(60) == pytest.approx(0.55) and schedule(500) == pytest.approx(floor)


def test_unknown_decay_names_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError, match="scheduler.decay must be one of cosine, linear, inverse_sqrt, constant"):
        WarmupThenDecay(warmup_steps=0, total_steps=10, decay="exponential", min_lr_ratio=0.0)


def test_inverse_sqrt_schedule() -> None:
    schedule = WarmupThenDecay(warmup_steps=100, total_steps=10_000, decay="inverse_sqrt", min_lr_ratio=0.0)
    assert schedule(49) == pytest.approx(0.5, abs=0.01)
    assert schedule(100) == pytest.approx(1.0)
    assert schedule(400) == pytest.approx(0.5) and schedule(10_000) == pytest.approx(0.1)
    assert schedule(40_000) == pytest.approx(0.05), "keeps falling past the run's planned length"
