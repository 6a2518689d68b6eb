"""A warning when one loss term holds nearly all of the gradient for a long stretch (`grad_share/<term>`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

SHARE_PREFIX = "grad_share/"


class DominanceWatch:
    """Reads the `grad_share/<term>` entries of metrics records; warns once per term when that term holds more
    than `threshold` of the gradient on `patience` measured steps in a row while other terms are active.

    A term that drowns the others turns a multi-term recipe into a one-term one without saying so (the
    feature terms of a 96-wide student projected onto a 640-wide teacher did that to the logit KD)."""

    def __init__(self, threshold: float = 0.9, patience: int = 5) -> None:
        self.threshold, self.patience = threshold, patience
        self._streak: dict[str, int] = {}
        self.warned: set[str] = set()

    def observe(self, record: Mapping[str, Any]) -> str | None:
        """Feed one record; returns the warning text the first time a term dominates (else None)."""
        shares = {k[len(SHARE_PREFIX) :]: float(v) for k, v in record.items() if k.startswith(SHARE_PREFIX)}
        if len(shares) < 2:
            return None  # one active term: it holds all of the gradient by definition
        top = max(shares, key=shares.__getitem__)
        for label in shares:
            hit = label == top and shares[label] > self.threshold
            self._streak[label] = self._streak.get(label, 0) + 1 if hit else 0
        if self._streak.get(top, 0) < self.patience or top in self.warned:
            return None
        self.warned.add(top)
        others = ", ".join(f"{k} {v:.1%}" for k, v in sorted(shares.items()) if k != top)
        message = (
            f"loss term {top!r} holds {shares[top]:.1%} of the gradient norm for {self.patience} measured steps "
            f"in a row (step {record.get('step')}, stage {record.get('stage', '-')}; {others}): the other terms "
            f"barely train the student. Lower loss.terms.{top}.weight or that stage's multiplier."
        )
        log.warning(message)
        return message
