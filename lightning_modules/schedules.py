"""Learning-rate schedules that end where the trainer's budget ends."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
from lightning.pytorch.callbacks import Timer


def time_progress(trainer: L.Trainer) -> Callable[[], float]:
    """Share of ``trainer.max_time`` used so far (``0.0`` forever without a time limit or with several processes).

    Lightning stops a run at ``max_time`` wherever it is; a schedule sized for ``max_epochs`` alone would then stop
    mid-decay on a slower machine. The clock is read from Lightning's own ``Timer`` (the one that enforces the limit,
    validation time included, restored on resume). Multi-process runs ignore it: each rank would read its own clock and
    the ranks' learning rates, hence their weights, would drift apart.
    """
    timer = next((callback for callback in trainer.callbacks if isinstance(callback, Timer)), None)
    if timer is None or trainer.world_size > 1:
        return lambda: 0.0

    def progress() -> float:
        remaining = timer.time_remaining("train")
        if remaining is None:
            return 0.0
        elapsed = timer.time_elapsed("train")
        return min(1.0, elapsed / max(elapsed + remaining, 1e-9))

    return progress


def warmup_cosine(trainer: L.Trainer, warmup_steps: int) -> Callable[[int], float]:
    """``LambdaLR`` factor: linear warm-up, then cosine decay to 0 when the run ends.

    The run ends at ``trainer.estimated_stepping_batches`` or at ``max_time``, whichever comes first: after warm-up
    the decay follows the larger of the two progress fractions. When the step count ends the run first, the clock
    never leads and the schedule is exactly the step-based one (deterministic); when the time limit binds, the rate
    still reaches 0 at the last step instead of being cut off mid-decay.

    A closure, not a callable object: ``LambdaLR.state_dict`` would try to pickle an object's ``__dict__`` (the
    trainer) into every checkpoint.
    """
    total = trainer.estimated_stepping_batches
    total = int(total) if math.isfinite(total) else 0
    clock = time_progress(trainer)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        by_steps = (step - warmup_steps) / (total - warmup_steps) if total > warmup_steps else 0.0
        progress = min(1.0, max(by_steps, clock()))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
