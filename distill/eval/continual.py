"""The continual-learning accuracy matrix and forgetting (pure, stdlib only)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class ContinualMatrix:
    """One metric measured on every increment's held-out set after each increment is trained.

    A matrix may be partial: a run stopped after increment i has rows 0..i only.
    """

    increments: list[str]
    """Increment names in training order; also the columns."""
    metric: str
    """What the cells hold, e.g. "accuracy", "exact_match" or "ce"."""
    higher_is_better: bool
    """True for accuracy-like metrics, False for losses; decides the sign of forgetting."""
    values: list[list[float | None]]
    """values[i][j]: `metric` on increment j's held-out set after training increment i (None: not evaluated)."""

    def __post_init__(self) -> None:
        n = len(self.increments)
        if len(self.values) > n:
            raise ValueError(f"ContinualMatrix {self.metric!r}: {len(self.values)} rows for {n} increments")
        for i, row in enumerate(self.values):
            if len(row) != n:
                raise ValueError(
                    f"ContinualMatrix {self.metric!r}: row {i} has {len(row)} values, expected {n} (one per increment)"
                )

    def forgetting(self) -> list[float | None]:
        """Per increment j before the last trained one: how much of its best score (after any increment from j
        up to the one before the last) the final student has lost; best - final (final - best for
        lower-is-better metrics). A gain gives a negative number. None for the last trained increment, for
        increments not trained yet and where a needed cell was not evaluated. A NaN final score (a diverged
        student) gives NaN rather than hiding it; NaN earlier scores cannot be the best and are skipped."""
        last = len(self.values) - 1
        out: list[float | None] = []
        for j in range(len(self.increments)):
            final = self.values[last][j] if 0 <= j < last else None
            earlier = [
                v for i in range(j, last) if (v := self.values[i][j]) is not None and not math.isnan(v)
            ]
            if final is None or not earlier:
                out.append(None)
                continue
            best = max(earlier) if self.higher_is_better else min(earlier)
            out.append(best - final if self.higher_is_better else final - best)
        return out

    def average_forgetting(self) -> float:
        """Mean forgetting over the increments before the last trained one (0.0 with a single increment)."""
        values = [f for f in self.forgetting() if f is not None]
        return sum(values) / len(values) if values else 0.0

    def as_dict(self) -> dict:
        """JSON-ready; also carries the derived forgetting figures for readers, which `from_dict` ignores."""
        return {
            **asdict(self),
            "forgetting": self.forgetting(),
            "average_forgetting": self.average_forgetting(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ContinualMatrix:
        return cls(
            list(d["increments"]), d["metric"], bool(d["higher_is_better"]), [list(r) for r in d["values"]]
        )


def relative_reduction(without: float, with_: float) -> float:
    """How much replay reduced forgetting: (without - with_) / without, e.g. 0.75 = three quarters less.

    When the run without replay forgot nothing (without <= 0) there was nothing for replay to reduce, so the
    answer is 0.0 whatever `with_` is: a benchmark target such as ">= 50% less forgetting" then fails instead of
    passing vacuously, which says the setup did not provoke forgetting. Negative results mean replay forgot more.
    """
    if without <= 0:
        return 0.0
    return (without - with_) / without
