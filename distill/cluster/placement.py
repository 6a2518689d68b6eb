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


def alive_node_ids() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def replica_placement_group(
    node_id: str | None,
    *,
    tp: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    name: str,
    timeout: float = 120.0,
):
    """One STRICT_PACK placement group with `tp` bundles pinned to `node_id` (None: any node with room, as a
    replica re-placed after its node's loss); waits until it is placed (see `wait_placed`)."""
    from ray.util.placement_group import placement_group

    bundle = {"CPU": cpus_per_actor}
    if gpus_per_actor:
        bundle["GPU"] = gpus_per_actor
    pinned = {} if node_id is None else {"bundle_label_selector": [{"ray.io/node-id": node_id}] * tp}
    pg = placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK", name=name, **pinned)
    wait_placed(pg, f"teacher replica {name!r} ({tp} x {bundle})", timeout)
    return pg


def wait_placed(pg, what: str, timeout: float) -> None:
    """Wait until `pg` is placed; after `timeout` s remove it and raise TopologyError. A group re-placed after a
    node's loss waits here for the cluster to have room again (a node added back), as Ray Train's worker group
    does, instead of failing at once."""
    import ray
    from ray.util.placement_group import remove_placement_group

    try:
        ray.get(pg.ready(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        have = ", ".join(f"{n.node_id[:8]}: {n.cpus:g} CPU/{n.gpus:g} GPU" for n in alive_nodes())
        raise TopologyError(
            f"{what} found no room on the live Ray cluster within {timeout:g} s (alive nodes, total resources: "
            f"{have}). Add nodes (or restart the lost ones), or lower the per-actor resources."
        ) from None


def bundle_nodes(pg) -> list[str]:
    """The node id of each bundle of a placed placement group, in bundle order."""
    from ray.util import placement_group_table

    table = placement_group_table(pg)["bundles_to_node_id"]
    return [table[i] for i in range(len(table))]


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


def plan_nodes(topology: Topology, teachers: list | None = None) -> tuple[list[str], list[str]]:
    """Teacher replica nodes (the teacher groups' own plans) and student rank nodes on the live Ray cluster.

    teachers: several teachers' layouts (each a TopologyFields-like `cluster` of its own share), planned one
    after the other on what the groups before left free, as they are then placed; None: the run's one teacher."""
    t = topology
    nodes = alive_nodes()
    teacher_nodes: list[str] = []
    used: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
    for layout in teachers or [t]:
        reserve = {node: cpu for node, (cpu, _) in used.items()}
        planned = plan_replica_nodes(nodes, **teacher_layout(layout), reserve_cpus=reserve)
        teacher_nodes += planned
        for node in planned:
            cpu, gpu = used[node]
            used[node] = (
                cpu + layout.teacher_tp * layout.cpus_per_teacher_actor,
                gpu + layout.teacher_tp * layout.gpus_per_teacher_actor,
            )
    student_nodes = plan_student_nodes(
        nodes,
        world_size=t.student_world_size,
        cpus_per_actor=t.cpus_per_student_actor,
        gpus_per_actor=t.gpus_per_student_actor,
        used=dict(used),
    )
    return teacher_nodes, student_nodes


def wait_on_nodes(refs: list, nodes: set[str], *, poll_s: float = 2.0) -> bool:
    """Wait for `refs` (actors starting on `nodes`): True once all are done (ray.get raises a task's error),
    False as soon as one of `nodes` is no longer alive (a group started in a placement group whose node was lost
    would wait forever: its bundles are pinned there)."""
    import ray

    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s)
        if pending and not nodes <= alive_node_ids():
            return False
    ray.get(refs)
    return True
