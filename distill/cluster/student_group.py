"""StudentGroup: W Ray actors, each one data-parallel DeepSpeed rank of the student (via `distill.student`).

Every actor sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as torchrun would (rank 0 picks the
port on its node), joins the process group, builds the student and the objective with the run's builder (the
same seed gives the same initial weights as the reference) and wraps them in a `StudentEngine`. A step leases
the rank's batches from the buffer and fetches the TeacherBatch payloads itself: they never pass through the
driver. The driver also names the rank's batches of the next step, which the rank leases and fetches in the
background while it trains (`distill.cluster.prefetch`).

Placement (`plan_student_nodes`): one placement group, one bundle per rank, PACKed onto the nodes the teachers
leave free, filling from the LAST node backwards (teachers are planned from the first node on), so on two or more
nodes teachers and students sit on different nodes whenever the resources allow it.

Failure model: the W ranks are one torch.distributed world, so a dead rank leaves the others stuck in (or
failing) a collective. The group is therefore restarted as a whole (`restart`: new actors in the same placement
group, a new rendezvous port, a new consumer generation); the driver then loads the latest checkpoint. If a node
of the group is gone, the new world gets a new placement group PACKed onto the live nodes (waiting for room, e.g. a
node added back), as Ray Train re-forms its worker group.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distill.batch import BatchId
from distill.cluster.buffer import Buffer
from distill.cluster.placement import alive_node_ids, bundle_nodes, wait_on_nodes, wait_placed
from distill.cluster.prefetch import Prefetcher
from distill.cluster.worker import NO_TASK_EVENTS, TorchrunWorker
from distill.tracking.memory import measure

log = logging.getLogger(__name__)

# Environment the student actors copy from the driver (DeepSpeed's accelerator choice and its JIT op cache).
FORWARDED_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE")


class StudentFailure(RuntimeError):
    """A student actor died: the group must be restarted and restored from a checkpoint."""


@dataclass(frozen=True)
class StudentSpec:
    """What every student actor needs (no config objects cross into actors).

    build: called inside each actor after the process group is up; returns (student model, objective, LR
        schedule: step -> multiplier, or None for optim's own). It must
        be picklable (a module-level function or a functools.partial of one) and seed itself, so every rank and
        every restart builds the same initial weights.
    optim: an `OptimizerConfig`; total_steps: the LR schedule's length; ds_config: from `build_ds_config`.
    tokenizer_path: folder whose tokenizer is saved beside the exported student.
    threads: torch intra-op threads per actor (its CPU share).
    """

    build: Callable[[], tuple[Any, Any]]
    optim: Any
    total_steps: int
    ds_config: dict
    tokenizer_path: str | None = None
    device: str = "cpu"
    backend: str = "gloo"
    threads: int = 1
    gradient_checkpointing: bool = False
    share_every: int = 0
    """Measure the terms' gradient shares on rank 0 every this many steps (the logged ones); 0: never."""
    env: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    """train.seed: which batches of an on-policy stage are the student's own (distill.training.onpolicy)."""

    def engine_options(self) -> dict[str, Any]:
        """The StudentEngine keyword arguments the spec fixes (the LR schedule comes from `build`)."""
        names = ("optim", "total_steps", "ds_config", "gradient_checkpointing", "share_every")
        return {name: getattr(self, name) for name in names}


class StudentWorker(TorchrunWorker):
    """One data-parallel rank. Made a Ray actor by StudentGroup (resources via .options())."""

    def __init__(
        self, spec: StudentSpec, rank: int, world_size: int, local_rank: int, buffer: Buffer, consumer: str
    ) -> None:
        os.environ.update(spec.env)
        os.environ["OMP_NUM_THREADS"] = str(spec.threads)
        import torch

        torch.set_num_threads(max(1, spec.threads))
        self.spec, self.rank, self.world_size, self.local_rank = spec, rank, world_size, local_rank
        self.buffer, self.consumer = buffer, consumer
        self.engine = None
        self.batches: Prefetcher | None = None  # made in setup, once the engine knows its device

    def setup(self, address: tuple[str, int]) -> int:
        """Join the student world as torchrun would (rank 0's `rendezvous_address`), then build the student,
        the objective and the DeepSpeed engine."""
        from distill.student import StudentEngine, init_distributed_from_env

        spec = self.spec
        self.join_group_env(
            rank=self.rank,
            world_size=self.world_size,
            local_rank=self.local_rank,
            device=spec.device,
            address=address,
        )
        init_distributed_from_env(spec.backend)
        model, objective, lr_schedule = spec.build()
        self.engine = StudentEngine(model, objective, lr_schedule=lr_schedule, **spec.engine_options())
        device = self.engine.device
        # Converted on the prefetch thread: the int64 copies of the ids leave the step's critical path too.
        self.batches = Prefetcher(
            self.buffer, self.consumer, convert=lambda b: (tuple(b.batch_id), b.to_torch(device))
        )
        return os.getpid()

    def train_step(
        self,
        step: int,
        batch_ids: Sequence[BatchId],
        global_tokens: int,
        plan: Any = None,
        next_ids: Sequence[BatchId] | None = None,
        publish: bool = False,
    ) -> dict[str, Any]:
        """Lease this rank's micro-batches (in micro-step order), fetch them, run one optimizer step.

        next_ids: this rank's batches of the next step, leased and fetched while this one trains (None: the
        last step). The batches stay leased, not acked: the driver acks a step's batches once it commits.
        publish: after the step, gather the weights (every rank takes part) and return them on rank 0 as
        `weights`: [ref of {name: numpy array}] (a rollout actor's next weights; on-policy stages).
        Returns StudentEngine.train_step's dict (this rank's term sums) plus `fetch_s` (the time this step
        waited for its batches) and `memory` (this process's `MemoryPeaks`: microseconds, no device sync).
        """
        start = time.perf_counter()
        fetched = self.batches.take(batch_ids)
        if next_ids is not None:
            self.batches.prefetch(next_ids)
        fetch_s = time.perf_counter() - start
        micro = [_marked(batch_id, mb, plan, self.spec.seed) for batch_id, mb in fetched]
        out = self.engine.train_step(step, micro, global_tokens, plan)
        batch_ids = [batch_id for batch_id, _ in fetched]
        out = {**out, "fetch_s": fetch_s, "batch_ids": batch_ids, "memory": measure()}
        if publish:
            out |= self.weights()
        return out

    def weights(self) -> dict[str, list]:
        """The full weights (every rank takes part): {"weights": [ref of {name: numpy array}]} on rank 0 (a list,
        so Ray passes the ref on instead of resolving it), {} on the others."""
        weights = self.engine.full_state_dict()
        if weights is None:
            return {}
        return {"weights": [ray.put({name: t.numpy() for name, t in weights.items()})]}

    def save(self, directory: str, client_state: dict) -> None:
        """DeepSpeed checkpoint (all ranks) + this rank's torch RNG state."""
        import torch

        self.engine.save_checkpoint(directory, client_state)
        torch.save({"cpu": torch.get_rng_state()}, Path(directory) / f"rng-rank{self.rank}.pt")

    def load(self, directory: str) -> dict:
        import torch

        state = self.engine.load_checkpoint(directory)
        rng = torch.load(Path(directory) / f"rng-rank{self.rank}.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        return state

    def export(self, out_dir: str) -> str:
        from distill.models.loading import load_tokenizer_folder

        tokenizer = load_tokenizer_folder(self.spec.tokenizer_path) if self.spec.tokenizer_path else None
        return str(self.engine.export_hf(out_dir, tokenizer))


def _marked(batch_id: BatchId, micro: dict, plan: Any, seed: int) -> dict:
    """A batch the student wrote itself (an on-policy stage's, by the same draw as the rollouts) trains without
    its hard labels, as on the single-process path."""
    from distill.training.objective import ON_POLICY
    from distill.training.onpolicy import is_on_policy

    spec = getattr(plan, "on_policy", None)
    if spec is None or not is_on_policy(spec, seed, batch_id):
        return micro
    import torch

    return {**micro, ON_POLICY: torch.ones((), dtype=torch.bool)}


class StudentGroup:
    """Places, starts, addresses and restarts the W student actors."""

    def __init__(
        self,
        spec: StudentSpec,
        buffer: Buffer,
        *,
        nodes: list[str],
        cpus_per_actor: float = 1.0,
        gpus_per_actor: float = 0.0,
        failure_grace_s: float = 30.0,
        placement_timeout_s: float = 300.0,
    ) -> None:
        """nodes: node id per rank (`plan_student_nodes`). Returns once the placement group is placed; the
        actors load in the background until `wait_ready` (so the teachers can load meanwhile).
        placement_timeout_s: how long a restart after a node's loss waits for room (a node added back)."""
        self.spec, self.buffer = spec, buffer
        self.world_size = len(nodes)
        self.cpus_per_actor, self.gpus_per_actor = cpus_per_actor, gpus_per_actor
        self.failure_grace_s = failure_grace_s
        self.placement_timeout_s = placement_timeout_s
        self.nodes: list[str] = []
        self.pg = None
        self._place(nodes, timeout=120.0)
        self.generation = 0
        self.restarts = 0
        self.actors: list = []
        self._pending_setup = self._start()

    # ---- placement, start-up and restart -------------------------------------------------------------------
    def _place(self, nodes: list[str] | None, *, timeout: float) -> None:
        """The ranks' placement group: one bundle per rank, pinned to `nodes` (the plan), or with None PACKed
        wherever there is room (a restart after a node's loss, as Ray Train re-forms its worker group)."""
        from ray.util.placement_group import placement_group

        bundle = {"CPU": self.cpus_per_actor, **({"GPU": self.gpus_per_actor} if self.gpus_per_actor else {})}
        pinned = {} if nodes is None else {"bundle_label_selector": [{"ray.io/node-id": n} for n in nodes]}
        self.pg = placement_group(
            [dict(bundle) for _ in range(self.world_size)],
            strategy="PACK",
            name=f"students-{os.getpid()}-{id(self)}-{time.monotonic_ns()}",
            **pinned,
        )
        wait_placed(self.pg, f"{self.world_size} student ranks ({bundle} each)", timeout)
        # Ranks in node order (rank 0 on the first); a re-placed group reads where Ray put its bundles.
        self.nodes = list(nodes) if nodes is not None else bundle_nodes(self.pg)

    def _replace_if_lost(self) -> bool:
        """Drop the placement group if a node of it is gone and place a new one on the live nodes."""
        from ray.util.placement_group import remove_placement_group

        if set(self.nodes) <= alive_node_ids():
            return False
        lost = sorted(set(self.nodes) - alive_node_ids())
        log.warning("student nodes %s lost; re-placing the %d ranks", lost, self.world_size)
        remove_placement_group(self.pg)
        self._place(None, timeout=self.placement_timeout_s)
        return True

    @property
    def consumers(self) -> list[str]:
        """The buffer consumer names of the current actors (generation-tagged, so a restart gets new ones)."""
        return [f"students-g{self.generation}-r{rank}" for rank in range(self.world_size)]

    def _start(self) -> list[ray.ObjectRef]:
        worker = ray.remote(StudentWorker)
        local = [self.nodes[:r].count(n) for r, n in enumerate(self.nodes)]
        self.actors = [
            worker.options(
                num_cpus=self.cpus_per_actor,
                num_gpus=self.gpus_per_actor,
                max_restarts=0,  # recovery is per group (see module docstring)
                **NO_TASK_EVENTS,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
            ).remote(self.spec, r, self.world_size, local[r], self.buffer, self.consumers[r])
            for r in range(self.world_size)
        ]
        # Passed as a ref (resolved by Ray before each setup runs), so the driver does not wait for rank 0's
        # process to start: the teachers can be created meanwhile.
        address = self.actors[0].rendezvous_address.remote()
        return [a.setup.remote(address) for a in self.actors]

    def wait_ready(self) -> list[int]:
        """Block until every rank has built its engine; returns the actors' pids."""
        pending, self._pending_setup = self._pending_setup, []
        try:
            return ray.get(pending)
        except (RayActorError, RayTaskError) as err:
            if actor_or_object_lost(err):
                raise StudentFailure(f"a student actor died while starting: {err}") from err
            raise

    def restart(self) -> None:
        """Kill every actor and start a new world (new consumer names) in the same placement group, or in a new
        one on the live nodes if a node of it is gone; waits until it is ready (StudentFailure if a new rank
        dies meanwhile)."""
        self.stop()
        self.generation += 1
        self.restarts += 1
        log.warning("student group restarted (generation %d)", self.generation)
        while True:
            self._replace_if_lost()
            self._pending_setup = self._start()
            pending, self._pending_setup = self._pending_setup, []
            try:
                if wait_on_nodes(pending, set(self.nodes)):
                    return
            except (RayActorError, RayTaskError) as err:
                if actor_or_object_lost(err):
                    raise StudentFailure(f"a student actor died while starting: {err}") from err
                raise
            self.stop()  # a node lost while the ranks started (pinned to it, they would wait forever)

    def stop(self) -> None:
        """Kill every actor now (a failed world: frees its resources for what is re-placed meanwhile)."""
        for a in self.actors:
            ray.kill(a, no_restart=True)

    # ---- calls on every rank --------------------------------------------------------------------------
    def _call(self, method: str, args_per_rank: list[tuple], poll: Callable[[], None] | None = None) -> list:
        """Run `method` on every rank; results in rank order. A dead rank raises StudentFailure."""
        return self.wait(self._submit(method, args_per_rank), poll)

    def _submit(self, method: str, args_per_rank: list[tuple]) -> list[ray.ObjectRef]:
        return [getattr(a, method).remote(*args) for a, args in zip(self.actors, args_per_rank, strict=True)]

    def wait(self, refs: list[ray.ObjectRef], poll: Callable[[], None] | None = None) -> list:
        """Results of a call on every rank (refs from `submit_train_step`), in rank order; a dead rank raises
        StudentFailure.

        Waits with ray.wait, never ray.get on the whole list: when one rank dies the others may sit in a
        collective for a long time, and the driver must not wait for them. `poll` runs about once per second
        while waiting (the driver checks its teacher producer there).
        """
        index = {r: i for i, r in enumerate(refs)}
        results: list = [None] * len(refs)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            if poll is not None:
                poll()
            for ref in done:
                try:
                    results[index[ref]] = ray.get(ref)
                except (RayActorError, RayTaskError) as err:
                    self._classify(err, pending)
        return results

    def _classify(self, err: Exception, pending: list) -> None:
        """Raise StudentFailure if any rank's actor died (the error may first come from a surviving rank whose
        collective lost its peer), else re-raise `err` (a bug: retrying would fail the same way)."""
        if actor_or_object_lost(err):
            raise StudentFailure(f"student actor died: {err}") from err
        deadline = time.monotonic() + self.failure_grace_s
        while pending and time.monotonic() < deadline:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0.01))
            for ref in done:
                try:
                    ray.get(ref)
                except (RayActorError, RayTaskError) as other:
                    if actor_or_object_lost(other):
                        raise StudentFailure(f"student actor died: {other}") from other
        if not self._all_alive():
            raise StudentFailure(f"a student actor died ({err})") from err
        raise err

    def _all_alive(self) -> bool:
        try:
            ray.get([a.pid.remote() for a in self.actors], timeout=self.failure_grace_s)
        except RayActorError:
            return False
        except GetTimeoutError:
            return True  # busy (stuck in a collective) is not dead
        return True

    def train_step(
        self,
        step: int,
        rank_batches: list[list[BatchId]],
        global_tokens: int,
        poll: Callable[[], None] | None = None,
        plan: Any = None,
        next_batches: list[list[BatchId]] | None = None,
    ) -> list[dict[str, Any]]:
        """One optimizer step on every rank; rank r trains on rank_batches[r] (its micro-steps, in order), with
        the curriculum's `plan` of the step (None: the objective as configured), and leases next_batches[r]
        ahead (the next step's; None: nothing to prefetch)."""
        return self.wait(self.submit_train_step(step, rank_batches, global_tokens, plan, next_batches), poll)

    def submit_train_step(
        self,
        step: int,
        rank_batches: list[list[BatchId]],
        global_tokens: int,
        plan: Any = None,
        next_batches: list[list[BatchId]] | None = None,
        publish: bool = False,
    ) -> list[ray.ObjectRef]:
        """`train_step` without waiting: refs for `wait`. The ranks run their calls in submission order (plain
        single-threaded actors), so a step submitted before the previous one finished starts as soon as it does.
        publish: rank 0's answer also carries the weights after the step (`weights`, see StudentWorker)."""
        ahead = next_batches if next_batches is not None else [None] * self.world_size
        args = [
            (step, ids, global_tokens, plan, nxt, publish)
            for ids, nxt in zip(rank_batches, ahead, strict=True)
        ]
        return self._submit("train_step", args)

    def save(self, directory: str | Path, client_state: dict) -> None:
        self._call("save", [(str(directory), client_state)] * self.world_size)

    def load(self, directory: str | Path) -> dict:
        """Load on every rank; returns rank 0's client state (all ranks saved the same one)."""
        return self._call("load", [(str(directory),)] * self.world_size)[0]

    def weights(self) -> ray.ObjectRef:
        """A ref of the current full weights ({name: numpy array}; ZeRO-3 gathers on every rank)."""
        return self._call("weights", [()] * self.world_size)[0]["weights"][0]

    def export(self, out_dir: str | Path) -> Path:
        """The student as a Hugging Face folder (rank 0 writes; ZeRO-3 gathers on every rank)."""
        return Path(self._call("export", [(str(out_dir),)] * self.world_size)[0])

    # ---- introspection, failure injection, shutdown -----------------------------------------------------
    def actor_nodes(self) -> list[str]:
        return ray.get([a.node_id.remote() for a in self.actors])

    def kill_actor(self, rank: int) -> None:
        """Failure injection for tests and chaos drills."""
        ray.kill(self.actors[rank], no_restart=True)

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        self.stop()
        self.actors = []
        remove_placement_group(self.pg)


def actor_or_object_lost(err: BaseException) -> bool:
    """Whether `err` says a process or an object is gone (an actor died: this one, a peer, a buffer shard it
    leased from; or a payload lost with its node's object store), directly or as the cause of a task's error:
    what a restore from the last checkpoint recovers, unlike an error that a retry would raise again."""
    lost = (RayActorError, ObjectLostError)
    return isinstance(err, lost) or (isinstance(err, RayTaskError) and isinstance(err.cause, lost))
