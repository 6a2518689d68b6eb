"""Replica placement is planned by a pure function before any actor exists."""

import pytest

from distill.cluster.placement import NodeResources, plan_replica_nodes
from distill.errors import TopologyError

NODES = [NodeResources("a", 4), NodeResources("b", 4)]


def test_spread_puts_replicas_on_different_nodes():
    assert plan_replica_nodes(NODES, replicas=2, tp=2, cpus_per_actor=1, gpus_per_actor=0, spread=True) == [
        "a",
        "b",
    ]


def test_pack_fills_a_node_first():
    assert plan_replica_nodes(NODES, replicas=2, tp=2, cpus_per_actor=1, gpus_per_actor=0, spread=False) == [
        "a",
        "a",
    ]


def test_reserved_cpus_are_respected():
    plan = plan_replica_nodes(
        NODES, replicas=2, tp=2, cpus_per_actor=1, gpus_per_actor=0, spread=False, reserve_cpus={"a": 2}
    )
    assert plan == ["a", "b"]


def test_replica_larger_than_any_node_is_refused_with_numbers():
    with pytest.raises(TopologyError) as e:
        plan_replica_nodes(NODES, replicas=1, tp=8, cpus_per_actor=1, gpus_per_actor=0, spread=True)
    assert "needs 8 CPUs" in str(e.value) and "a: 4 CPU" in str(e.value)


def test_more_replicas_than_the_cluster_holds():
    with pytest.raises(TopologyError, match="replica 2"):
        plan_replica_nodes(NODES, replicas=3, tp=4, cpus_per_actor=1, gpus_per_actor=0, spread=True)
