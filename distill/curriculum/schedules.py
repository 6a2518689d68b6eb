"""Value schedules over a stage: constant, linear or cosine from a start value to an end value (either direction).

Pure functions of the progress through a stage, so a run resumed at any step recomputes exactly the value the
uninterrupted run used there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distill.errors import ConfigError

RAMP_KINDS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Ramp:
    """A value that moves from `start` to `end` over a stage; `end=None` keeps it at `start`."""

    start: float
    end: float | None = None
    kind: str = "constant"

    def __post_init__(self) -> None:
        if self.kind not in RAMP_KINDS:
            raise ConfigError(f"schedule {self.kind!r} is not one of {list(RAMP_KINDS)}.")

    def at(self, step: int, length: int) -> float:
        """The value at `step` (0-based) of a stage of `length` steps: `start` at step 0, `end` at the last."""
        return ramp_value(self.kind, self.start, self.start if self.end is None else self.end, step, length)


def ramp_value(kind: str, start: float, end: float, step: int, length: int) -> float:
    """start -> end over steps 0 .. length-1 (both ends reached); one-step stages hold `start`."""
    if kind == "constant" or length <= 1 or start == end:
        return float(start)
    progress = min(max(step / (length - 1), 0.0), 1.0)
    if kind == "linear":
        return start + (end - start) * progress
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"schedule {kind!r} is not one of {list(RAMP_KINDS)}.")
