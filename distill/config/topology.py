"""Topology: the pure arithmetic of a run's layout, validated before any process starts.

Every relation that would otherwise fail minutes into a job on a cluster is checked here, and every error
quotes the numbers involved and says what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distill.errors import TopologyError


@dataclass(frozen=True)
class ModelShape:
    """The few architecture numbers the layout depends on (from a config.json; no weights needed)."""

    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int = 0
    vocab_size: int = 0


@dataclass(frozen=True)
class PairFacts:
    """What run validation needs to know about the teacher and the student (from config.json files)."""

    teacher_vocab: int
    student_vocab: int
    teacher_layers: int
    student_layers: int
    teacher_shape: ModelShape
    same_tokenizer: bool
    """False when the two tokenizers are known to differ (or the vocab sizes do)."""


@dataclass
class TopologyFields:
    """The numbers of a cluster layout: the one field list that `cluster.*` (`ClusterConfig`, which adds the mode
    and address) and `Topology` (which checks every relation) share."""

    nodes: int = 1
    cpus_per_node: int = 2
    gpus_per_node: int = 0
    device: str = "cpu"
    """`cpu` or `cuda`; the code path is the same, only the device and backend differ."""
    backend: str = "gloo"
    """torch.distributed backend: `gloo` on CPU, `nccl` on GPUs."""
    teacher_replicas: int = 1
    teacher_tp: int = 1
    student_world_size: int = 1
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    global_batch_size: int = 8
    """Sequences per optimizer step; must equal micro_batch_size * grad_accum_steps * student_world_size."""
    buffer_shards: int = 1
    buffer_capacity: int = 8
    """Teacher batches held in the buffer before the teacher side is made to wait (backpressure)."""
    buffer_capacity_bytes: int = 0
    """A second bound on the buffer: payload bytes held across all shards (split evenly); 0 bounds by count only.
    Long reasoning traces make batches large: bound the object store memory the buffer may pin."""
    cpus_per_teacher_actor: float = 1.0
    cpus_per_student_actor: float = 1.0
    gpus_per_teacher_actor: float = 0.0
    gpus_per_student_actor: float = 0.0


@dataclass
class Topology(TopologyFields):
    """A validated layout: every relation is checked at construction and the object is read-only after it."""

    def __post_init__(self) -> None:
        self._check_positive()
        self._check_device_backend()
        self._check_batch_arithmetic()
        self._check_buffer()
        object.__setattr__(self, "_checked", True)

    def __setattr__(self, name: str, value) -> None:
        # Read-only once checked (a frozen dataclass cannot extend the mutable field list Hydra's schema uses).
        if getattr(self, "_checked", False):
            raise AttributeError(f"Topology is read-only; build a new one (cannot set {name})")
        super().__setattr__(name, value)

    @classmethod
    def from_config(cls, cfg) -> Topology:
        """Build from a `ClusterConfig` (or any object with the same attributes)."""
        names = cls.__dataclass_fields__
        return cls(**{n: getattr(cfg, n) for n in names})

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def teacher_actors(self) -> int:
        return self.teacher_replicas * self.teacher_tp

    @property
    def batches_per_step(self) -> int:
        """Micro-batches one optimizer step consumes: grad_accum_steps on each of student_world_size ranks."""
        return self.grad_accum_steps * self.student_world_size

    @property
    def uses_gpus(self) -> bool:
        return self.device == "cuda"

    def bundles(self) -> list[dict[str, float]]:
        """One resource bundle per actor: teacher actors first, then student actors."""
        t = {"CPU": self.cpus_per_teacher_actor, "GPU": self.gpus_per_teacher_actor}
        s = {"CPU": self.cpus_per_student_actor, "GPU": self.gpus_per_student_actor}
        return [t] * self.teacher_actors + [s] * self.student_world_size

    # ---- checks ---------------------------------------------------------------------------------
    def _check_positive(self) -> None:
        for name in (
            "nodes",
            "teacher_replicas",
            "teacher_tp",
            "student_world_size",
            "micro_batch_size",
            "grad_accum_steps",
            "global_batch_size",
            "buffer_shards",
            "buffer_capacity",
        ):
            value = getattr(self, name)
            if value < 1:
                raise TopologyError(f"cluster.{name}={value} must be >= 1.")
        if self.cpus_per_node < 1 and self.gpus_per_node < 1:
            raise TopologyError(
                f"cluster.cpus_per_node={self.cpus_per_node} and gpus_per_node={self.gpus_per_node}: "
                "a node needs at least one CPU or GPU."
            )

    def _check_device_backend(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise TopologyError(f"cluster.device={self.device!r}: use 'cpu' or 'cuda'.")
        if self.device == "cpu" and self.backend == "nccl":
            raise TopologyError(
                "cluster.backend='nccl' needs cluster.device='cuda'; use backend=gloo on CPU."
            )
        if self.device == "cuda" and self.gpus_per_node < 1:
            raise TopologyError(
                f"cluster.device='cuda' but cluster.gpus_per_node={self.gpus_per_node}; set gpus_per_node or "
                "use device=cpu."
            )

    def _check_batch_arithmetic(self) -> None:
        product = self.micro_batch_size * self.grad_accum_steps * self.student_world_size
        if product != self.global_batch_size:
            raise TopologyError(
                f"micro_batch_size x grad_accum_steps x student_world_size = {self.micro_batch_size} x "
                f"{self.grad_accum_steps} x {self.student_world_size} = {product}, but global_batch_size = "
                f"{self.global_batch_size}. Set cluster.grad_accum_steps="
                f"{self._suggest_accum()} or change global_batch_size to {product}."
            )

    def _suggest_accum(self) -> str:
        per_step = self.micro_batch_size * self.student_world_size
        if self.global_batch_size % per_step == 0:
            return str(self.global_batch_size // per_step)
        return f"<no integer: {self.global_batch_size} is not a multiple of {per_step}>"

    def _check_buffer(self) -> None:
        if self.buffer_capacity < self.buffer_shards:
            raise TopologyError(
                f"cluster.buffer_capacity={self.buffer_capacity} is below buffer_shards={self.buffer_shards}: "
                "every shard must hold at least one batch."
            )

    def check_model(self, teacher: ModelShape) -> None:
        """Tensor parallelism shards attention heads and experts, so TP must divide both."""
        tp = self.teacher_tp
        if teacher.num_attention_heads % tp:
            raise TopologyError(
                f"teacher_tp={tp} does not divide the teacher's {teacher.num_attention_heads} attention heads; "
                f"use a divisor such as {_divisors(teacher.num_attention_heads)}."
            )
        if teacher.num_key_value_heads % tp and tp % teacher.num_key_value_heads:
            raise TopologyError(
                f"teacher_tp={tp} and the teacher's {teacher.num_key_value_heads} key/value heads: one must divide "
                f"the other to shard or replicate KV heads; use teacher_tp in {_divisors(teacher.num_key_value_heads)}."
            )
        if teacher.num_experts and teacher.num_experts % tp:
            raise TopologyError(
                f"teacher_tp={tp} does not divide the teacher's {teacher.num_experts} routed experts; use a divisor "
                f"such as {_divisors(teacher.num_experts)}."
            )

    def check_fits(self) -> None:
        """Every actor's bundle must fit on some node and all of them in the cluster as a whole."""
        need_cpu = sum(b["CPU"] for b in self.bundles())
        need_gpu = sum(b["GPU"] for b in self.bundles())
        have_cpu = self.nodes * self.cpus_per_node
        have_gpu = self.nodes * self.gpus_per_node
        if need_cpu > have_cpu or need_gpu > have_gpu:
            raise TopologyError(
                f"the run needs {need_cpu:g} CPUs and {need_gpu:g} GPUs "
                f"({self.teacher_replicas} teacher replicas x TP {self.teacher_tp} + {self.student_world_size} "
                f"student ranks) but the cluster has {self.nodes} nodes x ({self.cpus_per_node} CPUs, "
                f"{self.gpus_per_node} GPUs) = {have_cpu} CPUs, {have_gpu} GPUs. Reduce replicas/TP/world size "
                "or per-actor resources, or add nodes."
            )
        # A TP group lives on one node (its collectives are latency-bound), so a replica must fit one node.
        replica_cpu = self.teacher_tp * self.cpus_per_teacher_actor
        replica_gpu = self.teacher_tp * self.gpus_per_teacher_actor
        if replica_cpu > self.cpus_per_node or replica_gpu > self.gpus_per_node:
            raise TopologyError(
                f"one teacher replica (TP {self.teacher_tp}) needs {replica_cpu:g} CPUs and {replica_gpu:g} GPUs on "
                f"a single node, but a node has {self.cpus_per_node} CPUs and {self.gpus_per_node} GPUs. "
                "Lower teacher_tp or the per-actor resources."
            )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and d <= max(8, math.isqrt(n) + 1)]


def check_capacity(capacity: int, shards: int, batches_per_step: int) -> int:
    """Per-shard capacity; TopologyError unless the oldest step's batches always fit (no deadlock).

    A step's batches are consecutive stream positions, so shard j holds at most ceil(batches_per_step / S)
    of them; everything else a shard holds is newer and can wait.
    """
    per_shard = capacity // shards
    need = math.ceil(batches_per_step / shards)
    if per_shard < need:
        raise TopologyError(
            f"cluster.buffer_capacity={capacity} over buffer_shards={shards} gives {per_shard} batches per "
            f"shard, but one optimizer step consumes {batches_per_step} batches (grad_accum_steps x "
            f"student_world_size), i.e. up to {need} per shard: the students would wait for batches the full "
            f"buffer cannot take. Set cluster.buffer_capacity >= {need * shards}."
        )
    return per_shard
