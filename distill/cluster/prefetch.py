"""Consumer-side lease-ahead: the next step's batches are leased and fetched while this step trains.

Without it a student starts every step with a lease (one call per shard) and a fetch (`ray.get` of the
payloads) on its critical path. The driver knows the next step's assignment, so it hands every rank the ids it
will train on next as a hint; `Prefetcher.prefetch` leases and fetches them on a background thread, and the next
`take` of the same ids returns them as soon as they are there.

Exactly-once is kept because a prefetch is an ordinary lease under the consumer's own name:
- it is acked only by whoever acks the step that trained on it (the driver, once the step is committed);
- if the consumer dies, `Buffer.requeue` returns its prefetched leases like any other (and a prefetch lease still
  waiting on a shard fails there, because the consumer is declared dead);
- a prefetch that the next `take` does not ask for is released (made ready again, never acked). Each lease
  carries a ticket that grows per Prefetcher, so a late release of a stale prefetch never frees a batch that a
  newer lease of the same consumer holds.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray

from distill.cluster.buffer import BatchId, Buffer


class Prefetcher:
    """Leases and fetches one set of batch ids ahead for one buffer consumer (a student rank, the bench's reader).

    convert: applied to each fetched TeacherBatch on the fetching thread (e.g. to torch tensors), so that work
        leaves the critical path too. Not thread-safe: one caller thread, as in an actor.
    """

    def __init__(
        self,
        buffer: Buffer,
        consumer: str,
        *,
        timeout: float = 600.0,
        convert: Callable[[Any], Any] | None = None,
    ) -> None:
        self.buffer, self.consumer, self.timeout, self.convert = buffer, consumer, timeout, convert
        self.hits = self.misses = 0
        self._tickets = itertools.count(1)
        # One thread: a prefetch is a chain of blocking Ray calls, and only one is ever outstanding.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"prefetch-{consumer}")
        self._ahead: tuple[tuple[BatchId, ...], int, Future] | None = None

    def prefetch(self, batch_ids: Sequence[BatchId]) -> None:
        """Start leasing and fetching `batch_ids` in the background (returns at once)."""
        ids = _key(batch_ids)
        if self._ahead is not None:
            if self._ahead[0] == ids:
                return
            self._drop(self._ahead, keep=ids)
        ticket = next(self._tickets)
        self._ahead = (ids, ticket, self._pool.submit(self._fetch, ids, ticket))

    def take(self, batch_ids: Sequence[BatchId]) -> list:
        """The batches of `batch_ids` in that order, leased to this consumer: the prefetched ones if the ids are
        the ones last prefetched (waiting for them if still in flight), else leased and fetched now."""
        ids = _key(batch_ids)
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if ahead[0] == ids:
                self.hits += 1
                return ahead[2].result()
            self._drop(ahead, keep=ids)
        self.misses += 1
        return self._fetch(ids, next(self._tickets))

    def close(self) -> None:
        """Release an unused prefetch and stop the thread (without waiting for a lease still on a shard)."""
        if self._ahead is not None:
            self._drop(self._ahead, keep=())
            self._ahead = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _fetch(self, ids: tuple[BatchId, ...], ticket: int) -> list:
        refs = self.buffer.lease(ids, self.consumer, timeout=self.timeout, ticket=ticket)
        batches = ray.get(refs)  # straight from the producer's object store: zero copy on the same node
        return batches if self.convert is None else [self.convert(b) for b in batches]

    def _drop(self, ahead: tuple[tuple[BatchId, ...], int, Future], keep: Sequence[BatchId]) -> None:
        """Give back a prefetch nobody will train on, once its lease is granted (at once if it already is);
        ids in `keep` are about to be leased again by this consumer and stay leased."""
        ids, ticket, future = ahead
        if future.cancel():
            return  # never started: nothing was leased
        kept = set(keep)
        stale = [b for b in ids if b not in kept]

        def release(done: Future) -> None:
            if stale and not done.cancelled() and done.exception() is None:
                self.buffer.release(stale, self.consumer, ticket=ticket)

        future.add_done_callback(release)


def _key(batch_ids: Sequence[BatchId]) -> tuple[BatchId, ...]:
    return tuple((int(e), int(i)) for e, i in batch_ids)
