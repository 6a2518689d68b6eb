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

Failures: a dead teacher actor is the teacher group's business (it re-dispatches in order; a replica whose node
is gone is re-placed on another). Anything else that dies fails the step: a student actor, a buffer shard, a
payload lost with its node's object store, or a whole node (its students, teachers and shards at once). The
driver then restores the pipeline as Ray Train / TorchElastic restore a worker group (`Driver._recover`):
replaces dead buffer shards with empty ones, restarts the whole student group (re-placed on the live nodes, or a
node added back, if one of its nodes is gone), loads the latest checkpoint, requeues the dead consumers' leases
(prefetched ones included), resets the consumption counts to the checkpoint's and restarts the teacher stream at
the checkpoint's data cursor: batches already acked and those a dead shard held are produced again, once;
batches still held by live shards are reused (after a node's loss, none: their payloads may be gone with it).

Consumption counts: the driver counts every batch of every committed step (`Driver.consumption`) and saves the
counts with each checkpoint, so they stay exact across restores, dead shards and a restarted driver (resume).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
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
from ray.exceptions import ObjectLostError, RayActorError
from tqdm.auto import tqdm

from distill.batch import BatchId
from distill.cluster.buffer import PUT_FULL, Buffer
from distill.cluster.placement import alive_node_ids
from distill.cluster.student_group import StudentFailure, StudentGroup, actor_or_object_lost
from distill.errors import CheckpointError
from distill.io import (
    atomic_write_json,
    atomic_write_text,
    describe_files,
    file_problems,
    fsync_path,
    fsync_tree,
)
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
_STATE, _MANIFEST, _POINTER = "state.json", "manifest.json", "latest"
_MANIFEST_FORMAT = "distill-checkpoint"
_MANIFEST_VERSION = 1
_STEP_NAME = re.compile(r"step-(\d+)")
# What an interrupted write leaves in the root: a step's temporary folder, a replaced step's old folder, the
# pointer's temp file (`atomic_write_bytes`). Never named by `latest`; removed before the next write.
_PARTIAL_NAME = re.compile(r"step-\d+\.(?:tmp|old)-\d+|\.latest\..+")


class CheckpointStore:
    """`root/step-N/`: the DeepSpeed checkpoint of all ranks, their RNG states, the mode's state, `state.json`
    (step N = steps done, data cursor = next stream batch, the run's identity and resolved topology) and
    `manifest.json` (every file's size and sha256). `root/latest` names the checkpoint to resume from.

    A write cannot corrupt what is there (`write`): the files go into `step-N.tmp-<pid>/`, are fsynced, the
    manifest is written last, the folder is renamed to `step-N` and only then is `latest` switched (temp file +
    rename, fsynced). A failure or a kill before that leaves `latest` on the previous checkpoint; the partial
    folder is removed (or, after a kill, ignored and removed by the next write). Pruning runs after the switch.

    A resume (`resume_point`, and the restore after a dead rank) checks the manifest of the checkpoint `latest`
    names and refuses a damaged one (CheckpointError naming each bad file), as DeepSpeed, torch.distributed.checkpoint
    and Ray Train refuse a checkpoint they cannot load: a silent fallback to an older one would retrain steps and
    hide a storage fault (and torch loads a tensor with flipped bits without a word: only the checksums see it).
    fallback_to_previous: resume from the newest older complete checkpoint instead, with a warning (unattended
    requeues); either way the error or the warning names that checkpoint.
    keep: complete checkpoints kept up to the newest (at least 1; never the one `latest` names).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        keep: int,
        identity: dict[str, Any],
        topology: dict[str, Any],
        fallback_to_previous: bool = False,
    ) -> None:
        self.root, self.keep = Path(root), keep
        self.identity, self.topology = identity, topology
        self.fallback_to_previous = fallback_to_previous

    def path(self, step: int) -> Path:
        return self.root / f"step-{step}"

    @property
    def pointer(self) -> Path:
        return self.root / _POINTER

    def latest(self) -> Path | None:
        """The folder `latest` names (not checked: see `resume_point`), or None before the first checkpoint."""
        if not self.pointer.is_file():
            return None
        name = self.pointer.read_text().strip()
        if not _STEP_NAME.fullmatch(name):
            found = sorted(p.name for p in self.root.iterdir() if _STEP_NAME.fullmatch(p.name))
            raise CheckpointError(
                f"{self.pointer} holds {name!r}, not a checkpoint name like 'step-10'; write the name of the "
                f"checkpoint to resume from into it (folders here: {found})"
            )
        return self.root / name

    @staticmethod
    def state(path: Path) -> dict[str, Any]:
        return json.loads((path / _STATE).read_text())

    # ---- resume ------------------------------------------------------------------------------------------------
    def resume_point(self) -> Path | None:
        """The checkpoint `latest` names, after checking that it belongs to this run (CheckpointError naming the
        field) and that every file matches its manifest (CheckpointError naming the file, unless
        fallback_to_previous finds an older complete one). None before the first checkpoint."""
        path = self.latest()
        if path is None:
            return None
        damage = self.damage(path, only=[_STATE])  # the identity is read from it: check its bytes first
        if not damage:
            check_identity(self.state(path)["identity"], self.identity, where=path)
            damage = self.damage(path)
        return path if not damage else self._fall_back(path, damage)

    def damage(self, path: Path, *, only: list[str] | None = None, checksums: bool = True) -> list[str]:
        """What is wrong with checkpoint `path`, one line per file ([]: complete). only: these files of the
        manifest; checksums=False: presence and sizes only (a stat per file)."""
        if not path.is_dir():
            return [f"{path} does not exist"]
        manifest, problem = self._read_manifest(path)
        if manifest is None:
            return [problem]
        files = manifest["files"]
        if only is not None:
            if missing := [name for name in only if name not in files]:
                return [f"{path / _MANIFEST} does not list {missing}"]
            files = {name: files[name] for name in only}
        return file_problems(path, files, checksums=checksums)

    @staticmethod
    def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, str]:
        file = path / _MANIFEST
        if not file.is_file():
            return None, (
                f"{file} is missing: it is written last, so the write of this checkpoint never finished "
                "(or the checkpoint predates manifests)"
            )
        try:
            manifest = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return None, f"{file} cannot be read ({err})"
        if (
            not isinstance(manifest, dict)
            or manifest.get("format") != _MANIFEST_FORMAT
            or manifest.get("version") != _MANIFEST_VERSION
            or not isinstance(manifest.get("files"), dict)
        ):
            return None, f"{file} is not a version-{_MANIFEST_VERSION} {_MANIFEST_FORMAT} manifest"
        return manifest, ""

    def _fall_back(self, damaged: Path, damage: list[str]) -> Path:
        """The newest complete checkpoint before `damaged` if fallback_to_previous; else CheckpointError."""
        previous = self._previous_complete(damaged)
        if previous is None or not self.fallback_to_previous:
            raise CheckpointError(self._damage_message(damaged, damage, previous))
        log.warning(
            "checkpoint %s is damaged (%s); resuming from %s instead (checkpoint.fallback_to_previous=true): "
            "the steps after it are trained again",
            damaged,
            "; ".join(damage),
            previous.name,
        )
        atomic_write_text(self.pointer, previous.name + "\n", durable=True)
        return previous

    def _previous_complete(self, damaged: Path) -> Path | None:
        """The newest checkpoint before `damaged` whose files all match its manifest and that is this run's."""
        for step in reversed([s for s in self._steps() if s < _step_of(damaged)]):
            path = self.path(step)
            if not self.damage(path) and self.state(path).get("identity") == self.identity:
                return path
        return None

    def _damage_message(self, damaged: Path, damage: list[str], previous: Path | None) -> str:
        head = f"cannot resume from {damaged} (named by {self.pointer}): " + "; ".join(damage) + "."
        if previous is None:
            return head + (
                " No older complete checkpoint exists: start a new run (resume=false or another run_dir)."
            )
        return head + (
            f" The newest older complete checkpoint is {previous.name}: resume from it with "
            f"checkpoint.fallback_to_previous=true, or by writing '{previous.name}' into {self.pointer} (the "
            f"steps after {_step_of(previous)} are trained again)."
        )

    # ---- write -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def write(self, step: int, cursor: BatchId) -> Iterator[Path]:
        """Yield an empty temporary folder for checkpoint `step`'s files (every rank's, the mode's); when the
        block ends, commit it (see the class docstring). If the block or the commit raises, the folder is
        removed and `latest` still names the previous checkpoint."""
        self.remove_partial()
        tmp = self.root / f"step-{step}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
            self._commit(step, cursor, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _commit(self, step: int, cursor: BatchId, tmp: Path) -> None:
        state = {
            "step": step,
            "next_batch": list(cursor),
            "identity": self.identity,
            "topology": self.topology,
        }
        atomic_write_json(tmp / _STATE, state)
        # Durable before the manifest vouches for them: every file, whoever wrote it (the ranks may sit on other
        # nodes of a shared file system; reading the files back for the hashes makes their writes visible here).
        fsync_tree(tmp)
        manifest = {
            "format": _MANIFEST_FORMAT,
            "version": _MANIFEST_VERSION,
            "step": step,
            "files": describe_files(tmp),
        }
        atomic_write_json(tmp / _MANIFEST, manifest, durable=True)  # last: a folder with it is complete
        path = self._move_into_place(tmp, self.path(step))
        if damage := self.damage(path, checksums=False):  # the hashes were just taken from these files
            raise CheckpointError(f"{path} was damaged while it was committed: {'; '.join(damage)}")
        atomic_write_text(self.pointer, path.name + "\n", durable=True)
        self._prune(step)

    def _move_into_place(self, tmp: Path, path: Path) -> Path:
        """Rename `tmp` to `path`. An existing `path` (a step trained again after a restore, or a damaged one
        replaced after a fallback) is moved aside first and removed after: a folder rename cannot replace a
        non-empty folder."""
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_path(self.root)
        shutil.rmtree(old, ignore_errors=True)
        return path

    def remove_partial(self) -> list[Path]:
        """Remove what interrupted writes left in the root (their folders are never named by `latest`)."""
        if not self.root.is_dir():
            return []
        partial = [p for p in self.root.iterdir() if _PARTIAL_NAME.fullmatch(p.name)]
        for p in partial:
            log.warning("removing %s, left by an interrupted checkpoint write", p)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return partial

    def _steps(self) -> list[int]:
        return sorted(_step_of(p) for p in self.root.iterdir() if _STEP_NAME.fullmatch(p.name))

    def _prune(self, newest: int) -> None:
        """Delete the checkpoints up to `newest` beyond the `keep` newest complete ones (incomplete ones count
        for nothing), never the one `latest` names. Runs after `newest` is committed, so it is always kept."""
        older = [s for s in self._steps() if s <= newest]
        complete = [s for s in older if not self.damage(self.path(s), checksums=False)]
        kept = set(complete[-max(self.keep, 1) :])
        named = self.latest()
        for s in older:
            if s not in kept and self.path(s) != named:
                shutil.rmtree(self.path(s), ignore_errors=True)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


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
class PipelineFailure(RuntimeError):
    """A process or an object of the pipeline is gone (a buffer shard, a payload with its node): the driver
    restores from the last checkpoint, as after a student's death."""


# What the training loop answers with a restore (`Driver._recover`); anything else ends the run.
RECOVERABLE = (StudentFailure, PipelineFailure, RayActorError, ObjectLostError)
_CONSUMPTION = "consumption.json"


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
            if actor_or_object_lost(
                self.error
            ):  # a dead buffer shard; a dead teacher is its group's business
                raise PipelineFailure(f"the teacher producer lost a peer: {self.error!r}") from self.error
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
    max_restores: failures answered with a restore from the last checkpoint (`_recover`) before the run gives
        up (Ray Train's FailureConfig.max_failures, TorchElastic's max_restarts).
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
        max_restores: int = 6,
        progress: bool = False,
        plans: Callable[[int], Any] | None = None,
        mode: StepHooks | None = None,
        onpolicy=None,
    ) -> None:
        self.teachers, self.students, self.buffer = teachers, students, buffer
        self.assignment, self.inputs, self.tokens = assignment, inputs, tokens
        self.total_steps, self.sink, self.log_every = total_steps, sink, log_every
        self.checkpoints, self.checkpoint_every = checkpoints, checkpoint_every
        self.hooks = hooks or Hooks()
        self.max_restores = max_restores
        self.restores: list[dict[str, Any]] = []  # one per restore from a checkpoint after a failure
        self.failures = 0  # failures answered with a restore (one restore may meet several)
        self.consumption: dict[
            BatchId, int
        ] = {}  # committed consumption per batch (see the module docstring)
        self._nodes: set[str] = set()  # the live nodes as of the start or the last restore
        self.progress = progress
        self.plans = plans
        self.mode = mode or StepHooks()
        self.onpolicy = onpolicy  # on-policy stages: distill.cluster.rollout_group.OnPolicyFeed
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
        self._nodes = alive_node_ids()
        step = self._load(start) if start is not None else 0
        self.first_step = step
        self.committed = step
        self.sink.rewind(step)
        self._start_producer(step)
        self._reset_onpolicy(step)
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
                except RECOVERABLE as err:
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
            if self.onpolicy is not None:
                self.onpolicy.shutdown()

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
            and (self.onpolicy is None or self.onpolicy.ready_to_run_ahead(step))
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
        publish = False
        if self.onpolicy is not None:  # the student's own batches of this step are in the buffer first
            self.onpolicy.wait(step)
            publish = self.onpolicy.needs_publish(step)
        num_tokens = sum(self._batch_tokens(b) for b in batch_ids)
        logged = (step + 1) % self.log_every == 0 or step + 1 == self.total_steps
        # The buffer's figures are sampled as the step is sent (depth counts its batches and the prefetched
        # ones), while the ranks train: they never wait for that RPC.
        sampled = self.buffer.stats_async() if logged else []
        calls = self.students.submit_train_step(
            step, rank_batches, num_tokens, plan=plan, next_batches=ahead, publish=publish
        )
        return _Dispatched(step, batch_ids, rank_batches, num_tokens, plan, sampled, calls)

    def _commit(self, d: _Dispatched) -> None:
        """Wait for a dispatched step on every rank, ack its batches and record its metrics."""
        outs = self.students.wait(d.calls, poll=self._check_producer)
        assert [o["batch_ids"] for o in outs] == d.rank_batches, (
            "a rank trained on batches not assigned to it"
        )
        step = d.step
        if self.onpolicy is not None:
            self.onpolicy.committed(step)
            if "weights" in outs[0]:  # the weights after this step write a later step's rollouts
                self.onpolicy.published(step + 1, outs[0]["weights"][0])
        kept_ids = self.mode.kept_batches(step)
        kept = ray.get(self.buffer.peek(kept_ids)) if kept_ids else []
        # Committed on every rank: the batches are done. Not waited for (an RPC to a shard process costs
        # milliseconds on busy cores); settled before anything reads the counts, and by the next step's ack,
        # which surfaces an error one step late at worst.
        self._settle_acks()
        self._acks = self.buffer.ack(d.batch_ids, wait=False)
        for b in d.batch_ids:
            self.consumption[b] = self.consumption.get(b, 0) + 1
        self.committed = step + 1
        # A step's time runs from when it could start (sent, or the previous step committed) to its commit.
        now = time.perf_counter()
        seconds, self._last_commit = now - max(d.sent, self._last_commit), now
        denom = max(d.num_tokens, 1)
        # Every rank's labels: a term may be off on one rank's batches (hard labels on the student's own samples).
        labels = dict.fromkeys(label for o in outs for label in o["terms"])
        terms = {label: sum(o["terms"].get(label, 0.0) for o in outs) / denom for label in labels}
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
            if hasattr(self.teachers, "take_tokens"):  # several teachers: each one's scored tokens
                extras.update(self.teachers.take_tokens())
            if self.onpolicy is not None:
                extras.update(self.onpolicy.metrics())
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
        # Into a temporary folder that the store commits once everyone has written; a failure part-way (a dead
        # rank, a full disk) leaves `latest` on the previous checkpoint, which a restore then loads.
        with self.checkpoints.write(step, cursor) as folder:
            self.students.save(folder, {"step": step, "next_batch": list(cursor)})
            self.mode.save(folder)
            counts = {f"{e}:{i}": n for (e, i), n in sorted(self.consumption.items())}
            atomic_write_json(folder / _CONSUMPTION, counts)

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
        self.consumption = _read_consumption(path / _CONSUMPTION)
        log.info("restored %s (step %d, next batch %s)", path, state["step"], state["next_batch"])
        return state["step"]

    def _recover(self, err: BaseException) -> int:
        """Restore the pipeline from the latest checkpoint after a lost process or object (see the module
        docstring); returns the step to continue from. Gives up after max_restores failures in a run."""
        clock, failed_at = time.perf_counter(), self.committed
        self._ahead = None  # sent to the failed world: it will not answer
        self.students.stop()  # at once: frees their resources for a teacher replica re-placed meanwhile
        self._stop_producer()
        # An ack to a dead shard fails: its batches are gone with it, and the driver's counts are the record.
        with contextlib.suppress(RayActorError, ObjectLostError):
            self._settle_acks()
        record = {"failed_at_step": failed_at, "shards_replaced": [], "nodes_lost": [], "batches_dropped": 0}
        while True:  # a rank (or a node) may die again while the new world starts or loads
            self.failures += 1
            if self.failures > self.max_restores:
                raise RuntimeError(
                    f"the run failed {self.failures} times; giving up (max_restores={self.max_restores})"
                ) from err
            log.warning("lost a process or object (%s); restoring from the last checkpoint", err)
            try:
                step = self._restore_world(record)
                break
            except RECOVERABLE as again:
                err = again
        undone = [b for s in range(step, self.committed) for b in self.assignment.step_batches(s)]
        with contextlib.suppress(RayActorError):  # the shards' own figures
            self.buffer.rollback(undone)
        self.committed = step
        self._nodes = alive_node_ids()
        self.sink.rewind(step)
        self._start_producer(step)
        self._reset_onpolicy(step)
        seconds = time.perf_counter() - clock
        self.restores.append({**record, "restored_step": step, "seconds": seconds, "cause": _cause(err)})
        log.warning("restored step %d in %.1f s (failed at step %d)", step, seconds, failed_at)
        return step

    def _restore_world(self, record: dict[str, Any]) -> int:
        """One try of a restore: replace dead shards (and drop every held batch after a node's loss), start a new
        student world, load the latest checkpoint into it; returns its step. Notes what it did in `record`."""
        record["shards_replaced"] += self.buffer.replace_dead()
        if gone := self._nodes - alive_node_ids():
            record["nodes_lost"] = sorted(set(record["nodes_lost"]) | gone)
            record["batches_dropped"] += self.buffer.clear()  # their payloads may be gone with the node
        # Declared dead first: their leases come back and any lease they still attempt fails.
        self.buffer.requeue(self.students.consumers)
        self.students.restart()
        latest = self.checkpoints.resume_point() if self.checkpoints else None
        if latest is not None:
            return self._load(latest)
        # Without a checkpoint the new actors start from the same initial weights: step 0.
        self.mode.load(None)
        self.consumption = {}
        return 0

    def _batch_tokens(self, batch_id: BatchId) -> int:
        """Trained tokens of a batch: the student's own (on-policy) counted when written, else the stream's."""
        if self.onpolicy is not None and tuple(batch_id) in self.onpolicy.tokens:
            return self.onpolicy.tokens[tuple(batch_id)]
        return self.tokens(batch_id)

    def _reset_onpolicy(self, step: int) -> None:
        """On-policy stages: the feed starts over at `step` with the ranks' current weights."""
        if self.onpolicy is not None:
            self.onpolicy.reset(step, self.students.weights())

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
                if batch_id not in held and not (self.onpolicy and self.onpolicy.writes(batch_id)):
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
        replicas = getattr(self.teachers, "replicas", [])
        return {
            "committed_steps": self.committed,
            "consumption": {f"{e}:{i}": n for (e, i), n in sorted(self.consumption.items())},
            "student_restarts": self.students.restarts,
            "teacher_restarts": sum(r.restarts for r in replicas),
            "buffer_shards_replaced": self.buffer.replaced,
            "restores": self.restores,
            "teacher_restart_log": getattr(self.teachers, "restart_log", []),
            "buffer": self.buffer.stats(),
        }


def _cause(err: BaseException) -> str:
    """A one-line account of a failure for the run's stats (the first line of its message, cut)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def _read_consumption(path: Path) -> dict[BatchId, int]:
    """The consumption counts a checkpoint saved ({} for a checkpoint written before they were saved)."""
    if not path.is_file():
        log.warning("%s is missing (a checkpoint from before counts were saved): counting from here", path)
        return {}
    counts = json.loads(path.read_text())
    return {tuple(int(x) for x in key.split(":")): n for key, n in counts.items()}
