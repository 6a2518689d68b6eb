"""Figures that every metrics record carries besides the trainer's own (both paths, so W&B sees one schema)."""

from __future__ import annotations

import time


class RateMeter:
    """Tokens per second between two `take()` calls, from explicitly timed work (`add`) or wall time."""

    def __init__(self) -> None:
        self.tokens, self.seconds, self._since = 0, 0.0, time.perf_counter()

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    def take(self, wall: bool = False) -> float:
        """The rate since the last take, over the timed seconds (or the wall time with `wall=True`)."""
        now = time.perf_counter()
        seconds = (now - self._since) if wall else self.seconds
        rate = self.tokens / max(seconds, 1e-9)
        self.tokens, self.seconds, self._since = 0, 0.0, now
        return rate
