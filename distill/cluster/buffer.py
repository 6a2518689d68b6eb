"""The parameter-server buffer between the teacher and the students: S shard actors holding TeacherBatch refs.

Only object references live here, never payloads: the teacher's output stays in the object store where the
teacher wrote it and each student fetches its own batches directly (`ray.get` on the leased refs). A ref is
passed wrapped in a list so Ray hands the shard the reference itself instead of resolving it.

Life of a batch on its shard: `put` (ready) -> `lease(ids, consumer)` (leased to one student rank) -> `ack(ids)`
once the optimizer step that used it is committed (released; the batch's consumption count goes up by one).
`requeue(consumers)` makes a dead consumer's leases ready again; `release(ids, consumer, ticket)` gives back a
lease its consumer will not use (a stale prefetch, see `distill.cluster.prefetch`); `rollback(ids)` takes back
the counts of committed steps that a restore from an older checkpoint undid, so the counts always describe
committed steps.

Placement: stream position g (see `distill.cluster.driver.Assignment`) lives on shard g % S. Consecutive
positions go round-robin, so a step's batches spread evenly and no shard fills while another is empty; with a
per-shard capacity of at least ceil(batches per step / S) the producer can always deliver the oldest step's
batches (see `check_capacity`), so backpressure never deadlocks.

Shards are asyncio actors: a `put` on a full shard and a `lease` of batches not yet produced wait on a
condition without blocking the shard's other calls (that is what lets `ack` free room during a waiting `put`).
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from distill.cluster.placement import alive_node_ids, alive_nodes
from distill.cluster.worker import NO_TASK_EVENTS
from distill.config.topology import check_capacity  # noqa: F401  (re-exported: the buffer's capacity rule)
from distill.tracking.memory import MemoryPeaks, measure

# (epoch, index), as distill.batch.BatchId; not imported from there so the shard processes never load
# torch or transformers (a shard only moves references).
BatchId = tuple[int, int]

PUT_OK, PUT_FULL, PUT_EXISTS = "ok", "full", "exists"
_COUNTERS = (
    "puts",
    "leases",
    "acks",
    "requeued",
    "released",
    "rolled_back",
    "bytes_put",
    "bytes_leased",
    "producer_wait_s",
    "consumer_wait_s",
)


@dataclass
class _Entry:
    payload: list  # [ObjectRef]: kept wrapped, see the module docstring
    nbytes: int
    consumer: str | None = None  # None: ready; else the lease holder
    ticket: int = 0  # the holder's newest lease of it (see `release`)


class BufferShard:
    """One shard. Made a Ray actor by `Buffer.create` (zero CPUs: it only moves references)."""

    def __init__(self, index: int, capacity: int, max_bytes: int | None = None) -> None:
        self.index, self.capacity, self.max_bytes = index, capacity, max_bytes
        self._entries: dict[BatchId, _Entry] = {}
        self._dead: set[str] = set()
        self._commits: dict[BatchId, int] = defaultdict(int)
        self._changed: asyncio.Condition | None = None
        self._queue: deque[int] = deque()  # tickets of puts waiting to be admitted, in arrival order
        self._next_ticket = 0
        self._bytes = 0
        self._stats = dict.fromkeys(_COUNTERS, 0.0)
        self._started = time.perf_counter()

    @property
    def _cond(self) -> asyncio.Condition:
        if self._changed is None:  # created on the actor's event loop, not in __init__
            self._changed = asyncio.Condition()
        return self._changed

    def _has_room(self, nbytes: int) -> bool:
        if not self._entries:
            return True  # one batch larger than max_bytes must still pass, or nothing would
        if len(self._entries) >= self.capacity:
            return False
        return self.max_bytes is None or self._bytes + nbytes <= self.max_bytes

    async def put(
        self,
        batch_id: BatchId,
        payload: list,
        nbytes: int,
        *,
        timeout: float | None = 0.0,
        force: bool = False,
    ) -> str:
        """Hold `payload` ([TeacherBatch ref]). Waits up to `timeout` s (None: as long as it takes) for room;
        "full" if there is none by then.

        force: bypass the bound (a replay after a student restart re-produces already-consumed batches; their
        number is bounded by the checkpoint interval). Returns "ok", "full" or "exists" (already held).
        """
        (answer,) = await self.put_many([(batch_id, payload, nbytes)], timeout=timeout, force=force)
        return answer

    async def put_many(
        self, items: Sequence[tuple[BatchId, list, int]], *, timeout: float | None = None, force: bool = False
    ) -> list[str]:
        """`put` of several (batch_id, payload, nbytes) in one call (fewer round trips).

        Puts are admitted in arrival order: one never overtakes an earlier put still waiting for room, even
        from another call in flight. `check_capacity`'s no-deadlock argument needs batches to enter a shard
        in stream order; a single producer's calls arrive in the order it made them. Once an item finds no
        room within `timeout`, it and the rest of the call are "full" (taking a later one would break order).
        """
        tickets = list(range(self._next_ticket, self._next_ticket + len(items)))
        self._next_ticket += len(items)
        self._queue.extend(tickets)  # all of the call's places in line, before any await
        answers: list[str] = []
        async with self._cond:
            try:
                for ticket, (batch_id, payload, nbytes) in zip(tickets, items, strict=True):
                    if answers and answers[-1] == PUT_FULL:
                        answers.append(PUT_FULL)
                        continue
                    answers.append(
                        await self._admit(ticket, tuple(batch_id), payload, nbytes, timeout, force)
                    )
            finally:
                for ticket in tickets:  # admitted ones are gone already; "full" ones give up their place
                    if ticket in self._queue:
                        self._queue.remove(ticket)
                self._cond.notify_all()
        return answers

    async def _admit(
        self, ticket: int, batch_id: BatchId, payload: list, nbytes: int, timeout: float | None, force: bool
    ) -> str:
        """Under the condition's lock: wait for the head of the line and room, then hold the batch."""
        if batch_id in self._entries:
            self._queue.remove(ticket)
            self._cond.notify_all()
            return PUT_EXISTS

        def admissible() -> bool:
            return self._queue[0] == ticket and self._has_room(nbytes)

        if not force and not admissible():
            start = time.perf_counter()
            try:
                await asyncio.wait_for(self._cond.wait_for(admissible), timeout)
            except asyncio.TimeoutError:
                return PUT_FULL
            finally:
                self._stats["producer_wait_s"] += time.perf_counter() - start
        self._queue.remove(ticket)
        self._entries[batch_id] = _Entry(payload, nbytes)
        self._bytes += nbytes
        self._stats["puts"] += 1
        self._stats["bytes_put"] += nbytes
        self._cond.notify_all()
        return PUT_OK

    async def lease(
        self, batch_ids: Sequence[BatchId], consumer: str, timeout: float, ticket: int = 0
    ) -> list:
        """The refs of `batch_ids` (in that order), leased to `consumer`; waits until all were put.

        ticket: the consumer's number for this lease (increasing per consumer; see `release`). Raises
        TimeoutError after `timeout` s, and RuntimeError if a batch is leased to another consumer (an
        assignment bug) or if `consumer` was declared dead meanwhile (its actor is gone; see `requeue`).
        """
        ids = [tuple(b) for b in batch_ids]
        start = time.perf_counter()

        def ready() -> bool:
            if consumer in self._dead:
                return True  # wake up to fail below
            return all(b in self._entries for b in ids)

        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(ready), timeout)
            except asyncio.TimeoutError:
                missing = [b for b in ids if b not in self._entries]
                raise TimeoutError(
                    f"buffer shard {self.index}: batches {missing} were not produced within {timeout:g} s "
                    f"(consumer {consumer}); is the teacher side alive?"
                ) from None
            finally:
                self._stats["consumer_wait_s"] += time.perf_counter() - start
            if consumer in self._dead:
                raise RuntimeError(f"buffer shard {self.index}: consumer {consumer} was requeued as dead")
            for b in ids:
                holder = self._entries[b].consumer
                if holder not in (None, consumer):
                    raise RuntimeError(f"batch {b} is leased to {holder}; {consumer} cannot lease it too")
            for b in ids:
                entry = self._entries[b]
                entry.ticket = max(entry.ticket, ticket) if entry.consumer == consumer else ticket
                entry.consumer = consumer
                self._stats["bytes_leased"] += entry.nbytes
            self._stats["leases"] += len(ids)
            return [self._entries[b].payload[0] for b in ids]

    async def ack(self, batch_ids: Sequence[BatchId]) -> None:
        """Release leased batches whose optimizer step is committed and count their consumption."""
        ids = [tuple(b) for b in batch_ids]
        async with self._cond:
            not_leased = [b for b in ids if b not in self._entries or self._entries[b].consumer is None]
            if not_leased:
                raise RuntimeError(f"buffer shard {self.index}: ack of batches not leased: {not_leased}")
            for b in ids:
                self._bytes -= self._entries.pop(b).nbytes
                self._commits[b] += 1
            self._stats["acks"] += len(ids)
            self._cond.notify_all()

    async def requeue(self, consumers: Sequence[str]) -> int:
        """Declare `consumers` dead: their leases become ready again and their pending leases fail."""
        async with self._cond:
            self._dead.update(consumers)
            n = 0
            for entry in self._entries.values():
                if entry.consumer in self._dead:
                    entry.consumer = None
                    n += 1
            self._stats["requeued"] += n
            self._cond.notify_all()
            return n

    async def release(self, batch_ids: Sequence[BatchId], consumer: str, ticket: int) -> int:
        """Make batches leased to `consumer` by its lease `ticket` ready again, unacked (a prefetch it will not
        train on). A batch the consumer has leased again since (a newer ticket), or that is not leased to it,
        is left as it is. Returns how many were released."""
        n = 0
        for b in map(tuple, batch_ids):
            entry = self._entries.get(b)
            if entry is not None and entry.consumer == consumer and entry.ticket == ticket:
                entry.consumer, entry.ticket = None, 0
                n += 1
        self._stats["released"] += n
        return n

    async def rollback(self, batch_ids: Sequence[BatchId]) -> int:
        """Uncount acked batches whose steps a restore undid (they will be consumed again)."""
        n = 0
        for b in (tuple(b) for b in batch_ids):
            if self._commits.get(b, 0) > 0:
                self._commits[b] -= 1
                n += 1
                if not self._commits[b]:
                    del self._commits[b]
        self._stats["rolled_back"] += n
        return n

    async def peek(self, batch_ids: Sequence[BatchId]) -> list:
        """The wrapped refs of held batches (ready or leased), without leasing them: a reader beside the
        consumers (the continual driver copies consumed rows into its replay buffer before the ack)."""
        missing = [b for b in map(tuple, batch_ids) if b not in self._entries]
        if missing:
            raise KeyError(f"buffer shard {self.index} holds none of {missing}")
        return [self._entries[tuple(b)].payload[0] for b in batch_ids]

    async def ping(self) -> str:
        """This shard's node id (see `Buffer.dead_shards`)."""
        return ray.get_runtime_context().get_node_id()

    async def clear(self) -> int:
        """Drop every batch held, unacked (after a node's loss their payloads may be gone with its object store;
        the driver re-produces them from its checkpoint's cursor). Pending puts and leases are woken."""
        async with self._cond:
            n = len(self._entries)
            self._entries.clear()
            self._bytes = 0
            self._cond.notify_all()
            return n

    async def held(self) -> list[BatchId]:
        """Ids of the batches currently held (ready or leased)."""
        return list(self._entries)

    async def consumption(self) -> dict[BatchId, int]:
        """Committed consumption count per acked batch id."""
        return dict(self._commits)

    async def stats(self) -> dict:
        """The shard's counters and figures (numbers), and its process's `memory` (a `MemoryPeaks`)."""
        leased = sum(e.consumer is not None for e in self._entries.values())
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        return {
            **self._stats,
            "depth": len(self._entries),
            "leased": leased,
            "bytes_held": self._bytes,
            "put_bytes_per_s": self._stats["bytes_put"] / elapsed,
            "lease_bytes_per_s": self._stats["bytes_leased"] / elapsed,
            "cpu_s": _process_cpu_seconds(),
            "memory": measure(),
        }


def _process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Buffer:
    """Client of the S shards; picklable (actor handles), so the students hold one too.

    batches_per_epoch maps a batch id (epoch, index) to its stream position, which picks the shard.
    A dead shard is replaced by the driver (`replace_dead`: a new, empty shard at the same index); its batches
    are re-produced from the last checkpoint's cursor (see `distill.cluster.driver.Driver._recover`).
    """

    def __init__(
        self,
        shards: list,
        batches_per_epoch: int,
        *,
        capacity_per_shard: int = 0,
        max_bytes_per_shard: int | None = None,
    ) -> None:
        self.shards, self.batches_per_epoch = shards, batches_per_epoch
        self.capacity_per_shard, self.max_bytes_per_shard = capacity_per_shard, max_bytes_per_shard
        self.replaced = 0  # shards replaced after their death

    @classmethod
    def create(
        cls,
        *,
        shards: int,
        capacity_per_shard: int,
        batches_per_epoch: int,
        max_bytes_per_shard: int | None = None,
    ) -> Buffer:
        """S shard actors, spread round-robin over the live nodes (a node's loss takes only its share)."""
        buffer = cls(
            [],
            batches_per_epoch,
            capacity_per_shard=capacity_per_shard,
            max_bytes_per_shard=max_bytes_per_shard,
        )
        nodes = [n.node_id for n in alive_nodes()]
        buffer.shards = [buffer._new_shard(i, nodes[i % len(nodes)]) for i in range(shards)]
        return buffer

    def _new_shard(self, index: int, node_id: str | None):
        # max_restarts=0: a restarted shard would come back empty while its clients believe it holds batches;
        # the driver replaces a dead one itself (replace_dead) and re-produces what it held.
        # Soft affinity: a node that is gone (or full) does not stop the shard from starting elsewhere.
        strategy = NodeAffinitySchedulingStrategy(node_id, soft=True) if node_id is not None else "DEFAULT"
        return (
            ray.remote(BufferShard)
            .options(
                num_cpus=0,
                max_restarts=0,
                max_concurrency=1000,
                scheduling_strategy=strategy,
                **NO_TASK_EVENTS,
            )
            .remote(index, self.capacity_per_shard, self.max_bytes_per_shard)
        )

    def dead_shards(self, timeout: float = 30.0) -> list[int]:
        """Indices of the shards that are dead, silent for `timeout` s, or on a node that is gone: a shard's
        process may still answer for a moment after its node was removed (calls go to it directly), then die."""
        pings = [s.ping.remote() for s in self.shards]
        dead, alive = [], alive_node_ids()
        for i, ping in enumerate(pings):
            try:
                if ray.get(ping, timeout=timeout) not in alive:
                    dead.append(i)
            except (RayActorError, GetTimeoutError):
                dead.append(i)
        return dead

    def replace_dead(self) -> list[int]:
        """Replace every dead shard by a new, empty one at its index (the batches it held must be produced
        again; the driver does that from its checkpoint's cursor); returns the indices replaced."""
        dead = self.dead_shards()
        for i in dead:
            ray.kill(self.shards[i], no_restart=True)
            self.shards[i] = self._new_shard(i, None)
        self.replaced += len(dead)
        return dead

    def clear(self) -> int:
        """Drop every held batch on every shard (see BufferShard.clear); returns how many were dropped."""
        return sum(ray.get([s.clear.remote() for s in self.shards]))

    def kill_shard(self, index: int) -> None:
        """Failure injection for tests and chaos drills."""
        ray.kill(self.shards[index], no_restart=True)

    def shard_of(self, batch_id: BatchId) -> int:
        epoch, index = batch_id
        return (epoch * self.batches_per_epoch + index) % len(self.shards)

    def _by_shard(self, batch_ids: Sequence[BatchId]) -> dict[int, list[BatchId]]:
        groups: dict[int, list[BatchId]] = defaultdict(list)
        for b in batch_ids:
            groups[self.shard_of(b)].append(tuple(b))
        return groups

    def put(
        self,
        batch_id: BatchId,
        ref: ray.ObjectRef,
        nbytes: int,
        *,
        timeout: float | None = 0.0,
        force: bool = False,
    ) -> str:
        """Hand one TeacherBatch ref to its shard; "ok", "full" (no room within `timeout` s) or "exists"."""
        return ray.get(self.put_async(batch_id, ref, nbytes, timeout=timeout, force=force))

    def put_async(
        self,
        batch_id: BatchId,
        ref: ray.ObjectRef,
        nbytes: int,
        *,
        timeout: float | None = None,
        force: bool = False,
    ) -> ray.ObjectRef:
        """`put` without waiting for the answer (a ref to it): a producer keeps several puts in flight and
        is held back by the ones that do not complete while the buffer is full (timeout None)."""
        shard = self.shards[self.shard_of(batch_id)]
        return shard.put.remote(tuple(batch_id), [ref], nbytes, timeout=timeout, force=force)

    def put_many_async(
        self, items: Sequence[tuple[BatchId, ray.ObjectRef, int]], *, timeout: float | None = None
    ) -> list[ray.ObjectRef]:
        """Several (batch_id, ref, nbytes) in one call per shard; refs to each shard's list of answers."""
        groups: dict[int, list] = defaultdict(list)
        for batch_id, ref, nbytes in items:
            groups[self.shard_of(batch_id)].append((tuple(batch_id), [ref], nbytes))
        return [self.shards[s].put_many.remote(g, timeout=timeout) for s, g in groups.items()]

    def lease(
        self, batch_ids: Sequence[BatchId], consumer: str, *, timeout: float = 600.0, ticket: int = 0
    ) -> list:
        """TeacherBatch refs of `batch_ids` in that order (one call per shard, in parallel)."""
        groups = self._by_shard(batch_ids)
        calls = {s: self.shards[s].lease.remote(ids, consumer, timeout, ticket) for s, ids in groups.items()}
        refs = {}
        for s, got in zip(calls, ray.get(list(calls.values())), strict=True):
            refs.update(zip(groups[s], got, strict=True))
        return [refs[tuple(b)] for b in batch_ids]

    def peek(self, batch_ids: Sequence[BatchId]) -> list:
        """TeacherBatch refs of held batches in that order, without leasing them (see BufferShard.peek)."""
        groups = self._by_shard(batch_ids)
        calls = {s: self.shards[s].peek.remote(ids) for s, ids in groups.items()}
        refs = {}
        for s, got in zip(calls, ray.get(list(calls.values())), strict=True):
            refs.update(zip(groups[s], got, strict=True))
        return [refs[tuple(b)] for b in batch_ids]

    def ack(self, batch_ids: Sequence[BatchId], *, wait: bool = True) -> list[ray.ObjectRef]:
        """Release batches whose step is committed (see BufferShard.ack). wait=False returns at once with refs
        to the shards' answers: ray.get them before relying on the counts (shards are asyncio actors, so a
        later call may run before an ack still in flight)."""
        refs = [self.shards[s].ack.remote(ids) for s, ids in self._by_shard(batch_ids).items()]
        if wait:
            ray.get(refs)
        return refs

    def release(self, batch_ids: Sequence[BatchId], consumer: str, *, ticket: int) -> int:
        """See BufferShard.release; returns how many batches were made ready again."""
        groups = self._by_shard(batch_ids)
        return sum(
            ray.get([self.shards[s].release.remote(ids, consumer, ticket) for s, ids in groups.items()])
        )

    def rollback(self, batch_ids: Sequence[BatchId]) -> int:
        return sum(ray.get([self.shards[s].rollback.remote(i) for s, i in self._by_shard(batch_ids).items()]))

    def requeue(self, consumers: Sequence[str]) -> int:
        return sum(ray.get([s.requeue.remote(list(consumers)) for s in self.shards]))

    def held(self) -> set[BatchId]:
        return {tuple(b) for ids in ray.get([s.held.remote() for s in self.shards]) for b in ids}

    def consumption(self) -> dict[BatchId, int]:
        out: dict[BatchId, int] = {}
        for part in ray.get([s.consumption.remote() for s in self.shards]):
            out.update(part)
        return dict(sorted(out.items()))

    def stats(self) -> dict[str, float]:
        """Sums over shards (depth, waits, bytes, counters)."""
        return self.total_stats(ray.get(self.stats_async()))

    def stats_async(self) -> list[ray.ObjectRef]:
        """`stats` without waiting: refs to the shards' figures (sampled when they run); fetched, they give
        `total_stats` and `shard_memory`."""
        return [s.stats.remote() for s in self.shards]

    @staticmethod
    def total_stats(parts: list[dict]) -> dict[str, float]:
        """The shards' figures (`BufferShard.stats`), summed; memory is not a sum (see `shard_memory`)."""
        total: dict[str, float] = defaultdict(float)
        for part in parts:
            for k, v in part.items():
                if k != "memory":
                    total[k] += v
        return dict(total)

    @staticmethod
    def shard_memory(parts: list[dict]) -> dict[str, MemoryPeaks]:
        """Shard index -> its process's memory, from the shards' figures (`BufferShard.stats`)."""
        return {str(i): part["memory"] for i, part in enumerate(parts)}

    def shutdown(self) -> None:
        for s in self.shards:
            ray.kill(s, no_restart=True)
        self.shards = []
