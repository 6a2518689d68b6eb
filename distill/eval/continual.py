"""The continual-learning accuracy matrix and forgetting (pure)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class ContinualMatrix:
    """values[i][j]: `metric` on increment j's held-out set after training increment i (None: not evaluated)."""

    increments: list[str]
    metric: str
    higher_is_better: bool
    values: list[list[float | None]]

    def forgetting(self) -> list[float | None]:
        """Per increment j before the last trained one: how much of its best score (after any increment from j
        on) the final student has lost; best - final (final - best for lower-is-better metrics). A gain gives
        a negative number. None for the last increment and for increments not yet trained."""
        last = len(self.values) - 1
        out: list[float | None] = []
        for j in range(len(self.increments)):
            earlier = [self.values[i][j] for i in range(j, last) if self.values[i][j] is not None]
            final = self.values[last][j] if last >= 0 else None
            if j >= last or not earlier or final is None:
                out.append(None)
                continue
            best = max(earlier) if self.higher_is_better else min(earlier)
            out.append(best - final if self.higher_is_better else final - best)
        return out

    def average_forgetting(self) -> float:
        """Mean forgetting over the increments before the last trained one (0.0 with one increment)."""
        values = [f for f in self.forgetting() if f is not None]
        return sum(values) / len(values) if values else 0.0

    def as_dict(self) -> dict:
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
    """How much replay reduced forgetting: (without - with_) / without. Without any forgetting to reduce
    (without <= 0) there is nothing to reduce: 0.0 (or 1.0 when replay shows no forgetting either)."""
    if without <= 0:
        return 1.0 if with_ <= 0 else 0.0
    return (without - with_) / without
