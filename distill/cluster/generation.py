"""Sampling on the TeacherGroup's actors: prompt batches round-robin over the replicas, results in order.

Every TP rank of a replica receives the same batch (one `ray.put`, read by all ranks) and samples with the same
seeds, as `distill.teacher.sampling` requires; rank 0's completions are returned. No replica recovery here: a
dead actor ends the stream with the Ray error, and `distill generate` resumes from its last committed shard.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

import ray

from distill.cluster.teacher_group import TeacherGroup
from distill.teacher.sampling import Completions, PromptBatch, SamplingParams


def ray_sample_stream(
    group: TeacherGroup, batches: Iterable[PromptBatch], params: SamplingParams
) -> Iterator[Completions]:
    """Completions of each batch in input order; at most `group.max_in_flight` batches queued on the actors."""
    pending: deque[tuple[ray.ObjectRef, list[ray.ObjectRef]]] = deque()
    source = iter(batches)
    replica = 0
    while True:
        while len(pending) < group.max_in_flight and (batch := next(source, None)) is not None:
            prompts = ray.put(batch.prompts)
            actors = group.replicas[replica].actors
            replica = (replica + 1) % len(group.replicas)
            refs = [a.sample.remote(prompts, params, batch.first_index) for a in actors]
            pending.append((refs[0], refs[1:]))
        if not pending:
            return
        head, others = pending.popleft()
        completions = ray.get(head)
        ray.get(others)  # the other TP ranks took part in every collective; wait so errors surface here
        yield completions
