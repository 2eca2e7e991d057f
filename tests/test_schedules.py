"""The warm-up + cosine schedule ends where the run ends: at its last step, or at ``max_time`` when that binds."""

from __future__ import annotations

import math
from datetime import timedelta
from types import SimpleNamespace

import lightning.pytorch.callbacks.timer as timer_module
import pytest
from lightning.pytorch.callbacks import Timer

from lightning_modules.schedules import warmup_cosine


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def _trainer(total: int, timer: Timer | None = None, world_size: int = 1) -> SimpleNamespace:
    return SimpleNamespace(estimated_stepping_batches=total, callbacks=[timer] if timer else [], world_size=world_size)


def _cosine(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


def test_step_schedule_without_time_limit():
    factor = warmup_cosine(_trainer(total=110), warmup_steps=10)
    assert [factor(step) for step in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert factor(10) == pytest.approx(1.0) and factor(60) == pytest.approx(0.5) and factor(110) == pytest.approx(0.0)
    assert factor(500) == pytest.approx(0.0)  # never negative past the end
    assert warmup_cosine(_trainer(total=5), warmup_steps=10)(12) == pytest.approx(
        1.0
    )  # no decay when warm-up fills the run


def test_time_limit_takes_over_when_it_binds(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(timer_module, "time", clock)
    timer = Timer(duration=timedelta(seconds=100))
    timer.on_train_start(None, None)
    factor = warmup_cosine(_trainer(total=1010, timer=timer), warmup_steps=10)
    clock.now += 25  # a quarter of the time, 10% of the steps: the clock leads
    assert factor(110) == pytest.approx(_cosine(0.25))
    clock.now += 75  # the time is up: the rate has reached 0 although only 20% of the steps ran
    assert factor(210) == pytest.approx(0.0, abs=1e-12)
    assert factor(5) == pytest.approx(0.6)  # warm-up is by steps only


def test_steps_lead_on_a_fast_machine_and_ranks_ignore_the_clock(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(timer_module, "time", clock)
    timer = Timer(duration=timedelta(seconds=100))
    timer.on_train_start(None, None)
    clock.now += 10  # 10% of the time, 50% of the steps: exactly the step schedule
    assert warmup_cosine(_trainer(total=210, timer=timer), warmup_steps=10)(110) == pytest.approx(_cosine(0.5))
    clock.now += 80  # several ranks would each read their own clock: they keep the step schedule
    assert warmup_cosine(_trainer(total=1010, timer=timer, world_size=2), warmup_steps=10)(110) == pytest.approx(
        _cosine(0.1)
    )
