"""Score once, train many: an offline teacher cache feeds the buffer in place of the teacher actors.

`distill teacher-cache` runs the teacher once over the run's batch stream; any number of later runs
(`teacher.cache=<dir>`, other students, other seeds, other ZeRO layouts) then train their DeepSpeed ranks from it
with no teacher model anywhere. The readers are Ray actors with the teacher actors' protocol (`TeacherGroup` with
`CacheWorker`): each reads the batch the driver names from the cache's shards, checks that it was scored on
exactly the run's inputs (tokens and document boundaries) and returns it as an object ref that the student ranks
fetch from the store. Order, backpressure, exactly-once and the restart of a dead reader are the group's, as
for the teacher; the students cannot tell the difference, which is what makes the run equal the online one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from distill.batch import BatchId, TeacherBatch
from distill.cache import CacheReader
from distill.cluster.teacher_group import BatchMeta
from distill.cluster.worker import TorchrunWorker
from distill.tracking.memory import measure


@dataclass(frozen=True)
class CacheSpec:
    """What every cache reader needs: the cache folder and the identity the run expects of it."""

    path: str
    expect: dict
    threads: int = 1


class CacheWorker(TorchrunWorker):
    """One cache reader (a 'replica' of TP 1 in the teacher group's terms). Made a Ray actor by TeacherGroup."""

    def __init__(self, spec: CacheSpec, replica: int, rank: int, tp: int) -> None:
        if tp != 1:
            raise ValueError(f"a cache reader has no tensor parallelism; got tp={tp}")
        self.spec, self.replica = spec, replica
        self.reader: CacheReader | None = None

    def setup(self, address: tuple[str, int]) -> int:
        """Open the cache (the manifest is checked against the run's identity again, on this node's view)."""
        self.reader = CacheReader(self.spec.path, expect=self.spec.expect)
        return os.getpid()

    def score(self, batch_id: BatchId, inputs: dict[str, np.ndarray]) -> tuple[BatchMeta, TeacherBatch]:
        """The cached TeacherBatch of `batch_id`, after checking it against the run's inputs of that id."""
        out = self.reader.read_matching(tuple(batch_id), inputs["input_ids"], inputs.get("position_ids"))
        meta = BatchMeta(tuple(batch_id), out.num_tokens, out.nbytes(), self.replica, os.getpid(), measure())
        return meta, out
