"""Data mixes: one numbered stream of batches whose sources change by segment (curriculum stages, continual
increments) and, within a segment, interleave at fixed shares (rows of the stream's own sources; whole batches
of sources the run builds itself, such as replay).

Position g of the run's stream (the `Assignment`'s stream position) maps to its rows by a pure function, so any
batch can be rebuilt from its id alone, exactly as with a single `BatchStream`:
- a segment [start, end) of positions has shares {source: share}. Shares become exact integer counts per block
  of M slots (M the smallest common denominator of the shares, at most `MAX_BLOCK`), laid out by a smooth
  round robin (each slot goes to the source furthest behind its share), so every window of M slots holds each
  source in its exact share and no source comes in long runs;
- a source's rows continue across segments (a source used in stages 1 and 3 does not restart in stage 3), so its
  own stream runs through its epochs like a plain `BatchStream.forever`.

Batch ids stay `(epoch, index) = divmod(g, num_batches)` with `num_batches` the `train` source's batches per
epoch (any fixed number would do: ids only need to be a bijection with positions).
"""

from __future__ import annotations

import bisect
import copy
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

import torch

from distill.data.batching import BatchId, BatchStream, pad_batch
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
    if block > MAX_BLOCK:  # shares without a small common denominator: MAX_BLOCK slots, largest remainders
        block = MAX_BLOCK
    exact = {name: s / total * block for name, s in positive.items()}
    counts = {name: int(v) for name, v in exact.items()}
    for name in sorted(exact, key=lambda n: exact[n] - counts[n], reverse=True)[
        : block - sum(counts.values())
    ]:
        counts[name] += 1
    pattern: list[str] = []
    taken = dict.fromkeys(counts, 0)
    order = {name: i for i, name in enumerate(counts)}
    for slot in range(block):
        # The source furthest behind its share; ties go to the larger share, then to the one listed first.
        name = max(counts, key=lambda n: ((slot + 1) * counts[n] / block - taken[n], counts[n], -order[n]))
        pattern.append(name)
        taken[name] += 1
    return pattern


DATA = "data"
"""`Location.source` of a position whose batch the stream builds from its own sources' rows."""


@dataclass(frozen=True)
class Location:
    source: str
    """DATA, or the name of a source the run builds itself (e.g. `replay`)."""
    position: int
    """The position among that kind's positions (DATA positions counted across segments)."""


class MixedStream:
    """A numbered batch stream over named sources laid out by `segments` (contiguous from position 0).

    sources: name -> BatchStream (all with the same batch size B). Two levels of mixing:
    - sources the stream owns are mixed ROW by row: the DATA positions of a segment hold consecutive rows of
      the segment's row mix, B per position. A step's rows are then the same whatever its split into
      micro-batches and ranks (equal global batch, equal data), as with a single BatchStream;
    - a source named in a segment but not owned here (e.g. `replay`, whose batches the run builds with stored
      teacher outputs) takes whole positions: `locate` says which, `forever` skips them, `batch` refuses them.
    Each owned source's rows continue across segments in its own epoch order (rows_per_epoch = its full
    batches x B, exactly the rows `BatchStream.forever` would visit), so a single segment {train: 1} is
    exactly the plain BatchStream.
    """

    def __init__(self, sources: Mapping[str, BatchStream], segments: Sequence[Segment]) -> None:
        if not segments or segments[0].start != 0:
            raise ValueError("segments must start at position 0")
        for a, b in itertools.pairwise(segments):
            if a.end != b.start:
                raise ValueError(f"segments must be contiguous: {a} then {b}")
        self.sources, self.segments = dict(sources), list(segments)
        first = sources.get("train") or next(iter(sources.values()))
        self.num_batches, self.batch_size = first.num_batches, first.batch_size
        self.position_patterns, self.row_patterns = [], []
        for seg in self.segments:
            built = {n: v for n, v in seg.shares.items() if n not in self.sources and v > 0}
            owned = {n: v for n, v in seg.shares.items() if n in self.sources and v > 0}
            self.position_patterns.append(
                block_pattern({DATA: sum(owned.values()), **built}) if owned or built else []
            )
            self.row_patterns.append(block_pattern(owned) if owned else [])
        # Per segment: positions of each kind and rows of each owned source used by the segments before it.
        self.position_offsets: list[dict[str, int]] = []
        self.row_offsets: list[dict[str, int]] = []
        positions: dict[str, int] = {}
        rows: dict[str, int] = {}
        for seg, kinds, mix in zip(self.segments, self.position_patterns, self.row_patterns, strict=True):
            self.position_offsets.append(dict(positions))
            self.row_offsets.append(dict(rows))
            for kind in set(kinds):
                positions[kind] = positions.get(kind, 0) + _picks(kinds, kind, seg.end - seg.start)
            data_rows = _picks(kinds, DATA, seg.end - seg.start) * self.batch_size if mix else 0
            for name in set(mix):
                rows[name] = rows.get(name, 0) + _picks(mix, name, data_rows)

    @property
    def end(self) -> int:
        return self.segments[-1].end

    def copy(self) -> MixedStream:
        """The same stream with its own source objects (for another thread: a BatchStream caches the current
        epoch's permutation). Rows are shared, nothing is recomputed."""
        return MixedStream({name: copy.copy(s) for name, s in self.sources.items()}, self.segments)

    def extended(self, end: int) -> MixedStream:
        """The same stream with its last segment running on to `end` (positions before the old end unchanged):
        an offline teacher cache of more epochs than one run uses."""
        last = self.segments[-1]
        return MixedStream(
            self.sources, [*self.segments[:-1], Segment(last.start, max(end, last.end), last.shares)]
        )

    @cached_property
    def _starts(self) -> list[int]:
        return [s.start for s in self.segments]

    def segment_of(self, position: int) -> int:
        if not 0 <= position < self.end:
            raise IndexError(f"stream position {position} is outside the run's {self.end} positions")
        return bisect.bisect_right(self._starts, position) - 1

    def locate(self, position: int) -> Location:
        i = self.segment_of(position)
        kinds, local = self.position_patterns[i], position - self.segments[i].start
        kind = kinds[local % len(kinds)]
        return Location(kind, self.position_offsets[i].get(kind, 0) + _picks(kinds, kind, local))

    def rows(self, position: int) -> list[tuple[str, dict]]:
        """(source name, encoded row) of the B rows of the DATA position `position`, in order."""
        i = self.segment_of(position)
        kinds, mix, local = self.position_patterns[i], self.row_patterns[i], position - self.segments[i].start
        if kinds[local % len(kinds)] != DATA:
            name = kinds[local % len(kinds)]
            raise KeyError(f"source {name!r} has no batch stream here (its batches are built by the run)")
        first_row = _picks(kinds, DATA, local) * self.batch_size
        out = []
        for r in range(first_row, first_row + self.batch_size):
            name = mix[r % len(mix)]
            out.append((name, self._row(name, self.row_offsets[i].get(name, 0) + _picks(mix, name, r))))
        return out

    def _row(self, name: str, index: int) -> dict:
        source = self.sources[name]
        per_epoch = source.num_batches * source.batch_size
        epoch, within = divmod(index, per_epoch)
        return source.rows[source._permutation(epoch)[within]]

    def batch_id(self, position: int) -> BatchId:
        return divmod(position, self.num_batches)

    def position_of(self, batch_id: BatchId) -> int:
        return batch_id[0] * self.num_batches + batch_id[1]

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """The batch with id (epoch, index) (see `pad_batch` for the tensors)."""
        first = next(iter(self.sources.values()))
        rows = [row for _, row in self.rows(self.position_of((epoch, index)))]
        return pad_batch(rows, first.pad_id, pad_to=first.seq_len)

    def batch_tokens(self, position: int) -> int:
        """Trained tokens (loss-mask positions) of the batch at `position`, without building it."""
        return sum(sum(row["loss_mask"]) for _, row in self.rows(position))

    def forever(self, start: BatchId = (0, 0)) -> Iterator[tuple[BatchId, dict[str, torch.Tensor]]]:
        """The DATA batches from `start` to the end (positions of sources built elsewhere are skipped)."""
        for position in range(self.position_of(start), self.end):
            if self.locate(position).source == DATA:
                yield self.batch_id(position), self.batch(*self.batch_id(position))


def _picks(pattern: list[str], name: str, length: int) -> int:
    """How often `name` occurs in the first `length` positions of the repeated `pattern`."""
    full, rest = divmod(length, len(pattern))
    return full * pattern.count(name) + pattern[:rest].count(name)
