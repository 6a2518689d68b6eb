"""metrics.jsonl: one JSON object per logged step, appended and flushed so a killed run keeps its history."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.io import atomic_write_text
from distill.tracking.dominance import DominanceWatch


class MetricsLog:
    """`mirror` also receives every record (e.g. `WandbLog.log`, which only queues it); the `watch` reads each
    record's gradient shares and warns once when one term drowns the others."""

    def __init__(
        self,
        path: str | Path,
        mirror: Callable[[dict[str, Any]], None] | None = None,
        watch: DominanceWatch | None = None,
    ) -> None:
        self.path, self.mirror = Path(path), mirror
        self.watch = watch or DominanceWatch()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        self.watch.observe(record)
        if self.mirror is not None:
            self.mirror(record)

    def rewind(self, step: int) -> None:
        """Forget the records of steps >= `step` (a restored checkpoint trains them again); atomic rewrite."""
        self._file.close()
        kept = [r for r in read_metrics(self.path) if r["step"] < step]
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
