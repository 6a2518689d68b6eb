"""TeacherGroup: R replicas x TP t Ray actors that turn token batches into TeacherBatch object refs.

The driver only holds references: inputs are `ray.put` once per batch and every TP rank of a replica reads the
same object; the replica's rank 0 returns the TeacherBatch as an object ref that consumers fetch directly
(numpy arrays, zero copy on a node). A small metadata object travels separately so the driver can notice a
failure without touching the payload.

Failure model: a TP replica is one torch.distributed world, so when any of its actors dies the surviving
ranks are stuck in a collective with a dead peer. The group therefore recovers a replica as a whole: it kills
the replica's actors, starts new ones in the same placement group (new rendezvous port) and re-dispatches the
replica's in-flight batches. Every batch's output is yielded exactly once, in submission order. A replica whose
node is gone gets a new placement group on any node with room (waiting up to `placement_timeout_s` for one, e.g.
a node added back), as Ray Train re-places a worker group. Several threads may stream through one group at once
(the driver's producer and the on-policy feed's graders); a replica they all lose is restarted once, and each
stream re-dispatches its own batches to the new actors.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distill.batch import BatchId, TeacherBatch, readonly_tensor
from distill.cluster.placement import (
    alive_node_ids,
    alive_nodes,
    bundle_nodes,
    plan_replica_nodes,
    replica_placement_group,
    wait_on_nodes,
)
from distill.cluster.worker import NO_TASK_EVENTS, TorchrunWorker
from distill.tracking.memory import MemoryPeaks, measure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherSpec:
    """What every teacher actor needs to build its engine (no config objects cross into actors)."""

    path: str
    topk: int
    dtype: str = "float32"
    logits_dtype: str = "float32"
    attn_implementation: str | None = None
    """transformers' attention implementation; None: eager when attention maps are shipped, else its default."""
    hidden_layers: tuple[int, ...] = ()
    attention_layers: tuple[int, ...] = ()
    device: str = "cpu"
    backend: str = "gloo"
    length_groups: int = 1
    """See TeacherEngine: forwards per batch over rows of similar length."""
    threads: int = 1
    """torch intra-op threads per actor (its CPU share); more threads than cores makes torch far slower."""
    token_table: np.ndarray | None = None
    """Cross-tokenizer runs: teacher id -> student id (-1: none). The actor scores the batch's teacher tokens
    and ships its top-k already in the student's positions and vocabulary (distill.xtok)."""


@dataclass
class BatchMeta:
    batch_id: BatchId
    num_tokens: int
    nbytes: int
    replica: int
    pid: int
    memory: MemoryPeaks | None = None
    """The scoring actor's memory after this batch (TP rank 0's; the other ranks send theirs beside it)."""


class TeacherWorker(TorchrunWorker):
    """One TP rank of one teacher replica. Made a Ray actor by TeacherGroup (resources via .options())."""

    def __init__(self, spec: TeacherSpec, replica: int, rank: int, tp: int) -> None:
        import torch

        torch.set_num_threads(max(1, spec.threads))
        self.spec, self.replica, self.rank, self.tp = spec, replica, rank, tp
        self.engine = None
        self.cross = None  # a CrossTokenizerTeacher around the engine when spec.token_table is set

    def setup(self, address: tuple[str, int]) -> int:
        """Join the replica's TP world the way torchrun would, then load the (sharded) teacher."""
        from distill.models.loading import resolve_dtype
        from distill.teacher.engine import TeacherEngine

        spec = self.spec
        self.join_group_env(
            rank=self.rank, world_size=self.tp, local_rank=self.rank, device=spec.device, address=address
        )
        kwargs = dict(
            dtype=spec.dtype,
            attn_implementation=spec.attn_implementation,
            hidden_layers=spec.hidden_layers,
            attention_layers=spec.attention_layers,
            logits_dtype=resolve_dtype(spec.logits_dtype),
            device=spec.device,
            length_groups=spec.length_groups,
        )
        if self.tp > 1:
            from distill.teacher.parallel import init_from_env

            init_from_env(spec.backend)
            self.engine = TeacherEngine.tensor_parallel(spec.path, spec.topk, **kwargs)
        else:
            self.engine = TeacherEngine.from_pretrained(spec.path, spec.topk, **kwargs)
        if spec.token_table is not None:
            from distill.xtok import CrossTokenizerTeacher

            self.cross = CrossTokenizerTeacher(self.engine, spec.token_table)
        return os.getpid()

    def score(
        self, batch_id: BatchId, inputs: dict[str, np.ndarray]
    ) -> tuple[BatchMeta | MemoryPeaks, TeacherBatch | None]:
        """All TP ranks run the forward; rank 0 returns (metadata, TeacherBatch), the others (their memory
        figures, None): the group reads every actor's memory from replies it waits for anyway."""
        t = {k: readonly_tensor(v) for k, v in inputs.items()}
        if self.cross is not None:
            out = self.cross.score(batch_id, t)  # every TP rank runs the teacher forward on teacher tokens
        else:
            out = self.engine.score_batch(batch_id, t)
        if self.rank != 0:
            return measure(), None
        meta = BatchMeta(tuple(batch_id), out.num_tokens, out.nbytes(), self.replica, os.getpid(), measure())
        return meta, out

    def sample(self, prompts: list[list[int]], params, first_index: int) -> list | None:
        """All TP ranks sample the same prompts with the same seeds (see distill.teacher.sampling, which keeps
        their collectives in lockstep); rank 0 returns the completions, the others None."""
        from distill.teacher.sampling import sample_with_engine

        out = sample_with_engine(self.engine, prompts, params, first_index)
        return out if self.rank == 0 else None


@dataclass
class _Replica:
    index: int
    node_id: str
    pg: object
    actors: list = field(default_factory=list)
    restarts: int = 0
    # Several threads stream through one group (the driver's producer, the on-policy feed's graders): the lock
    # makes a restart and the sends to the replica's actors one at a time; `generation` (bumped by each restart)
    # tells a stream whose batch died with the old actors that another stream has restarted them already.
    generation: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass
class _InFlight:
    batch_id: BatchId
    inputs: ray.ObjectRef
    replica: int
    generation: int  # of the replica's actors it was sent to
    meta: ray.ObjectRef
    payload: ray.ObjectRef
    others: list[ray.ObjectRef]  # TP ranks 1.. : their memory figures (resolved once their forward is done)


# Ray returns an actor task's result below its inline limit (max_direct_call_object_size, 100 KiB) inside the
# reply, kept in the caller's in-process store. Handed on nested (the buffer shards keep the ref in a list) such a
# result is copied into the object store, but the driver's in-process copy is never freed: bench/soak.py measured
# +5 MiB of driver memory per 100 steps at ~0.1 MB batches, reproduced with Ray alone (2.60). Small payloads are
# therefore put into the object store by the driver itself (one local copy of at most this many bytes).
_INLINE_LIMIT_BYTES = 128 * 1024


def _in_object_store(payload: ray.ObjectRef, nbytes: int) -> ray.ObjectRef:
    return ray.put(ray.get(payload)) if nbytes < _INLINE_LIMIT_BYTES else payload


class TeacherGroup:
    """Places and addresses the teacher actors; dispatches batches round-robin with bounded in-flight work.

    worker: the actor class, TeacherWorker (a model) by default; any class with its protocol (`setup(address)`,
    `score(batch_id, inputs) -> (BatchMeta, TeacherBatch)` on rank 0, `pid`, `node_id`) streams the same way,
    e.g. the offline cache's readers (distill.cluster.cache_source.CacheWorker).
    """

    def __init__(
        self,
        spec,
        *,
        worker: type = TeacherWorker,
        replicas: int,
        tp: int,
        cpus_per_actor: float = 1.0,
        gpus_per_actor: float = 0.0,
        spread: bool = True,
        max_in_flight_per_replica: int = 2,
        max_replica_restarts: int = 3,
        reserve_cpus: dict[str, float] | None = None,
        placement_timeout_s: float = 300.0,
        actor_options: dict | None = None,
        name: str = "teacher",
    ) -> None:
        """name: the group's placement groups are named after it (several teachers: one group each)."""
        self.spec, self.tp, self.worker, self.name = spec, tp, worker, name
        self.actor_options = dict(actor_options or {})  # e.g. a runtime_env (distill.cluster.vllm_worker)
        self.placement_timeout_s = placement_timeout_s
        self.restart_log: list[dict] = []  # one entry per replica restart: which, how long, re-placed or not
        self.cpus_per_actor, self.gpus_per_actor = cpus_per_actor, gpus_per_actor
        self.max_in_flight = max_in_flight_per_replica * replicas
        self.max_replica_restarts = max_replica_restarts
        nodes = plan_replica_nodes(
            alive_nodes(),
            replicas=replicas,
            tp=tp,
            cpus_per_actor=cpus_per_actor,
            gpus_per_actor=gpus_per_actor,
            spread=spread,
            reserve_cpus=reserve_cpus,
        )
        self.replicas = [self._place(r, node) for r, node in enumerate(nodes)]
        self._memory: dict[str, MemoryPeaks] = {}  # "<replica>.<tp rank>" -> its latest figures
        ray.get(
            [ref for rep in self.replicas for ref in self._start_actors(rep)]
        )  # all replicas load at once
        self._next = 0

    # ---- placement and start-up ---------------------------------------------------------------------
    def _place(self, index: int, node_id: str) -> _Replica:
        pg = replica_placement_group(
            node_id,
            tp=self.tp,
            cpus_per_actor=self.cpus_per_actor,
            gpus_per_actor=self.gpus_per_actor,
            name=f"{self.name}-replica-{index}-{os.getpid()}",
        )
        return _Replica(index, node_id, pg)

    def _start_actors(self, rep: _Replica) -> list[ray.ObjectRef]:
        """Create the replica's TP actors in its placement group; returns refs that resolve once all loaded."""
        worker = ray.remote(self.worker)
        rep.actors = [
            worker.options(
                num_cpus=self.cpus_per_actor,
                num_gpus=self.gpus_per_actor,
                max_restarts=0,  # recovery is per replica (see module docstring), not per actor
                **NO_TASK_EVENTS,
                **self.actor_options,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    rep.pg, placement_group_bundle_index=rank
                ),
            ).remote(self.spec, rep.index, rank, self.tp)
            for rank in range(self.tp)
        ]
        address = rep.actors[0].rendezvous_address.remote()
        return [a.setup.remote(address) for a in rep.actors]

    @staticmethod
    def _all_alive(rep: _Replica) -> bool:
        try:
            ray.get([a.pid.remote() for a in rep.actors], timeout=60)
            return True
        except (RayActorError, ray.exceptions.GetTimeoutError):
            return False

    def _restart(self, rep: _Replica) -> None:
        """New actors for a dead replica: in its placement group, or, when its node is gone, in a new one on any
        node with room (waiting up to placement_timeout_s for one, e.g. a node added back)."""
        if rep.restarts >= self.max_replica_restarts:
            raise RuntimeError(
                f"teacher replica {rep.index} failed {rep.restarts + 1} times; giving up (max_replica_restarts="
                f"{self.max_replica_restarts}). Check the actor logs for the cause."
            )
        rep.restarts += 1
        rep.generation += 1
        clock, lost = time.perf_counter(), rep.node_id
        log.warning("teacher replica %d died; restarting it (restart %d)", rep.index, rep.restarts)
        while True:
            for a in rep.actors:
                ray.kill(a, no_restart=True)
            if rep.node_id not in alive_node_ids():
                self._replace(rep)
            # A node lost while the new actors start (its death not yet known above) leaves them pending forever.
            if wait_on_nodes(self._start_actors(rep), {rep.node_id}):
                break
        self.restart_log.append(
            {
                "replica": rep.index,
                "seconds": time.perf_counter() - clock,
                "moved": rep.node_id != lost,
            }
        )

    def _replace(self, rep: _Replica) -> None:
        """A new placement group for a replica whose node is gone, on whatever node has room."""
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(rep.pg)
        rep.pg = replica_placement_group(
            None,
            tp=self.tp,
            cpus_per_actor=self.cpus_per_actor,
            gpus_per_actor=self.gpus_per_actor,
            name=f"{self.name}-replica-{rep.index}-{os.getpid()}-{rep.restarts}",
            timeout=self.placement_timeout_s,
        )
        rep.node_id = bundle_nodes(rep.pg)[0]
        log.warning("teacher replica %d re-placed on node %s (its node was lost)", rep.index, rep.node_id)

    # ---- scoring ----------------------------------------------------------------------------------------
    def _submit(self, batch_id: BatchId, inputs: ray.ObjectRef, replica: int | None = None) -> _InFlight:
        if replica is None:
            replica, self._next = self._next, (self._next + 1) % len(self.replicas)
        rep = self.replicas[replica]
        with rep.lock:  # not to actors a restart is replacing
            refs = [a.score.options(num_returns=2).remote(batch_id, inputs) for a in rep.actors]
            generation = rep.generation
        (meta, payload), others = refs[0], [memory for memory, _ in refs[1:]]
        return _InFlight(tuple(batch_id), inputs, replica, generation, meta, payload, others)

    def score_stream(
        self, batches: Iterable[tuple[BatchId, dict[str, np.ndarray]]]
    ) -> Iterator[tuple[BatchMeta, ray.ObjectRef]]:
        """Yield (metadata, TeacherBatch ref) for every input batch exactly once, in input order.

        At most `max_in_flight` batches are queued on the actors (backpressure on the input side).
        """
        pending: deque[_InFlight] = deque()
        source = iter(batches)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < self.max_in_flight:
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                batch_id, arrays = item
                pending.append(self._submit(batch_id, ray.put(arrays)))
            if not pending:
                break
            head = pending[0]
            try:
                meta = ray.get(head.meta)
                # The other TP ranks must have finished too; they hold no payload, only their memory figures.
                others = ray.get(head.others)
            except (RayActorError, RayTaskError) as err:
                self._recover(pending, head, err)
                continue
            pending.popleft()
            for rank, memory in enumerate([meta.memory, *others]):
                self._memory[f"{head.replica}.{rank}"] = memory
            yield meta, _in_object_store(head.payload, meta.nbytes)

    def _recover(self, pending: deque[_InFlight], failed: _InFlight, err: Exception) -> None:
        """Restart a dead replica (unless another stream has since `failed` was sent) and re-dispatch every
        in-flight batch this stream held on its old actors, keeping their order."""
        rep = self.replicas[failed.replica]
        with rep.lock:
            if rep.generation == failed.generation:
                # A dead TP peer surfaces on the surviving ranks as a failed collective (a plain task error), so
                # the replica is judged by whether all its actors are alive, not by the error's type.
                if (
                    isinstance(err, RayTaskError)
                    and not isinstance(err.cause, RayActorError)
                    and self._all_alive(rep)
                ):
                    raise err  # a bug in the forward, not a dead process: retrying would fail the same way
                self._restart(rep)
        for i, item in enumerate(pending):
            if item.replica == failed.replica and item.generation != rep.generation:
                pending[i] = self._submit(item.batch_id, item.inputs, item.replica)

    def score(self, batch_id: BatchId, arrays: dict[str, np.ndarray]) -> TeacherBatch:
        """One batch, fetched to the caller (tests and tools; the training path passes refs on)."""
        ((_, ref),) = list(self.score_stream([(batch_id, arrays)]))
        return ray.get(ref)

    # ---- introspection and shutdown ---------------------------------------------------------------------
    def memory_peaks(self) -> dict[str, MemoryPeaks]:
        """Each actor's memory ("<replica>.<tp rank>" -> figures) as of the last batch it scored in
        `score_stream`. A copy, safe to read from another thread than the one streaming (dict.copy holds the GIL)."""
        return self._memory.copy()

    def reserved_cpus(self) -> dict[str, float]:
        """node id -> CPUs this group's replicas hold there (what a second group of the run must leave them)."""
        out: dict[str, float] = {}
        for rep in self.replicas:
            out[rep.node_id] = out.get(rep.node_id, 0.0) + self.tp * self.cpus_per_actor
        return out

    def actor_nodes(self) -> list[list[str]]:
        return [ray.get([a.node_id.remote() for a in rep.actors]) for rep in self.replicas]

    def actor_pids(self) -> list[list[int]]:
        return [ray.get([a.pid.remote() for a in rep.actors]) for rep in self.replicas]

    def kill_actor(self, replica: int, rank: int) -> None:
        """Failure injection for tests and chaos drills."""
        ray.kill(self.replicas[replica].actors[rank], no_restart=True)

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for rep in self.replicas:
            for a in rep.actors:
                ray.kill(a, no_restart=True)
            remove_placement_group(rep.pg)
        self.replicas = []
