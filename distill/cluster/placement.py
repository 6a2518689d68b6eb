"""Which node hosts which teacher replica: a pure function over the nodes' free resources, then placement groups.

A replica's TP ranks talk through latency-bound collectives, so all of them sit on one node (one STRICT_PACK
placement group per replica). Replicas are spread over nodes (round-robin) or packed (fill a node first);
each replica's bundles are pinned to its node with a label selector on `ray.io/node-id`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
