"""Cluster layout planning: fit the teacher (replicas x TP) and the student ranks into the devices from the
models' facts and a memory model, balance teacher and student throughput, and check the layout with the same
`Topology` a run uses, so the `cluster.*` overrides it prints validate. Pure arithmetic, tested without
processes; `distill plan` (launch/plan.py) is its command line.

Per-device throughputs are given (measured, e.g. from a run's metrics) or estimated from FLOPs: a teacher forward
costs 2 x active parameters per token, a student training step 6 x parameters, at `mfu` of `peak_tflops`.
Throughput is taken as linear in devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from distill.config.topology import ModelShape, Topology, check_capacity
from distill.errors import TopologyError
from distill.models.facts import ModelFacts
from distill.tracking.metrics_log import read_metrics

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1, "fp8": 1, "int8": 1, "int4": 0.5}
TEACHER_HEADROOM = 1.2
"""Teacher memory = weights x this (activations, top-k buffers, allocator slack; scoring keeps no KV cache)."""
USABLE = 0.9
"""Share of a device's memory a process can use (CUDA context, fragmentation)."""


@dataclass(frozen=True)
class Hardware:
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float = 80.0
    cpus_per_node: int = 96
    peak_tflops: float = 989.0
    """Dense bf16 peak per device (H100/H200 SXM: 989)."""
    mfu: float = 0.4


@dataclass(frozen=True)
class Workload:
    """What runs on the layout: the two models (their dtypes and measured rates), then the student's step."""

    teacher_dtype: str = "bfloat16"
    student_dtype: str = "bfloat16"
    teacher_tokens_per_s: float | None = None
    """Per device; None estimates it from FLOPs."""
    student_tokens_per_s: float | None = None
    zero_stage: int = 2
    seq_len: int = 4096
    micro_batch: int = 4
    global_batch: int = 256
    topk: int = 64
    teacher_backend: str = "hf"
    """`hf`: a replica is one TP group on one node. `vllm`: TP within a node x pipeline stages across nodes (vLLM
    runs pipeline parallelism over its own Ray workers), so a replica may span nodes."""

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step, to split between the student ranks and their accumulation steps."""
        if self.global_batch % self.micro_batch:
            raise TopologyError(
                f"global batch {self.global_batch} is not a multiple of the micro-batch {self.micro_batch}."
            )
        return self.global_batch // self.micro_batch


@dataclass(frozen=True)
class Plan:
    topology: Topology
    """The layout, checked as a run checks it; `overrides` prints its `cluster.*` values."""
    teacher_tokens_per_s: float
    """The whole teacher group."""
    student_tokens_per_s: float
    """The whole student group."""
    teacher_memory_gb: float
    """Per teacher device."""
    student_memory_gb: float
    """Per student device."""
    buffer_gb: float
    idle_devices: int
    teacher_pp: int = 1
    """Pipeline stages per teacher replica, one node each (vLLM backend); a replica uses TP x PP devices."""

    def __getattr__(self, name: str):
        # The layout's numbers read through: plan.teacher_tp is plan.topology.teacher_tp.
        if name in Topology.__dataclass_fields__:
            return getattr(self.topology, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def balance(self) -> float:
        """Teacher / student throughput: 1 is balanced; < 1 the students wait, > 1 the teacher waits."""
        return self.teacher_tokens_per_s / self.student_tokens_per_s


def teacher_memory_gb(teacher: ModelFacts, dtype: str) -> float:
    return teacher.param_count * _bytes(dtype) * TEACHER_HEADROOM / 1e9


def student_memory_gb(student: ModelFacts, dtype: str, zero_stage: int, world: int) -> float:
    """Per-rank training state: weights, gradients and Adam (fp32 master, m, v = 12 B/param), ZeRO-sharded."""
    p, w = student.param_count, _bytes(dtype)
    weights, grads, optim = p * w, p * w, p * 12
    if zero_stage >= 1:
        optim /= world
    if zero_stage >= 2:
        grads /= world
    if zero_stage >= 3:
        weights /= world
    return (weights + grads + optim) / 1e9


def estimated_tokens_per_s(flops_per_token: float, hw: Hardware) -> float:
    return hw.peak_tflops * 1e12 * hw.mfu / flops_per_token


def valid_tp(teacher: ModelFacts, gpus_per_node: int) -> list[int]:
    """TP sizes a teacher replica can use: within one node, dividing heads and experts (Topology's rules)."""
    shape = _shape(teacher)
    out = []
    for tp in range(1, gpus_per_node + 1):
        try:
            _topology(1, tp, 1, 1, 1, Hardware(1, gpus_per_node), 1).check_model(shape)
        except TopologyError:
            continue
        out.append(tp)
    return out


def plan_layout(teacher: ModelFacts, student: ModelFacts, hw: Hardware, work: Workload) -> Plan:
    """The layout with the highest end-to-end rate min(teacher, student tokens/s); ties go to fewer devices,
    then to the smaller TP. TopologyError (with the numbers) when the teacher or the student cannot fit."""
    devices, usable = hw.nodes * hw.gpus_per_node, hw.gpu_memory_gb * USABLE
    t_mem = teacher_memory_gb(teacher, work.teacher_dtype)
    shapes = _teacher_shapes(teacher, hw, work, t_mem, usable)
    per_device_t = work.teacher_tokens_per_s or estimated_tokens_per_s(2 * teacher.active_param_count, hw)
    per_device_s = work.student_tokens_per_s or estimated_tokens_per_s(6 * student.param_count, hw)
    micro_batches = work.micro_batches
    worlds = [
        w
        for w in range(1, micro_batches + 1)
        if micro_batches % w == 0
        and student_memory_gb(student, work.student_dtype, work.zero_stage, w) <= usable
    ]
    (tp, pp), replicas, world = _best_layout(shapes, worlds, hw, per_device_t, per_device_s)
    accum = micro_batches // world
    shards = min(hw.nodes, world * accum)
    capacity = math.ceil(2 * accum * world / shards) * shards  # the teacher may run one step ahead
    per_batch = (
        work.micro_batch * work.seq_len * (work.topk * (4 + 4) + 4)
    )  # ids int32, logits fp32, normalizer
    topology = _topology(replicas, tp, world, accum, work.micro_batch, hw, capacity, shards)
    topology.check_model(_shape(teacher))
    topology.check_fits()
    check_capacity(capacity, shards, accum * world)
    return Plan(
        topology,
        teacher_tokens_per_s=replicas * tp * pp * per_device_t,
        student_tokens_per_s=world * per_device_s,
        teacher_memory_gb=t_mem / (tp * pp),
        student_memory_gb=student_memory_gb(student, work.student_dtype, work.zero_stage, world),
        buffer_gb=capacity * per_batch / 1e9,
        idle_devices=devices - replicas * tp * pp - world,
        teacher_pp=pp,
    )


def _teacher_shapes(
    teacher: ModelFacts, hw: Hardware, work: Workload, t_mem: float, usable: float
) -> list[tuple[int, int]]:
    """(TP, PP) replica shapes whose teacher shard fits one device: PP 1 for the hf backend, up to one stage per
    node for vLLM. TopologyError with the memory it needs when none fits."""
    if work.teacher_backend not in ("hf", "vllm"):
        raise TopologyError(
            f"teacher backend {work.teacher_backend!r} cannot be planned: `hf` or `vllm` (an endpoint teacher is "
            "served outside the cluster)"
        )
    stages = range(1, hw.nodes + 1) if work.teacher_backend == "vllm" else [1]
    tps = valid_tp(teacher, hw.gpus_per_node)
    shapes = [(tp, pp) for pp in stages for tp in tps if t_mem / (tp * pp) <= usable]
    if not shapes and work.teacher_backend == "vllm":
        need = math.ceil(t_mem / usable)
        raise TopologyError(
            f"the teacher needs {t_mem:.0f} GB ({teacher.param_count / 1e9:.1f}B params in {work.teacher_dtype} x "
            f"{TEACHER_HEADROOM} headroom), i.e. at least {need} devices of {hw.gpu_memory_gb:g} GB ({usable:.0f} GB "
            f"usable), more than the whole cluster holds ({hw.nodes} nodes x {hw.gpus_per_node}). Add nodes, use "
            f"devices with more memory, or {_smaller_dtype_hint(work.teacher_dtype)}a smaller teacher."
        )
    if not shapes:
        need = math.ceil(t_mem / usable)
        raise TopologyError(
            f"the teacher needs {t_mem:.0f} GB ({teacher.param_count / 1e9:.1f}B params in {work.teacher_dtype} x "
            f"{TEACHER_HEADROOM} headroom), i.e. at least {need} devices of {hw.gpu_memory_gb:g} GB ({usable:.0f} GB "
            f"usable) in one TP group, but a TP group lives on one node of {hw.gpus_per_node} devices "
            f"(cluster: {hw.nodes} nodes x {hw.gpus_per_node} = {hw.nodes * hw.gpus_per_node} devices). Use "
            f"devices with more memory (--gpu-memory-gb), {_smaller_dtype_hint(work.teacher_dtype)}more devices "
            "per node; teacher.backend=vllm can also span nodes with pipeline stages."
        )
    return shapes


def _smaller_dtype_hint(dtype: str) -> str:
    """The next smaller teacher dtype to suggest, if there is one (never the dtype the user already passed)."""
    smaller = [d for d in ("bfloat16", "float8", "int4") if BYTES[d] < BYTES.get(dtype, 4)]
    return f"a smaller teacher dtype (--teacher-dtype {smaller[0]}), or " if smaller else ""


def _best_layout(
    shapes: list[tuple[int, int]], worlds: list[int], hw: Hardware, per_device_t: float, per_device_s: float
) -> tuple[tuple[int, int], int, int]:
    """((TP, PP), replicas, student world) with the highest min(teacher, student) rate; fewer devices, then fewer
    pipeline stages, then smaller TP. A replica's TP group lives on one node; its PP stages on PP distinct nodes."""
    devices = hw.nodes * hw.gpus_per_node
    best: tuple | None = None
    for tp, pp in shapes:
        slots = hw.nodes * (hw.gpus_per_node // tp) // pp
        for replicas in range(1, slots + 1):
            for world in worlds:
                used = replicas * tp * pp + world
                if used > devices:
                    break
                rate = min(replicas * tp * pp * per_device_t, world * per_device_s)
                key = (round(rate, 6), -used, -pp, -tp)
                if best is None or key > best[0]:
                    best = (key, (tp, pp), replicas, world)
    if best is None:
        tp, pp = min(shapes, key=lambda shape: shape[0] * shape[1])
        smallest, label = tp * pp, f"TP {tp}" + (f" x PP {pp}" if pp > 1 else "")
        raise TopologyError(
            f"the cluster has {devices} devices ({hw.nodes} nodes x {hw.gpus_per_node}); one teacher replica "
            f"needs {smallest} ({label}) and the student at least "
            f"{worlds[0] if worlds else '(none fits: ZeRO state exceeds device memory)'} more. Add nodes."
        )
    return best[1:]


def measured_per_device(run_dir: str | Path) -> tuple[float, float]:
    """(teacher, student) tokens/s per device from a finished run: the mean of its logged steps'
    `teacher/tokens_per_s` and `student/tokens_per_s`, divided by the devices (or CPU actors) each group used."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    cluster = yaml.safe_load((run_dir / "config.yaml").read_text())["cluster"]
    rows = [r for r in records if "teacher/tokens_per_s" in r and "student/tokens_per_s" in r]
    if not rows:
        raise TopologyError(
            f"{run_dir}/metrics.jsonl has no teacher/student tokens_per_s records to plan from"
        )
    teacher = sum(r["teacher/tokens_per_s"] for r in rows) / len(rows)
    student = sum(r["student/tokens_per_s"] for r in rows) / len(rows)
    return teacher / (cluster["teacher_replicas"] * cluster["teacher_tp"]), student / cluster[
        "student_world_size"
    ]


def overrides(plan: Plan) -> list[str]:
    """The `cluster.*` overrides of the plan (GPU nodes: cuda + nccl, one device per actor); a replica that spans
    nodes adds its pipeline stages (teacher.backend=vllm)."""
    out = [f"cluster.{name}={getattr(plan.topology, name)}" for name in Topology.__dataclass_fields__]
    if plan.teacher_pp > 1:
        out.append(f"teacher.pipeline_parallel={plan.teacher_pp}")
    return out


def _topology(
    replicas: int, tp: int, world: int, accum: int, micro: int, hw: Hardware, capacity: int, shards: int = 1
) -> Topology:
    cpus = max(1, hw.cpus_per_node // hw.gpus_per_node)
    return Topology(
        nodes=hw.nodes,
        cpus_per_node=hw.cpus_per_node,
        gpus_per_node=hw.gpus_per_node,
        device="cuda",
        backend="nccl",
        teacher_replicas=replicas,
        teacher_tp=tp,
        student_world_size=world,
        micro_batch_size=micro,
        grad_accum_steps=accum,
        global_batch_size=micro * accum * world,
        buffer_shards=shards,
        buffer_capacity=capacity,
        cpus_per_teacher_actor=cpus,
        cpus_per_student_actor=cpus,
        gpus_per_teacher_actor=1,
        gpus_per_student_actor=1,
    )


def _shape(facts: ModelFacts) -> ModelShape:
    return ModelShape(
        facts.num_attention_heads, facts.num_key_value_heads, facts.num_experts, facts.vocab_size
    )


def _bytes(dtype: str) -> float:
    if dtype not in BYTES:
        raise TopologyError(f"unknown dtype {dtype!r} for memory planning; use one of {', '.join(BYTES)}")
    return BYTES[dtype]


def report(teacher: ModelFacts, student: ModelFacts, plan: Plan, hw: Hardware, work: Workload) -> str:
    t_dev, s_dev = plan.teacher_replicas * plan.teacher_tp * plan.teacher_pp, plan.student_world_size
    shape = f"TP {plan.teacher_tp}" + (
        f" x PP {plan.teacher_pp} (each replica across {plan.teacher_pp} nodes)"
        if plan.teacher_pp > 1
        else ""
    )
    lines = [
        f"cluster   {hw.nodes} nodes x {hw.gpus_per_node} devices ({hw.gpu_memory_gb:g} GB each)",
        f"teacher   {teacher.architecture} {teacher.param_count / 1e9:.1f}B ({teacher.active_param_count / 1e9:.1f}B "
        f"active) {work.teacher_dtype} ({work.teacher_backend}): {plan.teacher_replicas} replicas x {shape} = {t_dev} "
        f"devices, "
        f"{plan.teacher_memory_gb:.1f} GB/device, {plan.teacher_tokens_per_s:,.0f} tokens/s",
        f"student   {student.architecture} {student.param_count / 1e9:.2f}B ZeRO-{work.zero_stage}: "
        f"{s_dev} ranks, {plan.student_memory_gb:.1f} GB/device, {plan.student_tokens_per_s:,.0f} tokens/s",
        f"balance   teacher/student = {plan.balance:.2f}; end-to-end "
        f"{min(plan.teacher_tokens_per_s, plan.student_tokens_per_s):,.0f} tokens/s; {plan.idle_devices} devices idle",
        f"batch     micro {work.micro_batch} x accum {plan.grad_accum_steps} x {s_dev} ranks = {work.global_batch} "
        f"sequences of {work.seq_len} tokens",
        f"buffer    {plan.buffer_shards} shards, {plan.buffer_capacity} batches ({plan.buffer_gb:.2f} GB of top-{work.topk})",
        "",
        "overrides:",
        "  " + " ".join(overrides(plan)),
    ]
    return "\n".join(lines)
