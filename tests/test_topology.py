"""Topology arithmetic is pure: tested without starting any process."""

import pytest

from distill.config import ModelShape, Topology
from distill.errors import TopologyError

BASE = dict(
    nodes=2,
    cpus_per_node=8,
    gpus_per_node=0,
    device="cpu",
    backend="gloo",
    teacher_replicas=2,
    teacher_tp=2,
    student_world_size=2,
    micro_batch_size=4,
    grad_accum_steps=2,
    global_batch_size=16,
)


def topo(**changes) -> Topology:
    return Topology(**{**BASE, **changes})


def test_valid_layout_and_bundles():
    t = topo()
    assert t.teacher_actors == 4
    assert len(t.bundles()) == 6
    t.check_fits()
    t.check_model(ModelShape(num_attention_heads=8, num_key_value_heads=2, num_experts=4))


def test_batch_arithmetic_error_quotes_numbers_and_fix():
    with pytest.raises(TopologyError) as e:
        topo(global_batch_size=12)
    msg = str(e.value)
    assert "4 x 2 x 2 = 16" in msg and "global_batch_size = 12" in msg
    assert "change global_batch_size to 16" in msg


def test_batch_arithmetic_suggests_accumulation():
    with pytest.raises(TopologyError, match="grad_accum_steps=4"):
        topo(global_batch_size=32)


def test_tp_must_divide_heads_and_experts():
    t = topo(teacher_tp=4, teacher_replicas=1, cpus_per_node=8)
    with pytest.raises(TopologyError, match="does not divide the teacher's 6 attention heads"):
        t.check_model(ModelShape(num_attention_heads=6, num_key_value_heads=6))
    with pytest.raises(TopologyError, match="does not divide the teacher's 6 routed experts"):
        t.check_model(ModelShape(num_attention_heads=8, num_key_value_heads=8, num_experts=6))
    # KV heads may be fewer than TP (replicated), but must divide or be divided by it.
    t.check_model(ModelShape(num_attention_heads=8, num_key_value_heads=2))
    with pytest.raises(TopologyError, match="key/value heads"):
        t.check_model(ModelShape(num_attention_heads=24, num_key_value_heads=6))


def test_more_bundles_than_cluster():
    with pytest.raises(TopologyError) as e:
        topo(nodes=1, cpus_per_node=4).check_fits()
    assert "needs 6 CPUs" in str(e.value) and "1 nodes x (4 CPUs" in str(e.value)


def test_replica_must_fit_one_node():
    with pytest.raises(TopologyError, match="one teacher replica"):
        topo(teacher_tp=4, teacher_replicas=1, cpus_per_node=3, nodes=4).check_fits()


def test_device_backend_pairs():
    with pytest.raises(TopologyError, match="nccl"):
        topo(backend="nccl")
    with pytest.raises(TopologyError, match="gpus_per_node"):
        topo(device="cuda", backend="nccl")
    topo(device="cuda", backend="nccl", gpus_per_node=8)


@pytest.mark.parametrize("field", ["teacher_tp", "student_world_size", "micro_batch_size", "buffer_shards"])
def test_non_positive_counts(field):
    with pytest.raises(TopologyError, match=f"{field}=0"):
        topo(**{field: 0})
