"""Several teachers on the Ray path: one TeacherGroup per teacher (its own replicas, TP, model, token map), and one
stream of combined TeacherBatches, so the buffer, the driver and the student ranks work exactly as with one.

For every input batch, each teacher that scores some of its rows (distill/teacher/teacher_set.py: `teacher_rows`)
receives just those rows, through its own group's `score_stream` (its backpressure, its replica restarts). When all
of the batch's teachers have answered, a small Ray task combines their parts (`combine`: rows put back in place,
the ensemble's tokens mixed) into the batch's one TeacherBatch; its ref is what the buffer holds. So the buffer
releases a batch only once every teacher it needs has answered, and exactly-once, checkpoints and resume are the
single-teacher ones: a batch is still one id with one ref.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import ray
import torch

from distill.batch import ROUTE, BatchId, TeacherBatch
from distill.cluster.teacher_group import BatchMeta, TeacherGroup
from distill.cluster.worker import NO_TASK_EVENTS
from distill.teacher.teacher_set import StageTeachers, combine, stage_routing, teacher_rows

_BATCH_FIELDS = ("input_ids", "attention_mask", "loss_mask", ROUTE)


@ray.remote(num_cpus=0, max_retries=3, **NO_TASK_EVENTS)
def _combine(batch_id, batch: dict, weights, weighting, indices, *parts) -> TeacherBatch:
    """The batch's TeacherBatch from its teachers' parts (refs resolved by Ray). num_cpus=0: a few [B, T, k]
    array operations, placed wherever, never waiting for a CPU the actors hold."""
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    return combine(batch_id, tensors, dict(zip(indices, parts, strict=True)), weights, weighting)


class TeacherSetGroup:
    """The TeacherGroup protocol (`score_stream`, `memory_peaks`, `restart_log`, ...) over one group per teacher."""

    def __init__(
        self,
        names: Sequence[str],
        groups: Sequence[TeacherGroup],
        weights: Sequence[float],
        weighting: str,
        stage_teachers: StageTeachers | None = None,
    ):
        """stage_teachers: batch id -> its curriculum stage's teacher multipliers (None: as configured)."""
        self.names, self.groups = list(names), list(groups)
        self.weights, self.weighting = list(weights), weighting
        self.stage_teachers = stage_teachers
        self.scored_tokens = dict.fromkeys(self.names, 0)

    def score_stream(
        self, batches: Iterable[tuple[BatchId, dict[str, np.ndarray]]]
    ) -> Iterator[tuple[BatchMeta, ray.ObjectRef]]:
        """Yield (metadata, combined TeacherBatch ref) for every input batch exactly once, in input order."""
        source = iter(batches)
        queues: list[deque] = [deque() for _ in self.groups]
        order: deque = deque()

        def pull() -> bool:
            """Read the next input batch and hand each of its teachers their rows."""
            item = next(source, None)
            if item is None:
                return False
            batch_id, arrays = item
            multipliers = self.stage_teachers(batch_id) if self.stage_teachers is not None else None
            route, weights = stage_routing(
                torch.from_numpy(np.asarray(arrays[ROUTE])), self.weights, self.names, multipliers
            )
            arrays = {**arrays, ROUTE: route.numpy()}
            involved = []
            for index, queue in enumerate(queues):
                rows = teacher_rows(route, index, weights).numpy()
                if len(rows):
                    queue.append((batch_id, {k: v[rows] for k, v in arrays.items()}))
                    involved.append(index)
            order.append((batch_id, {k: arrays[k] for k in _BATCH_FIELDS}, weights, involved))
            return True

        def feed(index: int) -> Iterator[tuple[BatchId, dict[str, np.ndarray]]]:
            # A group pulls ahead up to its own in-flight bound; batches it has no rows of go to the other queues.
            while True:
                while not queues[index]:
                    if not pull():
                        return
                yield queues[index].popleft()

        streams = [group.score_stream(feed(i)) for i, group in enumerate(self.groups)]
        while order or pull():
            batch_id, batch, weights, involved = order.popleft()
            metas, refs = [], []
            for index in involved:
                meta, ref = next(streams[index])
                if tuple(meta.batch_id) != tuple(batch_id):  # each group yields in its input order
                    raise RuntimeError(f"teacher {self.names[index]} answered {meta.batch_id} for {batch_id}")
                metas.append(meta)
                refs.append(ref)
                self.scored_tokens[self.names[index]] += meta.num_tokens
            combined = _combine.remote(batch_id, batch, weights, self.weighting, involved, *refs)
            yield (
                BatchMeta(
                    batch_id,
                    num_tokens=int(np.asarray(batch["loss_mask"]).sum()),
                    # The parts' bytes: the combined batch holds the same entries, the ensemble's shared ids once.
                    nbytes=sum(m.nbytes for m in metas),
                    replica=metas[0].replica,
                    pid=metas[0].pid,
                    memory=metas[0].memory,
                ),
                combined,
            )

    def score(self, batch_id: BatchId, arrays: dict[str, np.ndarray]) -> TeacherBatch:
        ((_, ref),) = list(self.score_stream([(batch_id, arrays)]))
        return ray.get(ref)

    # ---- the TeacherGroup protocol, over every teacher ----------------------------------------------------------
    @property
    def restart_log(self) -> list[dict]:
        return [
            {**entry, "teacher": name}
            for name, g in zip(self.names, self.groups, strict=True)
            for entry in g.restart_log
        ]

    def memory_peaks(self) -> dict:
        return {
            f"{name}.{key}": peaks
            for name, g in zip(self.names, self.groups, strict=True)
            for key, peaks in g.memory_peaks().items()
        }

    def actor_nodes(self) -> list[list[str]]:
        return [nodes for g in self.groups for nodes in g.actor_nodes()]

    def actor_pids(self) -> list[list[int]]:
        return [pids for g in self.groups for pids in g.actor_pids()]

    def kill_actor(self, replica: int, rank: int, teacher: int = 0) -> None:
        """Failure injection: `teacher`'s replica/rank (the first teacher's by default)."""
        self.groups[teacher].kill_actor(replica, rank)

    def take_tokens(self) -> dict[str, float]:
        """teacher/<name>/tokens scored since the last call (the driver logs them per step)."""
        out = {f"teacher/{name}/tokens": float(n) for name, n in self.scored_tokens.items()}
        self.scored_tokens = dict.fromkeys(self.names, 0)
        return out

    def shutdown(self) -> None:
        for g in self.groups:
            g.shutdown()
