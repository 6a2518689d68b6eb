"""Which teacher scores an example, in a run with several teachers (`teachers`, `routing`).

The rule, first match wins: the example's `routing.key` field (its value names a teacher, or `ensemble`); the first
of `routing.subsets` (data.subsets name -> teacher) whose domains / levels hold the example; `routing.default`.
Each encoded row carries the result as `teacher` (the teacher's index in the set, or -1 for the ensemble), so every
batch knows its rows' teachers wherever it is rebuilt from its id. An example no rule places, or one whose field
names no teacher, fails the run before any cluster time, naming the known teachers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from distill.batch import ENSEMBLE, ENSEMBLE_NAME, ROUTE
from distill.data.build import RowEncoder, in_subset
from distill.errors import ConfigError


class Router:
    """example -> teacher index (or ENSEMBLE), from the run's `routing` config."""

    def __init__(self, names: Sequence[str], routing, subsets) -> None:
        self.names = list(names)
        self.index = {name: i for i, name in enumerate(self.names)} | {ENSEMBLE_NAME: ENSEMBLE}
        self.key, self.default = routing.key, routing.default
        self.rules = [(subsets[name], target) for name, target in routing.subsets.items()]

    def __call__(self, example: dict) -> int:
        if self.key is not None and example.get(self.key) is not None:
            return self._target(example[self.key], f"its {self.key!r} field")
        for subset, target in self.rules:
            if in_subset(subset, example):
                return self._target(target, "routing.subsets")
        if self.default is None:
            raise ConfigError(
                f"no routing rule places an example (fields {sorted(example)}): give it a {self.key!r} field, "
                "cover it with routing.subsets, or set routing.default to a teacher or 'ensemble'."
            )
        return self._target(self.default, "routing.default")

    def _target(self, name, where: str) -> int:
        if name not in self.index:
            raise ConfigError(
                f"an example's teacher is {name!r} ({where}), which is not a teacher of this run; the teachers are "
                f"{self.names} (or {ENSEMBLE_NAME!r}). Fix the data or add the teacher to `teachers`."
            )
        return self.index[name]


def routed_encoder(encode: RowEncoder, route: Callable[[dict], int]) -> RowEncoder:
    """`encode`, with each row's teacher (`teacher`: an index or ENSEMBLE) added."""

    def encode_routed(examples: list[dict]) -> list[dict]:
        rows = encode(examples)
        if len(rows) != len(examples):  # one row per example, or routing could not tell which is which
            raise ValueError(
                "routed_encoder needs one row per example (packing is refused with several teachers)"
            )
        return [{**row, ROUTE: route(ex)} for row, ex in zip(rows, examples, strict=True)]

    return encode_routed
