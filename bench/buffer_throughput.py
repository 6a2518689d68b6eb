"""Buffer throughput: TeacherBatch payloads put by one actor and leased + fetched by another, against a raw
`ray.put` / `ray.get` of the same payloads between the same two actors.

Both paths copy each payload into the object store once (`ray.put` in the producer) and fetch it zero-copy in the
consumer (same node); the buffer path adds its reference bookkeeping (put, lease, ack calls on a shard actor,
with backpressure). The consumer reads through `distill.cluster.prefetch.Prefetcher`, as the student ranks do
(the next step's lease and fetch in flight while a step is used). Target: buffer >= 0.8x raw.

A third figure, the relay floor, separates Ray's cost from the buffer's: the same refs handed through a plain
actor holding a dict (no bound, lease or ack). Any design that keeps refs in actors between teacher and student
pays that floor: each ref is borrowed twice, and Ray's borrower bookkeeping (owner <-> borrower RPCs per ref)
costs more CPU than the calls themselves.

The buffer's cost is per batch (calls and ref bookkeeping), not per byte, so the ratio grows with the payload.
On the 2-core dev VM (medians of 5): 4 MiB 0.48x raw, 8 MiB 0.56x, 16 MiB 1.10x, with the raw baseline
itself swinging by 2x from run to run.

    python bench/buffer_throughput.py                      # production-like batches: B 8, T 1024, k 64 (~4 MiB)
    python bench/buffer_throughput.py --seq 4096           # long reasoning traces: T 4096 (~16 MiB)
    python bench/buffer_throughput.py --seq 64 --k 16      # the tiny test runs' size (~80 KiB)
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import ray

from distill.cluster.buffer import PUT_OK, Buffer
from distill.cluster.prefetch import Prefetcher


def make_batch(index: int, b: int, t: int, k: int):
    from distill.batch import TeacherBatch

    rng = np.random.default_rng(index)
    return TeacherBatch(
        batch_id=(0, index),
        input_ids=rng.integers(0, 32000, (b, t), dtype=np.int32),
        attention_mask=np.ones((b, t), dtype=bool),
        loss_mask=np.ones((b, t), dtype=bool),
        topk_ids=rng.integers(0, 32000, (b, t, k), dtype=np.int32),
        topk_logits=rng.standard_normal((b, t, k), dtype=np.float32),
        log_normalizer=rng.standard_normal((b, t), dtype=np.float32),
    )


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@ray.remote(num_cpus=1)
class Producer:
    def __init__(self, b: int, t: int, k: int, distinct: int = 4) -> None:
        # A few distinct payloads reused: the figure is about moving bytes, not about making random numbers.
        self.batches = [make_batch(i, b, t, k) for i in range(distinct)]
        self.nbytes = self.batches[0].nbytes()

    def cpu_seconds(self) -> float:
        return _cpu_seconds()

    def payload_bytes(self) -> int:
        return self.nbytes

    def raw(self, n: int, per_call: int, consumer, in_flight: int) -> float:
        """ray.put every payload and hand the refs straight to the consumer, per_call at a time, at most
        `in_flight` calls unanswered (the buffer path's bound). Unbounded, the producer ran up to the whole
        run's payload ahead of the consumer into fresh object-store pages, and the figure swung between
        ~1200 and ~2300 MiB/s from run to run."""
        start = time.perf_counter()
        pending: list = []
        for first in range(0, n, per_call):
            refs = [[ray.put(self.batches[i % len(self.batches)])] for i in range(first, first + per_call)]
            pending.append(consumer.fetch.remote(refs))
            if len(pending) >= in_flight:
                _, pending = ray.wait(pending, num_returns=1)
        ray.get(pending)
        return time.perf_counter() - start

    def relayed(self, n: int, per_call: int, relay) -> None:
        """ray.put every payload and hand the refs to the relay, per_call at a time."""
        calls = []
        for first in range(0, n, per_call):
            items = [
                ((0, i), [ray.put(self.batches[i % len(self.batches)])])
                for i in range(first, first + per_call)
            ]
            calls.append(relay.put_many.remote(items))
        ray.get(calls)

    def buffered(self, n: int, per_call: int, buffer: Buffer, in_flight: int) -> float:
        """ray.put every payload and put the refs into the buffer per_call at a time (as the raw path hands
        them over), at most `in_flight` calls unanswered. A put into a full shard waits there until the
        consumer's ack makes room: that is the backpressure."""
        start = time.perf_counter()
        pending: list = []
        for first in range(0, n, per_call):
            items = [
                ((0, i), ray.put(self.batches[i % len(self.batches)]), self.nbytes)
                for i in range(first, first + per_call)
            ]
            pending += buffer.put_many_async(items)
            while len(pending) >= in_flight:
                done, pending = ray.wait(pending, num_returns=1)
                assert set(ray.get(done[0])) == {PUT_OK}
        assert all(set(answers) == {PUT_OK} for answers in ray.get(pending))
        return time.perf_counter() - start


@ray.remote(num_cpus=0)
class Relay:
    """The floor of any design that keeps refs in a third actor: a dict of refs, no bound, no lease or ack.
    Each ref is borrowed twice (producer -> relay -> consumer), as in the buffer; only the bookkeeping differs."""

    def __init__(self) -> None:
        self.refs: dict = {}

    def cpu_seconds(self) -> float:
        return _cpu_seconds()

    def put_many(self, items: list) -> None:
        for batch_id, wrapped in items:
            self.refs[batch_id] = wrapped

    def take(self, batch_ids: list) -> list | None:
        if not all(b in self.refs for b in batch_ids):
            return None
        return [self.refs.pop(b)[0] for b in batch_ids]


@ray.remote(num_cpus=1)
class Consumer:
    def cpu_seconds(self) -> float:
        return _cpu_seconds()

    def fetch(self, wrapped: list) -> int:
        batches = ray.get([w[0] for w in wrapped])
        return sum(b.nbytes() for b in batches)

    def take_all(self, n: int, per_step: int, relay) -> int:
        """per_step refs at a time from the relay (asked again until the producer has put them all)."""
        total = 0
        for first in range(0, n, per_step):
            ids = [(0, i) for i in range(first, first + per_step)]
            while (refs := ray.get(relay.take.remote(ids))) is None:
                time.sleep(0.0005)
            total += sum(b.nbytes() for b in ray.get(refs))
        return total

    def lease_all(self, n: int, per_step: int, buffer: Buffer) -> tuple[float, int]:
        """Lease, fetch and ack per_step batches at a time (one optimizer step's worth) with the students' own
        `Prefetcher`: step s+1's lease and fetch are in flight while step s is used and acked."""
        steps = [[(0, i) for i in range(first, first + per_step)] for first in range(0, n, per_step)]
        batches = Prefetcher(buffer, "bench")
        start, total, acks = time.perf_counter(), 0, []
        for s, ids in enumerate(steps):
            got = batches.take(ids)
            if s + 1 < len(steps):
                batches.prefetch(steps[s + 1])
            total += sum(b.nbytes() for b in got)
            # The driver's part, as Driver._train_step does it: the step's ack is sent without waiting, the
            # previous one settled first.
            ray.get(acks)
            acks = buffer.ack(ids, wait=False)
        ray.get(acks)
        batches.close()
        return time.perf_counter() - start, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--mib", type=float, default=1024, help="total payload moved per measurement")
    p.add_argument("--per-step", type=int, default=4, help="batches leased per call (one optimizer step)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--capacity", type=int, default=16)
    p.add_argument(
        "--in-flight", type=int, default=4, help="unanswered put calls per producer (raw and buffer)"
    )
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    producer = Producer.remote(args.batch, args.seq, args.k)
    consumer = Consumer.remote()
    nbytes = ray.get(producer.payload_bytes.remote())
    n = max(args.per_step, int(args.mib * 2**20 / nbytes) // args.per_step * args.per_step)
    mib = n * nbytes / 2**20
    print(
        f"payload {nbytes / 2**20:.3f} MiB/batch (B {args.batch}, T {args.seq}, k {args.k}), {n} batches "
        f"= {mib:.0f} MiB per run, {args.per_step} batches per lease, {args.shards} shards x "
        f"{args.capacity // args.shards} capacity"
    )
    ray.get(producer.raw.remote(args.per_step * 4, args.per_step, consumer, args.in_flight))  # warm-up
    raw, relayed, buffered = [], [], []
    cpu = {"raw": [], "relay": [], "buffer": []}

    def cpu_now(shards=(), relay=None) -> list[float]:
        """CPU seconds so far of the producer, the consumer and the actors in between."""
        between = [ray.get(s.stats.remote())["cpu_s"] for s in shards]
        if relay is not None:
            between.append(ray.get(relay.cpu_seconds.remote()))
        return ray.get([a.cpu_seconds.remote() for a in (producer, consumer)]) + between

    for _ in range(args.repeats):
        before = cpu_now()
        raw.append(mib / ray.get(producer.raw.remote(n, args.per_step, consumer, args.in_flight)))
        cpu["raw"].append([b - a for a, b in zip(before, cpu_now(), strict=True)])
        relay = Relay.remote()
        before = cpu_now(relay=relay)
        start = time.perf_counter()
        taken = consumer.take_all.remote(n, args.per_step, relay)
        ray.get(producer.relayed.remote(n, args.per_step, relay))
        assert ray.get(taken) == n * nbytes
        relayed.append(mib / (time.perf_counter() - start))
        cpu["relay"].append([b - a for a, b in zip(before, cpu_now(relay=relay), strict=True)])
        ray.kill(relay)
        buffer = Buffer.create(
            shards=args.shards, capacity_per_shard=args.capacity // args.shards, batches_per_epoch=n
        )
        before = cpu_now(buffer.shards)
        consumed = consumer.lease_all.remote(n, args.per_step, buffer)
        start = time.perf_counter()
        ray.get(producer.buffered.remote(n, args.per_step, buffer, args.in_flight))
        _, total = ray.get(consumed)
        elapsed = time.perf_counter() - start
        cpu["buffer"].append([b - a for a, b in zip(before, cpu_now(buffer.shards), strict=True)])
        assert total == n * nbytes
        buffered.append(mib / elapsed)
        stats = buffer.stats()
        buffer.shutdown()
    r, b = float(np.median(raw)), float(np.median(buffered))
    print(
        f"raw ray.put/ray.get : {r:9.1f} MiB/s  ({n / (mib / r):.0f} batches/s)  runs {[round(x) for x in raw]}"
    )
    f = float(np.median(relayed))
    print(
        f"relay floor         : {f:9.1f} MiB/s  ({n / (mib / f):.0f} batches/s)  runs {[round(x) for x in relayed]}"
    )
    print(
        f"buffer put/lease/ack: {b:9.1f} MiB/s  ({n / (mib / b):.0f} batches/s)  runs {[round(x) for x in buffered]}"
    )
    print(
        f"ratio {b / r:.2f}x raw (target >= 0.8x), relay floor {f / r:.2f}x raw, buffer {b / f:.2f}x relay; last run: producer waited {stats['producer_wait_s']:.2f} s, "
        f"consumer waited {stats['consumer_wait_s']:.2f} s"
    )
    for mode, runs in cpu.items():
        between = ["relay"] if mode == "relay" else [f"shard{i}" for i in range(len(runs[-1]) - 2)]
        names = ["producer", "consumer", *between]
        per = ", ".join(f"{name} {sec / n * 1e3:.2f}" for name, sec in zip(names, runs[-1], strict=True))
        print(f"CPU ms per batch ({mode}, last run): {per}")
    ray.shutdown()


if __name__ == "__main__":
    main()
