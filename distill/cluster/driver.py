"""The online distillation driver: teacher stream -> buffer -> student steps -> ack -> checkpoint.

One short loop that never looks at the loss. A producer thread pulls the teacher group's `score_stream` and
puts each TeacherBatch ref into the buffer (waiting while the buffer is full), so the teacher runs ahead of the
students by up to the buffer's capacity and the two overlap. The main thread runs the steps: every rank leases
its batches (`Assignment`), fetches them from the object store and steps, and meanwhile leases and fetches its
batches of the next step, which the driver names with each step (`distill.cluster.prefetch`); the driver sums
the ranks' term sums, divides by the step's token count (it batched the data, so it knows the loss masks) and
acks the step's batches once the step is committed on every rank (never the prefetched ones). The next step is
sent before the current one commits (`Driver._runs_ahead`), so the ranks start it without waiting for the
driver's round trip.

Failures: a dead teacher actor is the teacher group's business (it re-dispatches in order). A dead student
actor fails the step; the driver restarts the whole student group, loads the latest checkpoint, requeues the
dead consumers' leases (prefetched ones included), rolls back the consumption counts of the undone steps and
restarts the teacher stream at the checkpoint's data cursor (batches already acked are recomputed; batches still
held are reused).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray
from tqdm.auto import tqdm

from distill.batch import BatchId
from distill.cluster.buffer import PUT_FULL, Buffer
from distill.cluster.student_group import StudentFailure, StudentGroup
from distill.errors import CheckpointError
from distill.io import atomic_write_json, atomic_write_text
from distill.tracking.memory import MemoryPeaks, measure, role_metrics
from distill.training.modes import StepHooks
from distill.training.reference import StepMetrics

log = logging.getLogger(__name__)


# ---- which batches each step, rank and micro-step consume (pure) -------------------------------------------
@dataclass(frozen=True)
class Assignment:
    """Deterministic assignment of stream batches to (optimizer step, rank, micro-step).

    Stream position g counts batches in global order across epochs (g = epoch * batches_per_epoch + index, as
    `BatchStream.forever` yields them). Step s consumes the accum * world consecutive positions starting at
    s * accum * world; rank r takes g = s * accum * world + r * accum + j for micro-step j < accum. So W ranks x
    accum a see exactly the sequences of the reference trainer with accumulation a * W, and any (W, a) with the
    same a * W (the same global batch) train on the same data.
    """

    accum: int
    world: int
    batches_per_epoch: int

    @property
    def per_step(self) -> int:
        return self.accum * self.world

    def position(self, step: int, rank: int, micro: int) -> int:
        assert 0 <= rank < self.world and 0 <= micro < self.accum
        return step * self.per_step + rank * self.accum + micro

    def batch_id(self, position: int) -> BatchId:
        return divmod(position, self.batches_per_epoch)

    def position_of(self, batch_id: BatchId) -> int:
        epoch, index = batch_id
        return epoch * self.batches_per_epoch + index

    def rank_batches(self, step: int, rank: int) -> list[BatchId]:
        """Rank `rank`'s micro-batches of step `step`, in micro-step order."""
        return [self.batch_id(self.position(step, rank, j)) for j in range(self.accum)]

    def step_batches(self, step: int) -> list[BatchId]:
        """All batches of step `step` in stream order (= ranks in order, each rank's micro-steps in order)."""
        return [self.batch_id(step * self.per_step + i) for i in range(self.per_step)]


# ---- checkpoints ---------------------------------------------------------------------------------------------
class CheckpointStore:
    """`root/step-N/`: the DeepSpeed checkpoint of all ranks, their RNG states and `state.json` (step N = steps
    done, data cursor = next stream batch, the run's identity and resolved topology). `root/latest` names the
    newest complete one and is written last, so a crash during a save never points at half a checkpoint.
    """

    def __init__(
        self, root: str | Path, *, keep: int, identity: dict[str, Any], topology: dict[str, Any]
    ) -> None:
        self.root, self.keep = Path(root), keep
        self.identity, self.topology = identity, topology

    def path(self, step: int) -> Path:
        return self.root / f"step-{step}"

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / "state.json").is_file():
            raise CheckpointError(
                f"{pointer} names {path.name}, which has no state.json; the folder is damaged"
            )
        return path

    @staticmethod
    def state(path: Path) -> dict[str, Any]:
        return json.loads((path / "state.json").read_text())

    def resume_point(self) -> Path | None:
        """The latest checkpoint, after checking it belongs to this run (CheckpointError naming the field)."""
        path = self.latest()
        if path is not None:
            check_identity(self.state(path)["identity"], self.identity, where=path)
        return path

    def commit(self, step: int, cursor: BatchId) -> Path:
        path = self.path(step)
        state = {
            "step": step,
            "next_batch": list(cursor),
            "identity": self.identity,
            "topology": self.topology,
        }
        atomic_write_json(path / "state.json", state)
        atomic_write_text(self.root / "latest", path.name + "\n")
        self._prune(step)
        return path

    def _prune(self, newest: int) -> None:
        """Keep the `keep` newest checkpoints up to `newest` (never the one `latest` names)."""
        steps = sorted(
            int(m.group(1)) for p in self.root.iterdir() if (m := re.fullmatch(r"step-(\d+)", p.name))
        )
        older = [s for s in steps if s <= newest]
        for s in older[: max(len(older) - max(self.keep, 1), 0)]:
            shutil.rmtree(self.path(s), ignore_errors=True)


def check_identity(saved: dict[str, Any], current: dict[str, Any], *, where: Path | str) -> None:
    """CheckpointError naming every field whose value differs between a checkpoint and this run."""
    keys = sorted(set(saved) | set(current))
    diff = [k for k in keys if saved.get(k) != current.get(k)]
    if diff:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}" for k in diff)
        raise CheckpointError(
            f"cannot resume from {where}: it was written by a different run ({detail}). Resume with the "
            "checkpoint's settings, or start a new run (resume=false or another run_dir)."
        )


# ---- the teacher side --------------------------------------------------------------------------------------
class Producer:
    """A thread that keeps the buffer filled from the teacher stream, in stream order.

    inputs: (batch_id, numpy arrays) to score, in order. force: batch ids put even into a full buffer (a
    replay's recomputed batches, see Driver._recover). Errors are kept and re-raised by `check` on the main
    thread.
    """

    def __init__(self, teachers, buffer: Buffer, inputs: Iterator, force: set[BatchId]) -> None:
        self.teachers, self.buffer, self.inputs, self.force = teachers, buffer, inputs, force
        self.error: BaseException | None = None
        self.produced = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="teacher-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for meta, ref in self.teachers.score_stream(self.inputs):
                force = tuple(meta.batch_id) in self.force
                while self.buffer.put(meta.batch_id, ref, meta.nbytes, timeout=0.5, force=force) == PUT_FULL:
                    if self._stop.is_set():
                        return
                self.produced += 1
                if self._stop.is_set():
                    return
        except BaseException as err:  # re-raised on the main thread by check()
            self.error = err

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the teacher producer failed: {self.error!r}") from self.error

    def stop(self, timeout: float = 300.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("teacher producer still busy after %.0f s; leaving it behind", timeout)


class StepSink(Protocol):
    def write(self, metrics: StepMetrics, extras: dict[str, float]) -> None:
        """Record a logged step."""

    def rewind(self, step: int) -> None:
        """Forget records of steps >= `step` (they are about to be trained again)."""


class Hooks:
    """Failure injection and stop points for tests and chaos drills; the default does nothing."""

    def after_step(self, driver: Driver, step: int) -> None:
        """Called once step `step` is committed (and checkpointed, if one was due). Step + 1 may already be
        training (see `Driver._runs_ahead`); a hook that stops the run checkpoints with `driver.stop_after()`."""


# ---- the loop ----------------------------------------------------------------------------------------------
@dataclass
class _Dispatched:
    """A step sent to the ranks and not yet committed."""

    step: int
    batch_ids: list[BatchId]
    rank_batches: list[list[BatchId]]
    num_tokens: int
    plan: Any
    sampled: list  # refs to the buffer's figures (logged steps), else []
    calls: list  # refs to the ranks' answers (StudentGroup.wait)
    sent: float = field(default_factory=time.perf_counter)


class Driver:
    """Runs optimizer steps [start, total_steps) over the groups it is given; owns no configuration.

    teachers: a `TeacherGroup` (its `score_stream` feeds the buffer; `memory_peaks` is read on logged steps).
    inputs(position): (batch_id, arrays) from stream position `position` on (a fresh iterator each call).
    tokens(batch_id): trained tokens (loss_mask.sum()) of a batch.
    plans(step): the curriculum's StepPlan of a step, handed to every rank (None: the objective as configured).
    mode: the run mode's step hooks (`distill.training.modes.StepHooks`). The driver puts a step's stored
        batches into the buffer itself (they carry stored teacher outputs; the teacher never sees them) and, once
        a step is committed, hands the mode the batches it keeps (`Buffer.peek`, before the ack).
    """

    def __init__(
        self,
        *,
        teachers,
        students: StudentGroup,
        buffer: Buffer,
        assignment: Assignment,
        inputs: Callable[[int], Iterator[tuple[BatchId, dict[str, np.ndarray]]]],
        tokens: Callable[[BatchId], int],
        total_steps: int,
        sink: StepSink,
        log_every: int = 1,
        checkpoints: CheckpointStore | None = None,
        checkpoint_every: int = 0,
        hooks: Hooks | None = None,
        max_student_restarts: int = 3,
        progress: bool = False,
        plans: Callable[[int], Any] | None = None,
        mode: StepHooks | None = None,
    ) -> None:
        self.teachers, self.students, self.buffer = teachers, students, buffer
        self.assignment, self.inputs, self.tokens = assignment, inputs, tokens
        self.total_steps, self.sink, self.log_every = total_steps, sink, log_every
        self.checkpoints, self.checkpoint_every = checkpoints, checkpoint_every
        self.hooks = hooks or Hooks()
        self.max_student_restarts = max_student_restarts
        self.progress = progress
        self.plans = plans
        self.mode = mode or StepHooks()
        self.last_loss = float("nan")
        self.committed = 0  # steps whose batches are acked
        self.producer: Producer | None = None
        self.first_step = 0
        self._acks: list[ray.ObjectRef] = []  # the last step's ack, in flight (see _settle_acks)
        self._ahead: _Dispatched | None = None  # the step sent behind the one being committed (_runs_ahead)
        self._last_commit = 0.0
        self._stopping = False

    def run(self, start: Path | None = None) -> None:
        """Train to total_steps, from checkpoint `start` (a `CheckpointStore` folder) or from scratch."""
        self.students.wait_ready()
        step = self._load(start) if start is not None else 0
        self.first_step = step
        self.committed = step
        self.sink.rewind(step)
        self._start_producer(step)
        bar = tqdm(
            total=self.total_steps,
            initial=step,
            desc="distill",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            while self.committed < self.total_steps:
                step = self.committed
                try:
                    self._train_step(step)
                    if self.checkpoint_every and self.committed % self.checkpoint_every == 0:
                        self._checkpoint(self.committed)
                except StudentFailure as err:
                    bar.n = self._recover(err)  # steps after the restored checkpoint are trained again
                    bar.refresh()
                    continue
                bar.update(1)
                bar.set_postfix(loss=f"{self.last_loss:.4f}", refresh=False)
                self.hooks.after_step(self, step)
        finally:
            bar.close()
            self._ahead = None
            self._stop_producer()

    def _train_step(self, step: int) -> None:
        """Commit `step`: dispatch it (unless it already runs), dispatch the next one behind it when nothing has
        to happen in between (`_runs_ahead`), wait for `step` on every rank and account for it."""
        current, self._ahead = self._ahead, None
        if current is None or current.step != step:
            current = self._dispatch(step)
        if self._runs_ahead(step):
            self._ahead = self._dispatch(step + 1)
        self._commit(current)

    def _runs_ahead(self, step: int) -> bool:
        """Whether step + 1 may be sent to the ranks before `step` is committed.

        The ranks run their calls in order, so a queued step starts the moment the previous one ends and the
        students never wait for the driver's round trip (answer, ack, metrics, next call). Not when something
        must see the world between the two steps: a checkpoint, a mode that does not overlap steps (a continual
        run's replay and increment evaluations), or a stop asked for by a hook (`stop_after`)."""
        return (
            step + 1 < self.total_steps
            and not (self.checkpoint_every and (step + 1) % self.checkpoint_every == 0)
            and self.mode.overlaps(step)
            and not self._stopping
        )

    def _dispatch(self, step: int) -> _Dispatched:
        a = self.assignment
        batch_ids = a.step_batches(step)
        rank_batches = [a.rank_batches(step, r) for r in range(a.world)]
        # Leased ahead by each rank while this step trains; a failure requeues them with the rank's leases.
        ahead = [a.rank_batches(step + 1, r) for r in range(a.world)] if step + 1 < self.total_steps else None
        plan = self.plans(step) if self.plans is not None else None
        if plan is not None and (record := plan.transition()) is not None:
            log.info("curriculum transition %s", json.dumps(record, sort_keys=True))
        for batch_id, stored in self.mode.stored_batches(step):
            # Forced: the step's own batches always fit (check_capacity); "exists" after a restore is fine.
            self.buffer.put(batch_id, ray.put(stored), stored.nbytes(), timeout=None, force=True)
        num_tokens = sum(self.tokens(b) for b in batch_ids)
        logged = (step + 1) % self.log_every == 0 or step + 1 == self.total_steps
        # The buffer's figures are sampled as the step is sent (depth counts its batches and the prefetched
        # ones), while the ranks train: they never wait for that RPC.
        sampled = self.buffer.stats_async() if logged else []
        calls = self.students.submit_train_step(step, rank_batches, num_tokens, plan=plan, next_batches=ahead)
        return _Dispatched(step, batch_ids, rank_batches, num_tokens, plan, sampled, calls)

    def _commit(self, d: _Dispatched) -> None:
        """Wait for a dispatched step on every rank, ack its batches and record its metrics."""
        outs = self.students.wait(d.calls, poll=self._check_producer)
        assert [o["batch_ids"] for o in outs] == d.rank_batches, (
            "a rank trained on batches not assigned to it"
        )
        step = d.step
        kept_ids = self.mode.kept_batches(step)
        kept = ray.get(self.buffer.peek(kept_ids)) if kept_ids else []
        # Committed on every rank: the batches are done. Not waited for (an RPC to a shard process costs
        # milliseconds on busy cores); settled before anything reads the counts, and by the next step's ack,
        # which surfaces an error one step late at worst.
        self._settle_acks()
        self._acks = self.buffer.ack(d.batch_ids, wait=False)
        self.committed = step + 1
        # A step's time runs from when it could start (sent, or the previous step committed) to its commit.
        now = time.perf_counter()
        seconds, self._last_commit = now - max(d.sent, self._last_commit), now
        denom = max(d.num_tokens, 1)
        terms = {label: sum(o["terms"][label] for o in outs) / denom for label in outs[0]["terms"]}
        self.last_loss = sum(o["loss_sum"] for o in outs) / denom
        metrics = StepMetrics(
            step=step,
            loss=self.last_loss,
            terms=terms,
            tokens=d.num_tokens,
            lr=outs[0]["lr"],
            grad_norm=outs[0]["grad_norm"],
            seconds=seconds,
            batch_ids=d.batch_ids,
            plan=d.plan,
            grad_shares=outs[0].get("grad_shares", {}),  # rank 0's first micro-batch, on measured steps
        )
        self.mode.after_commit(step, kept)  # continual: may evaluate the student (an increment's end)
        if d.sampled:
            shards = ray.get(d.sampled)
            stats = Buffer.total_stats(shards)
            extras = {
                "buffer/depth": stats["depth"],
                "buffer/producer_wait_s": stats["producer_wait_s"],
                "buffer/consumer_wait_s": stats["consumer_wait_s"],
                "buffer/lease_bytes_per_s": stats["lease_bytes_per_s"],
                "student/fetch_s": max(o["fetch_s"] for o in outs),
                **self._memory_metrics(outs, Buffer.shard_memory(shards)),
            }
            self.sink.write(metrics, extras)

    def _memory_metrics(self, outs: list[dict], shards: dict[str, MemoryPeaks]) -> dict[str, float]:
        """`mem/<role>/...` of every process (see `distill.tracking.memory`), from replies the driver has anyway:
        the ranks' step answers, the teacher actors' scoring replies, the shards' sampled figures."""
        return {
            **measure().metrics("driver"),
            **role_metrics("student", {str(rank): o["memory"] for rank, o in enumerate(outs)}),
            **role_metrics("teacher", self.teachers.memory_peaks()),
            **role_metrics("buffer", shards),
        }

    def stop_after(self) -> tuple[int, Path]:
        """Commit the step already sent ahead (if any), checkpoint the committed steps (unless that checkpoint
        exists) and return (committed steps, checkpoint); for a hook that stops the run (a preemption signal).
        The driver sends no step ahead from here on."""
        if self.checkpoints is None:
            raise CheckpointError("this driver has no CheckpointStore; it cannot checkpoint on request")
        self._stopping = True
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self._commit(ahead)
        path = self.checkpoints.path(self.committed)
        if self.checkpoints.latest() != path:
            self._checkpoint(self.committed)
        return self.committed, path

    def _checkpoint(self, step: int) -> None:
        if self.checkpoints is None:
            return
        cursor = self.assignment.batch_id(step * self.assignment.per_step)
        path = self.checkpoints.path(step)
        self.students.save(path, {"step": step, "next_batch": list(cursor)})
        self.mode.save(path)
        self.checkpoints.commit(step, cursor)

    def _load(self, path: Path) -> int:
        state = CheckpointStore.state(path)
        client = self.students.load(path)
        if client["step"] != state["step"] or list(client["next_batch"]) != state["next_batch"]:
            raise CheckpointError(
                f"{path}: DeepSpeed client state {client} disagrees with state.json {state}"
            )
        expected = list(self.assignment.batch_id(state["step"] * self.assignment.per_step))
        if state["next_batch"] != expected:
            raise CheckpointError(
                f"{path}: data cursor {state['next_batch']} is not step {state['step']}'s {expected}"
            )
        self.mode.load(path)
        log.info("restored %s (step %d, next batch %s)", path, state["step"], state["next_batch"])
        return state["step"]

    def _recover(self, err: StudentFailure) -> int:
        """Restart the student world from the latest checkpoint; returns the step to continue from."""
        self._ahead = None  # sent to the failed world: it will not answer
        self._stop_producer()
        self._settle_acks()  # the rollback below must see every ack of the committed steps
        while True:  # a rank may die again while the new world starts or loads
            if self.students.restarts >= self.max_student_restarts:
                raise RuntimeError(
                    f"student group failed {self.students.restarts + 1} times; giving up"
                ) from err
            log.warning("student failure (%s); restarting the student group", err)
            try:
                # Declared dead first: their leases come back and any lease they still attempt fails.
                self.buffer.requeue(self.students.consumers)
                self.students.restart()
                latest = self.checkpoints.latest() if self.checkpoints else None
                # Without a checkpoint the new actors start from the same initial weights: step 0.
                step = self._load(latest) if latest is not None else 0
                if latest is None:
                    self.mode.load(None)
                break
            except StudentFailure as again:
                err = again
        undone = [b for s in range(step, self.committed) for b in self.assignment.step_batches(s)]
        self.buffer.rollback(undone)
        self.committed = step
        self.sink.rewind(step)
        self._start_producer(step)
        return step

    def _settle_acks(self) -> None:
        """Wait for the acks in flight (normally long done); raises the shard's error if one failed."""
        acks, self._acks = self._acks, []
        ray.get(acks)

    # ---- the producer ------------------------------------------------------------------------------------------
    def _start_producer(self, step: int) -> None:
        """Stream from step's first batch to the run's last; batches the buffer still holds are not recomputed,
        the recomputed ones before them may overfill it (bounded by the checkpoint interval)."""
        a = self.assignment
        first, end = step * a.per_step, self.total_steps * a.per_step
        held = {b for b in self.buffer.held() if a.position_of(b) >= first}
        replay_end = max((a.position_of(b) for b in held), default=first - 1) + 1
        force = {a.batch_id(g) for g in range(first, replay_end)} - held

        def inputs() -> Iterator[tuple[BatchId, dict[str, np.ndarray]]]:
            for batch_id, arrays in self.inputs(first):
                position = a.position_of(batch_id)
                if position >= end:
                    return
                if batch_id not in held:
                    yield batch_id, arrays

        self.producer = Producer(self.teachers, self.buffer, inputs(), force)

    def _check_producer(self) -> None:
        if self.producer is not None:
            self.producer.check()

    def _stop_producer(self) -> None:
        if self.producer is not None:
            self.producer.stop()
            self.producer = None

    # ---- after the run -----------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Consumption counts of the committed steps, restarts and buffer figures (for online_stats.json)."""
        self._settle_acks()
        counts = self.buffer.consumption()
        replicas = getattr(self.teachers, "replicas", [])
        return {
            "committed_steps": self.committed,
            "consumption": {f"{e}:{i}": n for (e, i), n in counts.items()},
            "student_restarts": self.students.restarts,
            "teacher_restarts": sum(r.restarts for r in replicas),
            "buffer": self.buffer.stats(),
        }
