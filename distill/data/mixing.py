"""Data mixes: one numbered stream of batches whose source changes by segment (curriculum stages, continual
increments) and, within a segment, interleaves sources at fixed shares.

Position g of the run's stream (the `Assignment`'s stream position) maps to (source, the source's own position)
by a pure function, so any batch can be rebuilt from its id alone, exactly as with a single `BatchStream`:
- a segment [start, end) of positions has shares {source: share}. They become exact integer counts per block
  of M positions (M the smallest common denominator of the shares, at most `MAX_BLOCK`), laid out by a smooth
  round robin (each slot goes to the source furthest behind its share), so every window of M positions holds
  each source in its exact share and no source comes in long runs;
- a source's batches continue across segments (a source used in stages 1 and 3 does not restart in stage 3), so
  its own stream runs through its epochs like a plain `BatchStream.forever`.

Batch ids stay `(epoch, index) = divmod(g, num_batches)` with `num_batches` the `train` source's batches per
epoch (any fixed number would do: ids only need to be a bijection with positions).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

import torch

from distill.data.batching import BatchId, BatchStream
from distill.errors import ConfigError

MAX_BLOCK = 1000


@dataclass(frozen=True)
class Segment:
    """Positions [start, end) of the run's stream drawn from `shares` (source name -> share, any scale)."""

    start: int
    end: int
    shares: Mapping[str, float]


def block_pattern(shares: Mapping[str, float]) -> list[str]:
    """The sources of one block of positions, in order: each source exactly its share of the block."""
    positive = {name: s for name, s in shares.items() if s > 0}
    if not positive:
        raise ConfigError(f"data mix {dict(shares)} has no source with a share > 0")
    total = sum(positive.values())
    fractions = {name: Fraction(s / total).limit_denominator(MAX_BLOCK) for name, s in positive.items()}
    block = math.lcm(*(f.denominator for f in fractions.values()))
    counts = {name: int(f * block) for name, f in fractions.items()}
    # limit_denominator may leave the counts a slot short or over; the largest share absorbs the difference.
    largest = max(counts, key=lambda n: (counts[n], n))
    counts[largest] += block - sum(counts.values())
    pattern: list[str] = []
    taken = dict.fromkeys(counts, 0)
    order = {name: i for i, name in enumerate(counts)}
    for slot in range(block):
        # The source furthest behind its share; ties go to the larger share, then to the one listed first.
        name = max(counts, key=lambda n: ((slot + 1) * counts[n] / block - taken[n], counts[n], -order[n]))
        pattern.append(name)
        taken[name] += 1
    return pattern


@dataclass(frozen=True)
class Location:
    source: str
    position: int
    """The source's own stream position (its batches counted across epochs)."""


class MixedStream:
    """A numbered batch stream over named sources laid out by `segments` (contiguous from position 0).

    sources: name -> BatchStream. A segment may name sources that are not here (e.g. `replay`, whose batches
    the run builds itself): `locate` places them like any other, and `batch` refuses them.
    """

    def __init__(self, sources: Mapping[str, BatchStream], segments: Sequence[Segment]) -> None:
        if not segments or segments[0].start != 0:
            raise ValueError("segments must start at position 0")
        for a, b in itertools.pairwise(segments):
            if a.end != b.start:
                raise ValueError(f"segments must be contiguous: {a} then {b}")
        self.sources, self.segments = dict(sources), list(segments)
        self.patterns = [block_pattern(s.shares) for s in self.segments]
        self.num_batches = (sources.get("train") or next(iter(sources.values()))).num_batches
        # offsets[i][name]: batches of `name` used by the segments before segment i.
        self.offsets: list[dict[str, int]] = []
        used: dict[str, int] = {}
        for seg, pattern in zip(self.segments, self.patterns, strict=True):
            self.offsets.append(dict(used))
            for name in set(pattern):
                used[name] = used.get(name, 0) + _picks(pattern, name, seg.end - seg.start)

    @property
    def end(self) -> int:
        return self.segments[-1].end

    @cached_property
    def _starts(self) -> list[int]:
        return [s.start for s in self.segments]

    def segment_of(self, position: int) -> int:
        if not 0 <= position < self.end:
            raise IndexError(f"stream position {position} is outside the run's {self.end} positions")
        return bisect.bisect_right(self._starts, position) - 1

    def locate(self, position: int) -> Location:
        i = self.segment_of(position)
        pattern, local = self.patterns[i], position - self.segments[i].start
        name = pattern[local % len(pattern)]
        return Location(name, self.offsets[i].get(name, 0) + _picks(pattern, name, local))

    def batch_id(self, position: int) -> BatchId:
        return divmod(position, self.num_batches)

    def position_of(self, batch_id: BatchId) -> int:
        return batch_id[0] * self.num_batches + batch_id[1]

    def _source(self, loc: Location) -> BatchStream:
        if loc.source not in self.sources:
            raise KeyError(
                f"source {loc.source!r} has no batch stream here (its batches are built by the run)"
            )
        return self.sources[loc.source]

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        loc = self.locate(self.position_of((epoch, index)))
        source = self._source(loc)
        return source.batch(*divmod(loc.position, source.num_batches))

    def batch_tokens(self, position: int) -> int:
        """Trained tokens (loss-mask positions) of the batch at `position`, without building it."""
        loc = self.locate(position)
        source = self._source(loc)
        return source.batch_tokens(*divmod(loc.position, source.num_batches))

    def forever(self, start: BatchId = (0, 0)) -> Iterator[tuple[BatchId, dict[str, torch.Tensor]]]:
        """Batches of the stream's own sources from `start` to the end (positions of other sources skipped)."""
        for position in range(self.position_of(start), self.end):
            loc = self.locate(position)
            if loc.source in self.sources:
                source = self.sources[loc.source]
                yield self.batch_id(position), source.batch(*divmod(loc.position, source.num_batches))


def _picks(pattern: list[str], name: str, length: int) -> int:
    """How often `name` occurs in the first `length` positions of the repeated `pattern`."""
    full, rest = divmod(length, len(pattern))
    return full * pattern.count(name) + pattern[:rest].count(name)
