"""Soak: a long online run (teacher actor -> buffer shard -> DeepSpeed student rank, a local Ray instance) whose
memory must stop growing once warmed up.

    flock /tmp/ray.lock nice -n 10 python bench/soak.py                           # 2,000 steps, ~15 min on 2 cores
    flock /tmp/ray.lock nice -n 10 python bench/soak.py --steps 200 --warmup 100  # a quick try
    python bench/soak.py --report /tmp/soak_run_xxxx                               # a finished soak's figures again

The run is the product's (`distill.run.run`): `cluster=local_ray` with a buffer of capacity 2, a checkpoint every
100 steps (2 kept), a metrics row every 20 steps, the tests' tiny demo teacher (trained by prepare-demo on first
use, ~1 min, cached under $DISTILL_CACHE, default /tmp/soak_cache) and ci_tiny's student and data (32 batches an
epoch: the stream cycles epochs, 2,000 steps are 125 of them). This process starts Ray itself (the run's
`distill.cluster.runtime.connect` reuses it) so that it can sample it while the run trains.

Figures:
  RSS per process: `mem/<role>/rss_mib` of the run's metrics rows (distill/tracking/memory.py), which the driver
    gathers from replies it has anyway: driver, student ranks, teacher actors, buffer shards. Ray's own processes
    (raylet, which holds the object store, and gcs_server): psutil, sampled by this process.
  Object store: `store_stats.object_store_bytes_used` of the raylet's memory report
    (`ray._private.internal_api.get_memory_info_reply`, what `ray memory --stats-only` prints). Private, but the
    only figure of the store's use without the dashboard in Ray 2.60: `ray.available_resources()` reports
    object_store_memory as a scheduling quantity that never moves, and `ray.util.state` needs the dashboard.
  Sampled every --sample-s seconds with it: the driver's live object refs (Ray's reference table), its glibc heap
  (bytes in use vs freed and kept: a leak vs fragmentation) and the run folder's size (checkpoints included).
Growth is measured from the metrics row at --warmup steps to the last one (Ray's processes: the samples beside
them). The store's use swings with how far the teacher runs ahead and how late Ray frees released objects on
busy cores (here 0.1 to ~1.8 MiB within any 100 steps; once 2.9 MiB, 42 objects, on cores shared with other jobs),
so a leak is judged by its floor: the least it held over the first quarter of the steps after warm-up against the
last quarter (450 steps each by default: ~150 samples; one checkpoint interval holds too few samples on busy cores
for its least to mean anything). Objects kept that should have been freed raise every sample, the floor included;
batches in flight only lift the peaks (the peak over a checkpoint interval swung by up to 1 MiB between two
intervals of the same healthy run, December 2026, so the peak's growth is printed, not judged). The bound is what the pipeline may hold at once
(`pipeline_batches` x the mean batch the buffer was given, online_stats.json): a floor that rises by more than that
after warm-up is something kept that should not be.

Target: the run's processes (driver, student ranks, teacher actors, buffer shards) grow by less than 5% in RSS
after warm-up, and the store by less than its bound. Ray's raylet and gcs_server are printed beside them but left
out of the target: the raylet settles only after ~800 steps here (+3 MiB on 36 MiB, then flat).

Found with it (Ray 2.60, December 2026), both outside this file:
  - the driver kept every TeacherBatch that came back inline (< 100 KiB) once a buffer shard had held it: ~50 KB
    a step, unbounded (Ray's in-memory copy of a promoted inline object is never freed);
  - gcs_server kept the task events of every actor call (~3.6 KB each, up to 100,000 tasks).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_env import TINY, offline_cpu_environment

TARGET_PCT = 5.0
MIB = 1 << 20
RAY_PROCESSES = (("ray raylet", "raylet_rss"), ("ray gcs_server", "gcs_rss"))


@dataclass(frozen=True)
class Sample:
    """What the sampler thread saw at one moment of the run (bytes unless named otherwise)."""

    seconds: float
    step: int  # steps done at the last metrics row written (0 before the first)
    store_bytes: int  # the object store's use (every node: here one)
    store_objects: int
    driver_refs: int  # object refs this process holds
    raylet_rss: int
    gcs_rss: int
    run_dir_bytes: int
    heap_used: int  # this (the driver) process's malloc heap: handed out, and freed but kept (-1: not glibc)
    heap_free: int


def steps_done(metrics: Path) -> int:
    """Steps done at the last row of a metrics.jsonl being appended to (rows are written and flushed whole)."""
    try:
        with metrics.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"]) + 1
        except (ValueError, KeyError):
            continue  # the cut first line of the tail
    return 0


def folder_bytes(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # a checkpoint deleted while we walk
                total += os.stat(os.path.join(folder, name)).st_size
    return total


class _Mallinfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (2.33+): ten size_t counters."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap() -> dict[str, int]:
    """glibc's malloc figures of this process: in use (small + mmapped chunks) and free in its arenas. Tells an
    RSS that grows with live allocations (something native holds more) from one of freed, unreturned pages."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {"heap_used": -1, "heap_free": -1}
    mallinfo2.restype = _Mallinfo2
    m = mallinfo2()
    return {"heap_used": m.uordblks + m.hblkhd, "heap_free": m.fordblks}


class Sampler(threading.Thread):
    """Samples the object store, Ray's own processes, this process and the run folder every `every_s` s."""

    def __init__(self, run_dir: Path, every_s: float) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        import psutil
        import ray
        from ray._private import internal_api

        node = ray._private.worker._global_node
        self._state = internal_api.get_state_from_address(node.address)
        self._memory_reply = internal_api.get_memory_info_reply
        self._core = ray._private.worker.global_worker.core_worker
        self._raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        self._gcs = psutil.Process(node.all_processes["gcs_server"][0].process.pid)
        self.run_dir, self.every_s = run_dir, every_s
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self._halt = threading.Event()
        self._start = time.perf_counter()

    def sample(self) -> None:
        store = self._memory_reply(self._state, timeout_seconds=30).store_stats
        self.samples.append(
            Sample(
                seconds=time.perf_counter() - self._start,
                step=steps_done(self.run_dir / "metrics.jsonl"),
                store_bytes=int(store.object_store_bytes_used),
                store_objects=int(store.num_local_objects),
                driver_refs=len(self._core.get_all_reference_counts()),
                raylet_rss=self._raylet.memory_info().rss,
                gcs_rss=self._gcs.memory_info().rss,
                run_dir_bytes=folder_bytes(self.run_dir),
                **heap(),
            )
        )

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            try:
                self.sample()
            except Exception as err:  # a lost sample is a gap in the curve, not a failed soak
                self.errors.append(repr(err))

    def stop(self) -> None:
        self._halt.set()
        self.join()


def soak(args: argparse.Namespace) -> Path:
    """Train the run while sampling; returns its folder (metrics.jsonl, soak_samples.jsonl, soak.json)."""
    offline_cpu_environment(DISTILL_CACHE="/tmp/soak_cache")

    import ray

    from distill.config import compose
    from distill.run import run
    from launch.prepare_demo import prepare_demo

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="soak_run_", dir="/tmp"))
    cfg = compose(
        [
            *TINY,
            "cluster=local_ray",
            f"cluster.buffer_capacity={args.capacity}",
            f"checkpoint.every_steps={args.checkpoint_every}",
            "checkpoint.keep=2",
            f"train.steps={args.steps}",
            f"train.log_every={args.log_every}",
            "eval.generate_examples=0",
            "tracking.grad_shares=false",
        ],
        run_dir=str(run_dir),
    )
    prepare_demo(cfg)  # before Ray starts: a first use trains the teacher in this process
    ray.init(
        address="local", num_cpus=cfg.cluster.cpus_per_node, include_dashboard=False, logging_level="ERROR"
    )
    sampler = Sampler(run_dir, args.sample_s)
    sampler.sample()
    sampler.start()
    start = time.perf_counter()
    try:
        run(cfg)
    finally:
        sampler.stop()
        seconds = time.perf_counter() - start
        ray.shutdown()
    with (run_dir / "soak_samples.jsonl").open("w") as f:
        f.writelines(json.dumps(asdict(s)) + "\n" for s in sampler.samples)
    soak_json = {"args": vars(args), "seconds": seconds, "sample_errors": sampler.errors}
    (run_dir / "soak.json").write_text(json.dumps(soak_json, indent=1))
    return run_dir


def growth(start: float, end: float) -> float:
    return 100.0 * (end - start) / start if start else 0.0


def pipeline_batches(cluster) -> int:
    """Batches the online pipeline may hold in the object store at once: the buffer's capacity, a committed
    step's batches whose release is in flight (acks are not waited for), and the teacher's batches in flight
    plus the one its producer holds while the buffer is full."""
    import inspect

    from distill.cluster.teacher_group import TeacherGroup

    per_replica = inspect.signature(TeacherGroup).parameters["max_in_flight_per_replica"].default
    per_step = cluster.grad_accum_steps * cluster.student_world_size
    return cluster.buffer_capacity + per_step + per_replica * cluster.teacher_replicas + 1


def report(run_dir: Path) -> None:
    from omegaconf import OmegaConf

    from distill.tracking.memory import final_peaks, split_key
    from distill.tracking.metrics_log import read_metrics

    meta = json.loads((run_dir / "soak.json").read_text())
    args, errors = argparse.Namespace(**meta["args"]), meta["sample_errors"]
    rows = read_metrics(run_dir / "metrics.jsonl")
    with (run_dir / "soak_samples.jsonl").open() as f:
        every_sample = [Sample(**json.loads(line)) for line in f]
    samples = [s for s in every_sample if s.step > 0]  # from the first metrics row on
    buffer = json.loads((run_dir / "online_stats.json").read_text())["buffer"]
    batch_bytes = buffer["bytes_put"] / max(buffer["puts"], 1)
    held = pipeline_batches(OmegaConf.load(run_dir / "config.yaml").cluster)
    warm, last = {r["step"] + 1: r for r in rows}[args.warmup], rows[-1]
    end, every = last["step"] + 1, args.checkpoint_every
    print(
        f"soak: {end} steps of cluster=local_ray (buffer capacity {args.capacity}, a checkpoint every {every} "
        f"steps, 2 kept) in {meta['seconds'] / 60:.1f} min; {run_dir}; {len(every_sample)} samples every "
        f"{args.sample_s:g} s" + (f", {len(errors)} lost (first: {errors[0]})" if errors else "")
    )

    # ---- over time: a metrics row's RSS, and the samples taken after it (before the next row)
    keys = sorted(k for k in last if k.startswith("mem/") and k.endswith("/rss_mib"))
    sampled = [
        ("raylet", "raylet_rss", MIB),
        ("gcs_server", "gcs_rss", MIB),
        ("store KiB", "store_bytes", 1024),
        ("objects", "store_objects", 1),
        ("drv refs", "driver_refs", 1),
        ("drv heap", "heap_used", MIB),
        ("drv free", "heap_free", MIB),
        ("folder", "run_dir_bytes", MIB),
    ]
    print(
        f"\nover time, every {every} steps: RSS (MiB) of the metrics row; from the samples taken before the next "
        "row (peaks): Ray's processes' RSS (MiB), the store's use (KiB) and objects, the driver's object refs and "
        "malloc heap (MiB in use, MiB free), the run folder (MiB); the last row's: after training (export, "
        "evaluation)"
    )
    names = [split_key(k)[0] for k in keys] + [name for name, _, _ in sampled]
    print(f"{'step':>6}" + "".join(f"{n:>11}" for n in names))
    for r in rows:
        step = r["step"] + 1
        if step % every and r is not last:
            continue
        near = [s for s in samples if s.step == step]
        line = "".join(f"{r[k]:>11.1f}" for k in keys)
        for _, field, unit in sampled if near else ():
            value = max(getattr(s, field) for s in near) / unit
            line += f"{value:>11.1f}" if unit > 1 else f"{value:>11.0f}"
        print(f"{step:>6}{line}")

    # ---- RSS growth per process
    peaks = final_peaks(rows)
    table = [
        (split_key(k)[0], warm[k], last[k], peaks.get(k.replace("/rss_mib", "/peak_rss_mib"), last[k]))
        for k in keys
    ]
    at_warm = min(samples, key=lambda s: (abs(s.step - args.warmup), s.seconds))
    at_end = max((s for s in samples if s.step < end), key=lambda s: s.seconds)  # the last one while training
    ray_table = [
        (name, getattr(at_warm, f) / MIB, getattr(at_end, f) / MIB, max(getattr(s, f) for s in samples) / MIB)
        for name, f in RAY_PROCESSES
    ]
    print("\nRSS per process (MiB) after warm-up and at the end; peak: the whole run's")
    print(f"{'process':<16}{'step ' + str(args.warmup):>12}{'step ' + str(end):>12}{'growth':>9}{'peak':>10}")
    for part, note in ((table, ""), (ray_table, "  (Ray's own process: reported, not in the target)")):
        for name, a, b, top in part:
            print(f"{name:<16}{a:>12.1f}{b:>12.1f}{growth(a, b):>8.1f}%{top:>10.1f}{note}")

    # ---- the object store and the other sampled figures
    def window(hi: int, field: str) -> int:
        """Peak of a sampled figure over the checkpoint interval ending at step `hi` (a sample belongs to the
        steps after the last row written before it)."""
        return max((getattr(s, field) for s in samples if hi - every <= s.step < hi), default=0)

    print(f"\nsampled figures, peak over the {every} steps up to")
    print(f"{'':<24}{'step ' + str(args.warmup):>14}{'step ' + str(end):>14}")
    for label, field in (
        ("object store bytes", "store_bytes"),
        ("object store objects", "store_objects"),
        ("driver object refs", "driver_refs"),
        ("driver heap in use", "heap_used"),
        ("driver heap free", "heap_free"),
        ("run folder bytes", "run_dir_bytes"),
    ):
        print(f"{label:<24}{window(args.warmup, field):>14,}{window(end, field):>14,}")
    peak_growth = window(end, "store_bytes") - window(args.warmup, "store_bytes")
    span = max(every, (end - args.warmup) // 4)
    floors = [
        min((s.store_bytes for s in samples if lo <= s.step < lo + span), default=0)
        for lo in (args.warmup, end - span)
    ]
    store_growth = floors[1] - floors[0]
    bound = held * batch_bytes
    after = [s.store_bytes for s in samples if args.warmup <= s.step < end]
    print(
        f"object store after warm-up: mean {sum(after) / len(after) / MIB:.2f} MiB, max {max(after) / MIB:.2f} "
        f"MiB; its floor over steps {args.warmup}-{args.warmup + span} and {end - span}-{end}: {floors[0]:,} and "
        f"{floors[1]:,} bytes, growth {store_growth / MIB:+.2f} MiB (of its peak: {peak_growth / MIB:+.2f} MiB, "
        f"not judged); bound {bound / MIB:.2f} MiB: the {held} batches the pipeline may hold at once "
        f"(pipeline_batches) of {batch_bytes / MIB:.3f} MiB (the mean put)"
    )

    name, a, b, _ = max(table, key=lambda t: growth(t[1], t[2]))
    met = growth(a, b) < TARGET_PCT and store_growth < bound
    print(
        f"soak: max RSS growth {growth(a, b):.1f}% ({name}) after warm-up, object store floor "
        f"{store_growth / MIB:+.2f} MiB (target < {TARGET_PCT:g}%, store < {bound / MIB:.2f} MiB): "
        f"{'met' if met else 'missed'}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200, help="steps before growth is measured")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--capacity", type=int, default=2, help="buffer capacity in batches")
    p.add_argument("--sample-s", type=float, default=2.0, help="sampling period of the object store etc.")
    p.add_argument("--run-dir", default=None, help="default: a new /tmp/soak_run_* folder")
    p.add_argument("--report", metavar="RUN_DIR", help="only print the figures of a finished soak's folder")
    args = p.parse_args()
    if args.report:
        report(Path(args.report))
        return
    if args.warmup % args.log_every or not 0 < args.warmup < args.steps:
        p.error(f"--warmup {args.warmup} must be a logged step (--log-every {args.log_every}) before --steps")
    report(soak(args))


if __name__ == "__main__":
    main()
