"""The students' lease-ahead (`distill.cluster.prefetch.Prefetcher`) on real buffer shards, without models.

A `Reader` actor is a student rank's reading side: each step takes its batches and starts the lease of the next
step's, while the test plays the driver (acks a step's batches once it is done, requeues a dead reader). Payloads
are one-number arrays naming their stream position, so a wrong or repeated delivery shows in the values. The
full runs in test_online_distributed.py check the same with the real StudentWorker (a killed rank included).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import ray

from distill.cluster.buffer import Buffer
from distill.cluster.driver import Assignment
from distill.cluster.prefetch import Prefetcher

pytestmark = pytest.mark.distributed

STEPS = 6
A = Assignment(accum=2, world=1, batches_per_epoch=4)  # 2 batches a step, 2 epochs over 6 steps


class Reader:
    """Made a Ray actor in the tests; holds a Prefetcher as StudentWorker does."""

    def __init__(self, buffer: Buffer, consumer: str) -> None:
        self.batches = Prefetcher(buffer, consumer)

    def step(self, ids: list, next_ids: list | None = None) -> list[int]:
        got = self.batches.take(ids)
        if next_ids is not None:
            self.batches.prefetch(next_ids)
        return [int(x[0]) for x in got]

    def hits(self) -> tuple[int, int]:
        return self.batches.hits, self.batches.misses


def _buffer(capacity: int) -> Buffer:
    return Buffer.create(shards=2, capacity_per_shard=capacity // 2, batches_per_epoch=A.batches_per_epoch)


def _produce(buffer: Buffer, positions: range) -> threading.Thread:
    """Put the batches of `positions` in stream order, waiting for room (the driver's producer thread)."""

    def run() -> None:
        for g in positions:
            buffer.put(A.batch_id(g), ray.put(np.array([g])), 8, timeout=None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _reader(buffer: Buffer, consumer: str):
    # On the head node, beside the test process that owns the payloads (crossing nodes is not the point here).
    return ray.remote(Reader).options(num_cpus=0, resources={"node_a": 0.01}).remote(buffer, consumer)


def _wait_leased(buffer: Buffer, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while buffer.stats()["leased"] != n:
        assert time.monotonic() < deadline, f"expected {n} leased batches, buffer says {buffer.stats()}"
        time.sleep(0.02)


def _expected(steps: int) -> dict:
    return {b: 1 for s in range(steps) for b in A.step_batches(s)}


def test_lease_ahead_consumes_every_batch_once_under_backpressure(ray_cluster):
    """A buffer of one step: the next step's lease waits on the shards until the ack of this one lets the
    producer in. Every step after the first is a prefetch hit; nothing is acked twice or skipped."""
    buffer = _buffer(capacity=2)
    producer = _produce(buffer, range(STEPS * A.per_step))
    reader = _reader(buffer, "r0")
    for s in range(STEPS):
        ahead = A.rank_batches(s + 1, 0) if s + 1 < STEPS else None
        got = ray.get(reader.step.remote(A.rank_batches(s, 0), ahead))
        assert got == [A.position_of(b) for b in A.rank_batches(s, 0)]
        buffer.ack(A.step_batches(s))  # the driver's part, once the step committed
    producer.join(10)
    assert ray.get(reader.hits.remote()) == (STEPS - 1, 1)
    assert buffer.consumption() == _expected(STEPS)
    assert buffer.held() == set()
    ray.kill(reader)
    buffer.shutdown()


@pytest.mark.parametrize("granted", [True, False], ids=["prefetch-granted", "prefetch-waiting"])
def test_a_dead_readers_prefetch_is_delivered_again_never_acked(ray_cluster, granted):
    """The reader dies after step 1 with step 2's lease granted (or still waiting on the shards for batches
    not produced yet). The driver requeues it; a new reader gets step 2's batches and the counts stay exactly
    once: the prefetched lease was neither lost nor acked."""
    buffer = _buffer(capacity=8)
    first = 3 * A.per_step if granted else 2 * A.per_step
    producer = _produce(buffer, range(first))
    old = _reader(buffer, "g0-r0")
    for s in range(2):
        ray.get(old.step.remote(A.rank_batches(s, 0), A.rank_batches(s + 1, 0)))
        buffer.ack(A.step_batches(s))
    producer.join(10)
    if granted:
        _wait_leased(buffer, 2)  # step 2's batches are leased to the reader that is about to die
    ray.kill(old, no_restart=True)
    assert buffer.requeue(["g0-r0"]) == (2 if granted else 0)
    producer = _produce(buffer, range(first, STEPS * A.per_step))
    if not granted:  # the dead reader's waiting lease fails once its batches arrive: it takes none of them
        deadline = time.monotonic() + 10
        while len(buffer.held()) < A.per_step and time.monotonic() < deadline:
            time.sleep(0.02)
        assert buffer.stats()["leased"] == 0
    new = _reader(buffer, "g1-r0")
    for s in range(2, STEPS):
        ahead = A.rank_batches(s + 1, 0) if s + 1 < STEPS else None
        got = ray.get(new.step.remote(A.rank_batches(s, 0), ahead))
        assert got == [A.position_of(b) for b in A.rank_batches(s, 0)]
        buffer.ack(A.step_batches(s))
    producer.join(10)
    assert buffer.consumption() == _expected(STEPS)
    ray.kill(new)
    buffer.shutdown()


def test_a_prefetch_the_next_step_does_not_ask_for_is_released(ray_cluster):
    """Hinted ids that the next take does not name go back to the buffer unacked; ids it does name stay."""
    buffer = _buffer(capacity=8)
    _produce(buffer, range(6)).join(10)
    batches = Prefetcher(buffer, "r0")
    batches.prefetch([(0, 2), (0, 3)])
    got = batches.take([(0, 3), (1, 0)])  # (0, 3) overlaps the stale prefetch: it must stay leased
    assert [int(x[0]) for x in got] == [3, 4]
    assert (batches.hits, batches.misses) == (0, 1)
    _wait_leased(buffer, 2)  # (0, 2) released once its lease was granted
    other = Prefetcher(buffer, "r1")
    assert [int(x[0]) for x in other.take([(0, 2)])] == [2]
    with pytest.raises(RuntimeError, match="leased to r0"):
        other.take([(0, 3)])
    buffer.ack([(0, 2), (0, 3), (1, 0)])
    assert buffer.consumption() == {(0, 2): 1, (0, 3): 1, (1, 0): 1}
    assert buffer.stats()["released"] == 1
    batches.close()
    other.close()
    buffer.shutdown()
