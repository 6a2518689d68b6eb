"""On-policy stages on the Ray path: the rollout actors, and the feed that turns a step's on-policy batches into
the student's own samples graded by the teacher, in the buffer before the step trains.

Rollout actors hold a copy of the student (built by the student ranks' own builder, so the architecture and any
adapters match) and load the weights the ranks publish: after a step that some later step's rollouts need, rank 0
answers with a ref of the full weights (gathered under ZeRO-3; through the object store, as on CPU; a GPU cluster
would broadcast them over the collective backend instead). They sample with `distill.training.onpolicy.rollout`,
seeded by the run's seed and the batch id, exactly as the single-process path does.

`OnPolicyFeed` (driven by the Driver): step s's on-policy batches (the lambda draw over its batch ids) are written
by the weights of step v(s) = max(first step, s - max_staleness): W_s at staleness 0, GKD's synchronous recipe
and the single-process reference. As soon as W_v(s) is published, a background thread rolls out step s's
batches on the rollout actors, has the teacher group score them and puts them into the buffer (forced: the
step's own batches always fit); the driver waits for it before dispatching step s (it needs their token counts).
At staleness k > 0 that work overlaps the k steps before s, and the feed's k threads prepare up to k steps at
once (one step's samples are graded while the next one's are written; each rollout call names its version, and an
actor that holds another loads it). The producer never scores these batch ids: it skips
them. Samples are never older than max_staleness (each step's version is fixed), so none is dropped; the
metrics say so (`onpolicy/staleness`, `onpolicy/dropped`).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from distill.batch import BatchId
from distill.cluster.worker import NO_TASK_EVENTS
from distill.data.batching import pad_batch
from distill.training.onpolicy import RolloutStats, is_on_policy, rollout, sample_seed
from distill.xtok.rollout import written_pairs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutSpec:
    student: Any
    """The StudentSpec of the run's ranks: `build` makes the same model, `env` / `threads` the same process."""
    seed: int
    eos_id: int
    pad_id: int
    teacher_tokenizer_path: str | None = None
    """With a token map: the teacher's tokenizer folder (the student's reply is re-encoded for both tokenizers)."""
    max_length: int = 0


class RolloutWorker:
    """One rollout actor: a copy of the student at a published weights version."""

    def __init__(self, spec: RolloutSpec) -> None:
        os.environ.update(spec.student.env)
        torch.set_num_threads(max(1, spec.student.threads))
        self.spec = spec
        self.model = spec.student.build()[0]
        self.version: tuple[int, int] | None = None  # (the feed's generation, optimizer steps applied)
        self.tokenizers = None
        if spec.teacher_tokenizer_path is not None:
            from distill.models.loading import load_tokenizer_folder

            self.tokenizers = (
                load_tokenizer_folder(spec.student.tokenizer_path),
                load_tokenizer_folder(spec.teacher_tokenizer_path),
            )

    def rollout(
        self,
        version: tuple[int, int],
        weights: list[ray.ObjectRef],
        batch_id: BatchId,
        arrays: dict,
        on_policy,
        examples: list | None = None,
    ) -> tuple[dict, list, list, float]:
        """(the written batch as numpy arrays, completion lengths, ended with eos, seconds), written by weights
        `version` ([ref of {name: numpy array}], fetched only when this actor holds another version: calls for
        several steps may be in flight at once); examples: the rows' examples, with a token map (their replies are
        replaced by the student's and re-encoded)."""
        start = time.perf_counter()
        if version != self.version:
            (state,) = ray.get(weights)
            self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
            self.version = version
        batch = {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}
        written, lengths, ended = rollout(
            self.model,
            batch,
            on_policy,
            seed=sample_seed(self.spec.seed, batch_id),
            eos_id=self.spec.eos_id,
            pad_id=self.spec.pad_id,
            reencode=None if examples is None else functools.partial(self._reencode, examples),
        )
        return {k: v.numpy() for k, v in written.items()}, lengths, ended, time.perf_counter() - start

    def _reencode(self, examples: list, completions: list[list[int]]) -> dict:
        student, teacher = self.tokenizers
        rows = written_pairs(
            student, teacher, examples, completions, stop_id=self.spec.eos_id, max_length=self.spec.max_length
        )
        return pad_batch(rows, self.spec.pad_id)


class RolloutGroup:
    """`actors` rollout actors; `rollout` round-robin, each call naming its weights version."""

    def __init__(
        self, spec: RolloutSpec, *, actors: int, cpus_per_actor: float, gpus_per_actor: float
    ) -> None:
        worker = ray.remote(RolloutWorker)
        self.actors = [
            worker.options(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, **NO_TASK_EVENTS).remote(spec)
            for _ in range(actors)
        ]
        self._next = 0
        self._lock = threading.Lock()

    def rollout(
        self,
        version: tuple[int, int],
        weights: ray.ObjectRef,
        batch_id: BatchId,
        arrays: dict,
        on_policy,
        examples=None,
    ) -> ray.ObjectRef:
        with self._lock:  # the feed's threads prepare several steps at once
            actor = self.actors[self._next]
            self._next = (self._next + 1) % len(self.actors)
        # In a list, so Ray passes the ref on instead of resolving it: an actor that holds the version skips it.
        return actor.rollout.remote(version, [weights], batch_id, arrays, on_policy, examples)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


class OnPolicyFeed:
    """Which batches the student writes, with which weights, and putting them, graded, into the buffer.

    assignment: the driver's Assignment; plans: step -> StepPlan; batch_arrays(batch_id): the dataset's batch as
    numpy arrays (the prompts); teachers: the run's teacher group; buffer: the run's buffer; max_staleness: the
    largest of the stages' on_policy.max_staleness.
    """

    def __init__(
        self,
        *,
        rollouts: RolloutGroup,
        teachers,
        buffer,
        assignment,
        plans,
        seed: int,
        batch_arrays,
        total_steps: int,
        max_staleness: int,
        batch_examples=None,
    ):
        self.rollouts, self.teachers, self.buffer = rollouts, teachers, buffer
        self.assignment, self.plans, self.seed = assignment, plans, seed
        self.batch_arrays, self.total_steps = batch_arrays, total_steps
        self.batch_examples = batch_examples  # with a token map: batch id -> its rows' examples
        self.max_staleness = max_staleness
        self.stats = RolloutStats()
        self.staleness: list[int] = []
        # At staleness k the next k steps may be written at once: while one step's samples are graded, the next
        # one's are written (on the rollout actors round-robin, each loading the version its step needs).
        self._pool = ThreadPoolExecutor(max(1, max_staleness), thread_name_prefix="onpolicy")
        self._reading = threading.Lock()
        # reset() counts the feed's starts: a restore never reuses a failed world's versions.
        self._generation = -1
        self.reset(0)

    # ---- what is written with what ----------------------------------------------------------------------------
    def written_ids(self, step: int) -> list[BatchId]:
        """Step `step`'s batches the student writes (empty off on-policy stages)."""
        if not 0 <= step < self.total_steps:
            return []
        spec = self.plans(step).on_policy
        if spec is None:
            return []
        return [b for b in self.assignment.step_batches(step) if is_on_policy(spec, self.seed, b)]

    def writes(self, batch_id: BatchId) -> bool:
        step = self.assignment.position_of(batch_id) // self.assignment.per_step
        return tuple(batch_id) in {tuple(b) for b in self.written_ids(step)}

    def version_for(self, step: int) -> int:
        """The weights version (optimizer steps applied) whose student writes step `step`'s batches."""
        return max(self.first, step - self.plans(step).on_policy.max_staleness)

    def needs_publish(self, step: int) -> bool:
        """Whether the weights after `step` (version step + 1) write some later step's batches."""
        version = step + 1
        return any(
            self.written_ids(s) and self.version_for(s) == version
            for s in range(version, min(version + self.max_staleness + 1, self.total_steps))
        )

    def ready_to_run_ahead(self, step: int) -> bool:
        """Whether step + 1 may be dispatched before `step` commits (its rollouts need no weights after `step`)."""
        return not self.written_ids(step + 1) or self.version_for(step + 1) <= step

    # ---- the work ---------------------------------------------------------------------------------------------
    def reset(self, first_step: int, weights: ray.ObjectRef | None = None) -> None:
        """Start (or restart after a restore) at `first_step` with its weights (the ranks' current ones)."""
        for future in getattr(self, "_pending", {}).values():
            future.cancel()
        self.first = first_step
        self._generation += 1
        self._pending: dict[int, Future] = {}
        self._written: dict[int, tuple] = {}  # step -> its rollouts' figures, until the step commits
        self.tokens: dict[BatchId, int] = {}
        if weights is not None:
            self.published(first_step, weights)

    def published(self, version: int, weights: ray.ObjectRef) -> None:
        """Weights `version` exist: prepare every step they write."""
        for step in range(version, min(version + self.max_staleness + 1, self.total_steps)):
            if step >= self.first and self.written_ids(step) and self.version_for(step) == version:
                key = (self._generation, version)
                self._pending[step] = self._pool.submit(self._prepare, step, key, weights)

    def wait(self, step: int) -> None:
        """Block until step `step`'s written batches are in the buffer (re-raising the work's error)."""
        future = self._pending.pop(step, None)
        if future is not None:
            future.result()
        elif self.written_ids(step):
            raise RuntimeError(
                f"on-policy step {step} was never prepared (weights {self.version_for(step)} missing)"
            )

    def _prepare(self, step: int, key: tuple[int, int], weights: ray.ObjectRef) -> None:
        """Write step `step`'s batches with weights key = (feed generation, version), grade them, put them."""
        version = key[1]
        plan = self.plans(step)
        ids = self.written_ids(step)
        start = time.perf_counter()
        examples = self.batch_examples or (lambda _: None)
        with self._reading:  # batch_arrays / batch_examples read one stream
            inputs = [(b, self.batch_arrays(b), examples(b)) for b in ids]
        refs = [
            self.rollouts.rollout(key, weights, b, arrays, plan.on_policy, rows) for b, arrays, rows in inputs
        ]
        figures, rolled_out = [], [0.0]

        def written():
            # Each batch goes to the teacher as soon as it is written: its grading overlaps the next one's rollout.
            for batch_id, ref in zip(ids, refs, strict=True):
                arrays, lengths, ended, _ = ray.get(ref)
                rolled_out[0] = (
                    time.perf_counter() - start
                )  # onpolicy/rollout_s: until the last one is written
                figures.append((lengths, ended))
                self.tokens[tuple(batch_id)] = int(arrays["loss_mask"].sum())
                yield batch_id, arrays

        for meta, ref in self.teachers.score_stream(written()):
            self.buffer.put(meta.batch_id, ref, meta.nbytes, timeout=None, force=True)
        self._written[step] = figures, rolled_out[0], step - version

    def committed(self, step: int) -> None:
        """Step `step` trained: its rollouts enter the metrics (in step order, whatever ran ahead)."""
        if self.plans(step).on_policy is None:
            return
        self.stats.batches += len(self.assignment.step_batches(step))
        batches, seconds, staleness = self._written.pop(step, ([], 0.0, None))
        for lengths, ended in batches:
            self.stats.add(lengths, ended)
        self.stats.seconds += seconds
        if staleness is not None:
            self.staleness.append(staleness)

    def metrics(self) -> dict[str, float]:
        """`onpolicy/*` of the steps since the last call (the single-process path's, plus staleness and drops)."""
        record: dict[str, Any] = self.stats.take()
        if self.staleness:
            record |= {"onpolicy/staleness": max(self.staleness), "onpolicy/dropped": 0}
            self.staleness = []
        return record

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
