"""Where every actor goes: teacher replicas and student ranks over the live nodes' free resources (pure functions
of the resources, tested without processes), then placement groups. All placement lives here.

A replica's TP ranks talk through latency-bound collectives, so all of them sit on one node (one STRICT_PACK
placement group per replica). Replicas are spread over nodes (round-robin) or packed (fill a node first);
each replica's bundles are pinned to its node with a label selector on `ray.io/node-id`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from distill.config.topology import Topology, TopologyFields
from distill.errors import TopologyError


@dataclass(frozen=True)
class NodeResources:
    node_id: str
    cpus: float
    gpus: float = 0.0


def plan_replica_nodes(
    nodes: list[NodeResources],
    *,
    replicas: int,
    tp: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    spread: bool,
    reserve_cpus: dict[str, float] | None = None,
) -> list[str]:
    """Node id for each replica. Raises TopologyError (quoting the numbers) when the replicas do not fit."""
    free = {n.node_id: [n.cpus - (reserve_cpus or {}).get(n.node_id, 0.0), n.gpus] for n in nodes}
    need_cpu, need_gpu = tp * cpus_per_actor, tp * gpus_per_actor
    order = [n.node_id for n in nodes]
    chosen: list[str] = []
    start = 0
    for r in range(replicas):
        candidates = order[start:] + order[:start] if spread else order
        node = next((n for n in candidates if free[n][0] >= need_cpu and free[n][1] >= need_gpu), None)
        if node is None:
            have = ", ".join(f"{n}: {c:g} CPU/{g:g} GPU free" for n, (c, g) in free.items())
            raise TopologyError(
                f"teacher replica {r} needs {need_cpu:g} CPUs and {need_gpu:g} GPUs on one node (TP {tp}) but no "
                f"node has them ({have}). Lower teacher_replicas, teacher_tp or the per-actor resources."
            )
        free[node][0] -= need_cpu
        free[node][1] -= need_gpu
        chosen.append(node)
        start = (order.index(node) + 1) % len(order)
    return chosen


def alive_nodes() -> list[NodeResources]:
    """The Ray cluster's alive nodes with their total CPU/GPU resources, in a stable order."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    # Head node first, then by id: the same cluster always gives the same plan.
    nodes.sort(key=lambda n: ("node:__internal_head__" not in n["Resources"], n["NodeID"]))
    return [
        NodeResources(n["NodeID"], n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
        for n in nodes
    ]


def replica_placement_group(
    node_id: str, *, tp: int, cpus_per_actor: float, gpus_per_actor: float, name: str
):
    """One STRICT_PACK placement group with `tp` bundles pinned to `node_id`; waits until it is placed."""
    import ray
    from ray.util.placement_group import placement_group

    bundle = {"CPU": cpus_per_actor}
    if gpus_per_actor:
        bundle["GPU"] = gpus_per_actor
    pg = placement_group(
        [dict(bundle) for _ in range(tp)],
        strategy="STRICT_PACK",
        name=name,
        bundle_label_selector=[{"ray.io/node-id": node_id} for _ in range(tp)],
    )
    ray.get(pg.ready(), timeout=120)
    return pg


def plan_student_nodes(
    nodes: list[NodeResources],
    *,
    world_size: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    used: dict[str, tuple[float, float]] | None = None,
) -> list[str]:
    """Node id for each student rank: PACK from the last node backwards onto the (CPU, GPU) not `used`.

    Raises TopologyError (quoting what is free) when the ranks do not fit.
    """
    used = used or {}
    free = {
        n.node_id: [n.cpus - used.get(n.node_id, (0, 0))[0], n.gpus - used.get(n.node_id, (0, 0))[1]]
        for n in nodes
    }
    plan: list[str] = []
    for node in reversed([n.node_id for n in nodes]):
        while len(plan) < world_size and free[node][0] >= cpus_per_actor and free[node][1] >= gpus_per_actor:
            free[node][0] -= cpus_per_actor
            free[node][1] -= gpus_per_actor
            plan.append(node)
    if len(plan) < world_size:
        have = ", ".join(
            f"{n.node_id[:8]}: {c:g} CPU/{g:g} GPU free"
            for n, (c, g) in zip(nodes, free.values(), strict=True)
        )
        raise TopologyError(
            f"{world_size} student ranks need {cpus_per_actor:g} CPUs and {gpus_per_actor:g} GPUs each, but after "
            f"the teachers only {len(plan)} fit on the live Ray cluster ({have} after placing them). Lower "
            "cluster.student_world_size or the per-actor resources, or add nodes."
        )
    return sorted(plan, key=[n.node_id for n in nodes].index)  # ranks in node order: rank 0 on the first


def teacher_layout(layout: TopologyFields) -> dict:
    """The teacher replicas' placement arguments (of `TeacherGroup` and `plan_replica_nodes`) from `cluster.*` or
    its Topology: one rule, so the plan `plan_nodes` checks is the one the group then places by."""
    return {
        "replicas": layout.teacher_replicas,
        "tp": layout.teacher_tp,
        "cpus_per_actor": layout.cpus_per_teacher_actor,
        "gpus_per_actor": layout.gpus_per_teacher_actor,
        "spread": layout.nodes > 1,  # replicas round-robin over the nodes; one node is packed
    }


def plan_nodes(topology: Topology) -> tuple[list[str], list[str]]:
    """Teacher replica nodes (the teacher group's own plan) and student rank nodes on the live Ray cluster."""
    t = topology
    nodes = alive_nodes()
    teacher_nodes = plan_replica_nodes(nodes, **teacher_layout(t))
    used: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
    for node in teacher_nodes:
        cpu, gpu = used[node]
        used[node] = (
            cpu + t.teacher_tp * t.cpus_per_teacher_actor,
            gpu + t.teacher_tp * t.gpus_per_teacher_actor,
        )
    student_nodes = plan_student_nodes(
        nodes,
        world_size=t.student_world_size,
        cpus_per_actor=t.cpus_per_student_actor,
        gpus_per_actor=t.gpus_per_student_actor,
        used=dict(used),
    )
    return teacher_nodes, student_nodes
