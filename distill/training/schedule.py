"""Learning-rate schedules as pure functions of the step (the curriculum may restart them per stage)."""

from __future__ import annotations

import math

from distill.errors import ConfigError

SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(
    step: int, total_steps: int, *, schedule: str, warmup_steps: int, min_ratio: float
) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warm-up, then decay to min_ratio."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={schedule!r} is not one of {SCHEDULES}.")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def optim_lr(optim, total_steps: int):
    """step -> LR multiplier of `optim.*` (warm-up, then `optim.schedule` over `total_steps`): a plain function,
    as `curriculum_lr`."""

    def multiplier(step: int) -> float:
        return lr_multiplier(
            step,
            total_steps,
            schedule=optim.schedule,
            warmup_steps=optim.warmup_steps,
            min_ratio=optim.min_lr_ratio,
        )

    return multiplier


def curriculum_lr(curriculum, *, schedule: str, warmup_steps: int, min_ratio: float):
    """step -> LR multiplier that restarts (warm-up and decay) at every stage with `restart_lr`.

    A plain function (not a bound method or object) so LambdaLR does not try to save it in its state_dict.
    """
    last = curriculum.total_steps - 1

    def multiplier(step: int) -> float:
        # LambdaLR evaluates one step past the end after the last optimizer step; hold the final value.
        within, length = curriculum.lr_segment(min(step, last))
        return lr_multiplier(
            within,
            length,
            schedule=schedule,
            warmup_steps=warmup_steps,
            min_ratio=min_ratio,
        )

    return multiplier
